"""Tests of the synthetic jet generator: schema, determinism, sparsity, physics and safe writing.

Everything else in the project trains and tests on these files, so they must look like the real ones to
the code (schema, value ranges, sparsity) and carry labels that are learnable from the pixels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from l2vit_jax.data import hdf5
from l2vit_jax import errors
from l2vit_jax.data import detector, synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 25  # pixels per side in most tests: the same physical window, 5× coarser pixels
# Means of the real files' channels (docs/design.md, Data).
REAL_CHANNEL_MEANS = np.array([0.083, 0.087, 0.057, 0.127, 1.517, 1.187, 1.233, 1.183])


def _read(path: str) -> dict[str, np.ndarray]:
  with h5py.File(path, "r") as f:
    return {key: f[key][...] for key in f}


def _file_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def small_jets() -> dict[str, np.ndarray]:
  return synthetic.generate_jets(np.random.default_rng(7), 400, image_size=32)


def test_labelled_file_has_the_real_schema(tmp_path):
  path = str(tmp_path / "labelled.h5")
  synthetic.write_synthetic_hdf5(path, 40, seed=1, image_size=SMALL, chunk_size=16)

  info = hdf5.validate_file(path, labelled=True, image_size=SMALL)

  assert (info.num_examples, info.image_size) == (40, SMALL)
  with h5py.File(path, "r") as f:
    assert set(f.keys()) == {"jet", "Y", "m", "pT"}
    assert f["jet"].shape == (40, SMALL, SMALL, 8)
    for key in ("Y", "m", "pT"):
      assert f[key].shape == (40, 1)
    for dataset in f.values():
      assert dataset.dtype == np.float32
      # Contiguous and uncompressed, like the real files, so random access reads one extent.
      assert dataset.chunks is None and dataset.compression is None
    assert set(np.unique(f["Y"][...])) <= {0.0, 1.0}


def test_unlabelled_file_has_only_images(tmp_path):
  path = str(tmp_path / "unlabelled.h5")
  synthetic.write_synthetic_hdf5(path, 10, labelled=False, seed=1, image_size=SMALL)

  hdf5.validate_file(path, labelled=False, image_size=SMALL)

  with h5py.File(path, "r") as f:
    assert set(f.keys()) == {"jet"}
  with pytest.raises(errors.DataError, match="'Y'"):
    hdf5.validate_file(path, labelled=True)


def test_generate_jets_shapes_and_dtypes():
  labelled = synthetic.generate_jets(np.random.default_rng(0), 5, image_size=SMALL)
  unlabelled = synthetic.generate_jets(np.random.default_rng(0), 5, image_size=SMALL, labelled=False)

  assert labelled["jet"].shape == (5, SMALL, SMALL, 8) and labelled["jet"].dtype == np.float32
  assert {k: (v.shape, v.dtype) for k, v in labelled.items() if k != "jet"} == {
    k: ((5, 1), np.float32) for k in ("Y", "m", "pT")
  }
  assert set(unlabelled) == {"jet"}


def test_same_seed_gives_identical_files_whatever_the_chunk_size(tmp_path):
  paths = [str(tmp_path / f"{name}.h5") for name in ("a", "b", "c")]
  synthetic.write_synthetic_hdf5(paths[0], 70, seed=3, image_size=SMALL, chunk_size=5)
  synthetic.write_synthetic_hdf5(paths[1], 70, seed=3, image_size=SMALL, chunk_size=256)
  synthetic.write_synthetic_hdf5(paths[2], 70, seed=4, image_size=SMALL, chunk_size=5)

  assert _file_bytes(paths[0]) == _file_bytes(paths[1])
  first, other_seed = _read(paths[0]), _read(paths[2])
  assert not np.array_equal(first["jet"], other_seed["jet"])
  assert not np.array_equal(first["m"], other_seed["m"])


def test_shorter_file_is_a_prefix_of_a_longer_one(tmp_path):
  short, long = str(tmp_path / "short.h5"), str(tmp_path / "long.h5")
  synthetic.write_synthetic_hdf5(short, 20, seed=5, image_size=SMALL)
  synthetic.write_synthetic_hdf5(long, 50, seed=5, image_size=SMALL, chunk_size=8)

  short_data, long_data = _read(short), _read(long)
  for key, values in short_data.items():
    np.testing.assert_array_equal(values, long_data[key][:20])


def test_full_size_images_are_sparse_and_in_range():
  jet = synthetic.generate_jets(np.random.default_rng(11), 64, labelled=False)["jet"]

  assert jet.shape == (64, 125, 125, 8)
  assert np.isfinite(jet).all()
  assert jet.min() >= 0.0 and jet.max() <= 255.0
  assert (jet == 0).mean() >= 0.97
  zero_fraction = (jet == 0).mean(axis=(0, 1, 2))
  # Every channel carries signal, and none is dense; HCAL (4) is the densest, as in the real data.
  assert np.all(zero_fraction < 1.0) and np.all(zero_fraction > 0.9)
  assert np.argmin(zero_fraction) == 4
  means = jet.mean(axis=(0, 1, 2))
  assert np.all(means > REAL_CHANNEL_MEANS / 3) and np.all(means < REAL_CHANNEL_MEANS * 3)


def test_labels_are_balanced_and_masses_plausible(small_jets):
  y, mass, pt = (small_jets[k][:, 0] for k in ("Y", "m", "pT"))

  assert 0.4 < y.mean() < 0.6
  assert np.isfinite(mass).all() and np.isfinite(pt).all()
  assert mass.min() > 20.0 and mass.max() < 800.0
  assert 110.0 < mass.mean() < 180.0
  assert np.median(mass[y == 1]) > np.median(mass[y == 0]) + 40.0
  assert 130.0 < np.median(mass[y == 1]) < 220.0  # top-like jets peak near the top mass
  assert 450.0 < pt.mean() < 600.0


def test_top_decay_partons_have_top_and_w_masses():
  partons = synthetic._top_decays(np.random.default_rng(2), np.full(200, 520.0))  # (200, 3, 4): b q q'

  def invariant_mass(p4):
    return np.sqrt(p4[..., 0] ** 2 - np.sum(p4[..., 1:] ** 2, axis=-1))

  np.testing.assert_allclose(invariant_mass(partons.sum(axis=1)).mean(), synthetic.TOP_MASS, atol=2.0)
  np.testing.assert_allclose(invariant_mass(partons[:, 1:].sum(axis=1)).mean(), synthetic.W_MASS, atol=1.5)
  np.testing.assert_allclose(np.hypot(partons.sum(axis=1)[:, 1], partons.sum(axis=1)[:, 2]), 520.0)


def test_jet_mass_is_the_invariant_mass_of_the_constituents():
  # Two massless particles: m² = 2 pT1 pT2 (cosh Δη − cos Δφ); the third lies outside the jet (ΔR > 0.8).
  particles = {
    "image": np.array([0, 0, 0]),
    "pt": np.array([300.0, 200.0, 50.0]),
    "eta": np.array([0.1, -0.2, 0.9]),
    "phi": np.array([0.05, -0.1, 0.0]),
  }

  mass, pt = synthetic._jet_mass_and_pt(particles, 1)

  expected = np.sqrt(2 * 300.0 * 200.0 * (np.cosh(0.3) - np.cos(0.15)))
  np.testing.assert_allclose(mass, [expected], rtol=1e-9)
  np.testing.assert_allclose(
    pt, [np.hypot(300 * np.cos(0.05) + 200 * np.cos(0.1), 300 * np.sin(0.05) - 200 * np.sin(0.1))], rtol=1e-9
  )


def _pixel_features(jet: np.ndarray) -> dict[str, np.ndarray]:
  """Hand-made image features: a calorimeter jet mass, energy spread, multiplicities, local maxima."""
  size = jet.shape[1]
  pixel = detector.pixel_size(size)
  centres = (np.arange(size) + 0.5) * pixel - detector.WINDOW_HALF_WIDTH
  eta, phi = np.meshgrid(centres, centres, indexing="ij")  # rows are η, columns φ
  pixels_per_tower = max((detector.HCAL_TOWER_SIZE / pixel) ** 2, 1.0)
  energy = (
    jet[..., 3] / synthetic.ECAL_GAIN + jet[..., 4] / (synthetic.HCAL_GAIN * pixels_per_tower)
  ).astype(np.float64)
  energy *= np.hypot(eta, phi) < detector.JET_RADIUS
  total = [np.sum(energy * f, axis=(1, 2)) for f in (np.cosh(eta), np.cos(phi), np.sin(phi), np.sinh(eta))]
  mass = np.sqrt(np.maximum(total[0] ** 2 - total[1] ** 2 - total[2] ** 2 - total[3] ** 2, 0.0))
  weight = energy / energy.sum(axis=(1, 2), keepdims=True)
  spread = np.sqrt(
    sum(np.sum(weight * c**2, axis=(1, 2)) - np.sum(weight * c, axis=(1, 2)) ** 2 for c in (eta, phi))
  )
  # Local maxima of the tracker + ECAL image: one per hard prong, roughly.
  core = jet[..., 0] + jet[..., 3]
  padded = np.pad(core, ((0, 0), (1, 1), (1, 1)))
  neighbours = np.stack(
    [
      padded[:, 1 + dr : 1 + dr + size, 1 + dc : 1 + dc + size]
      for dr in (-1, 0, 1)
      for dc in (-1, 0, 1)
      if (dr, dc) != (0, 0)
    ]
  )
  peaks = ((core > neighbours.max(axis=0)) & (core > 20.0)).sum(axis=(1, 2))
  return {
    "mass": mass,
    "spread": spread,
    "log_pixels": np.log1p((jet > 0).sum(axis=(1, 2, 3))),
    "peaks": peaks.astype(np.float64),
  }


def test_pixel_mass_estimate_tracks_the_mass_label(small_jets):
  features = _pixel_features(small_jets["jet"])

  r = np.corrcoef(features["mass"], small_jets["m"][:, 0])[0, 1]

  assert r > 0.5


def test_simple_baseline_learns_the_class_from_pixels(small_jets):
  x = np.column_stack(list(_pixel_features(small_jets["jet"]).values()))
  y = small_jets["Y"][:, 0].astype(int)
  train, test = slice(0, 200), slice(200, None)

  model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x[train], y[train])

  assert model.score(x[test], y[test]) > 0.7


def test_failed_write_keeps_the_existing_file_and_leaves_no_partial(tmp_path, monkeypatch):
  path = str(tmp_path / "jets.h5")
  synthetic.write_synthetic_hdf5(path, 10, seed=0, image_size=SMALL)
  good = _file_bytes(path)
  real_generate = synthetic.generate_jets
  calls = [0]

  def generate_then_fail(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:  # with chunk_size=8 the first block is already in the file by now
      calls[0] = 0
      raise RuntimeError("killed mid-write")
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(synthetic, "generate_jets", generate_then_fail)
  with pytest.raises(RuntimeError, match="killed mid-write"):
    synthetic.write_synthetic_hdf5(path, 100, seed=1, image_size=SMALL, chunk_size=8)
  with pytest.raises(RuntimeError, match="killed mid-write"):
    synthetic.write_synthetic_hdf5(str(tmp_path / "new.h5"), 100, seed=1, image_size=SMALL)

  assert _file_bytes(path) == good
  assert sorted(os.listdir(tmp_path)) == ["jets.h5"]


def test_command_line_writes_a_valid_file(tmp_path):
  path = str(tmp_path / "sub" / "cli.h5")

  result = subprocess.run(
    [
      sys.executable,
      "scripts/make_synthetic.py",
      "--out",
      path,
      "--num",
      "12",
      "--unlabelled",
      "--seed",
      "2",
      "--image-size",
      str(SMALL),
      "--chunk-size",
      "5",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  )

  assert path in result.stdout
  hdf5.validate_file(path, labelled=False, image_size=SMALL)
  expected = synthetic.generate_jets(
    synthetic._block_rng(2, 0), synthetic.IMAGES_PER_SEED_BLOCK, image_size=SMALL, labelled=False
  )["jet"][:12]
  np.testing.assert_array_equal(_read(path)["jet"], expected)


# --- generated data of the multi-stage runs (experiments.stages.data_files) -------------------------


def _generated_data_config(**generate):
  import runpy  # pylint: disable=import-outside-toplevel

  config = runpy.run_path(os.path.join(REPO_ROOT, "configs", "quickstart.py"))["get_config"]()
  config.model.img_size = SMALL
  config.generate.update({"generator": "synthetic", "num_labelled": 40, "num_unlabelled": 32, **generate})
  return config


@pytest.mark.parametrize(
  "field, value", [("pt_min", 300.0), ("pt_max", 900.0), ("signal_fraction", 0.2), ("workers", 4)]
)
def test_the_synthetic_generator_refuses_the_settings_it_would_ignore(tmp_path, field, value):
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  with pytest.raises(
    errors.ConfigError,
    match=rf"^config\.generate\.{field}={value!r}: the synthetic "
    "generator ignores it",
  ):
    stages.data_files(_generated_data_config(**{field: value}), str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before anything is written


def test_a_generated_file_made_with_other_settings_is_refused_not_reused(tmp_path):
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  files = stages.data_files(_generated_data_config(), str(tmp_path))
  made = {kind: _file_bytes(path) for kind, path in files.items()}
  assert stages.data_files(_generated_data_config(), str(tmp_path)) == files  # the same settings: reused
  for fields, kind, named in [
    (dict(num_labelled=48), "labelled", "generate.num_labelled=40"),
    (dict(num_unlabelled=40), "unlabelled", "generate.num_unlabelled=32"),
    (dict(data_seed=3), "labelled", "generate.data_seed=0"),
  ]:
    with pytest.raises(errors.ConfigError) as error:
      stages.data_files(_generated_data_config(**fields), str(tmp_path))
    assert str(error.value).startswith(f"{files[kind]}: generated with {named}, but this run has ")
  config = _generated_data_config()
  config.model.img_size = 50
  with pytest.raises(
    errors.ConfigError, match="generated with model.img_size=25, but this run has model.img_size=50"
  ):
    stages.data_files(config, str(tmp_path))
  assert {kind: _file_bytes(path) for kind, path in files.items()} == made
  assert sorted(os.listdir(tmp_path / "data")) == ["synthetic_labelled.h5", "synthetic_unlabelled.h5"]


def test_a_run_waits_while_another_generates_the_data_then_uses_its_files(tmp_path):
  """Two runs (or two processes of one run) on one workdir: the second waits under the data
  directory's lock rather than writing the same files at the same time."""
  import threading  # pylint: disable=import-outside-toplevel
  from l2vit_jax.checkpoint import workdir_lock  # pylint: disable=import-outside-toplevel
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  (tmp_path / "data").mkdir()
  other = workdir_lock.WorkdirLock(str(tmp_path / "data"))  # the other run, generating
  other.acquire()
  result = {}
  waiting = threading.Thread(
    target=lambda: result.update(files=stages.data_files(_generated_data_config(), str(tmp_path)))
  )
  waiting.start()
  waiting.join(timeout=3)
  assert waiting.is_alive() and os.listdir(tmp_path / "data") == ["lock"]  # waits, writes nothing
  other.release()
  waiting.join(timeout=60)
  assert not waiting.is_alive()
  assert sorted(os.listdir(tmp_path / "data")) == ["synthetic_labelled.h5", "synthetic_unlabelled.h5"]
  assert result["files"]["labelled"] == str(tmp_path / "data" / "synthetic_labelled.h5")


def test_a_full_disk_while_generating_is_one_line_naming_the_directory_and_frees_the_lock(
  tmp_path, monkeypatch
):
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(synthetic, "write_synthetic_hdf5", full_disk)
  with pytest.raises(
    errors.DataError,
    match=rf"^{tmp_path / 'data'}: could not write the generated jet "
    r"files: \[Errno 28\] No space left on device$",
  ):
    stages.data_files(_generated_data_config(), str(tmp_path))
  assert not os.listdir(tmp_path / "data")  # the next run does not wait for a lock left behind


@pytest.mark.parametrize("lock_text", ['{"host": "old-version", "pid": 1}', "not json"])
def test_a_data_lock_that_never_expires_is_refused_in_one_line_instead_of_waited_for(tmp_path, lock_text):
  """An unparsable lock, or one of an older version without a refresh time, would keep every process
  waiting for ever (and the others waiting for it in a collective)."""
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "lock").write_text(lock_text)
  with pytest.raises(errors.DataError, match=r"data/lock: a lock that never expires .* delete it and rerun"):
    stages.data_files(_generated_data_config(), str(tmp_path))
  assert os.listdir(tmp_path / "data") == ["lock"]


def test_a_generated_file_the_storage_cannot_read_now_is_kept_not_called_damaged(tmp_path, monkeypatch):
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  files = stages.data_files(_generated_data_config(), str(tmp_path))
  made = _file_bytes(files["labelled"])

  def failing_open(*args, **kwargs):
    raise OSError(5, "Input/output error")

  monkeypatch.setattr(stages.h5py, "File", failing_open)
  with pytest.raises(errors.DataError, match=r"cannot be read now .*the file is kept") as error:
    stages.data_files(_generated_data_config(), str(tmp_path))
  assert "delete" not in str(error.value)
  monkeypatch.undo()
  assert _file_bytes(files["labelled"]) == made

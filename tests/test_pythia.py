"""Tests of the Pythia + FastJet jet files and the CMS-like detector model behind them.

The files are training data that stand in for the real CMS files, so they must have exactly that schema,
be reproducible whatever the machine's parallelism, survive a kill, and hold the jets they claim (fully
merged hadronic tops, leading QCD jets). The detector model is checked channel by channel on
hand-built particles, with its random effects switched off where a test needs exact values.
Generation is kept tiny (25 × 25 images, a few dozen jets) so the file runs in well under 2 minutes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("pythia8mc")
pytest.importorskip("fastjet")
pytest.importorskip("awkward")

from l2vit_jax import errors  # pylint: disable=wrong-import-position
from l2vit_jax.data import detector, jet_files, pythia, sources  # pylint: disable=wrong-import-position
from l2vit_jax.runtime import paths  # pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 25  # one pixel per HCAL tower
# The file every determinism and resume test compares against: 4 chunks of 4 jets.
REFERENCE = {"num": 16, "labelled": True, "seed": 3, "image_size": SMALL, "chunk_size": 4, "progress": False}
# Random effects off, so single particles give exact, predictable images.
EXACT = dataclasses.replace(
  detector.CMS,
  track_efficiency=1.0,
  track_pt_resolution=(0.0, 0.0),
  d0_resolution_um=(0.0, 0.0),
  dz_resolution_um=(0.0, 0.0),
  ecal_resolution=(0.0, 0.0, 0.0),
  hcal_resolution=(0.0, 0.0),
  hadron_early_shower_probability=0.0,
  pixel_hit_efficiency=1.0,
  pixel_cluster_width_mm=0.0,
  pixel_noise_hits_at_125=(0.0, 0.0, 0.0),
)


def _file_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _read(path: str) -> dict[str, np.ndarray]:
  with h5py.File(path, "r") as f:
    out = {}
    f.visititems(
      lambda name, item: out.__setitem__(name, item[...]) if isinstance(item, h5py.Dataset) else None
    )
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("reference") / "jets.h5")
  jet_files.write_pythia_hdf5(path, workers=1, **REFERENCE)
  return path


@pytest.fixture(scope="module")
def truth(reference) -> dict[str, np.ndarray]:
  return _read(jet_files.sidecar_path(reference))


# ---------------------------------------------------------------------------------------------------
# Files.


def test_files_are_byte_identical_whatever_the_number_of_workers(reference, tmp_path):
  path = str(tmp_path / "jets.h5")

  jet_files.write_pythia_hdf5(path, workers=2, **REFERENCE)

  assert _file_bytes(path) == _file_bytes(reference)
  assert _file_bytes(jet_files.sidecar_path(path)) == _file_bytes(jet_files.sidecar_path(reference))
  assert sorted(os.listdir(tmp_path)) == ["jets.h5", "jets.particles.h5"]  # chunks cleaned up


def test_labelled_file_has_the_real_schema_and_balanced_classes(reference):
  info = sources.validate_file(reference, labelled=True, image_size=SMALL)

  assert info.num_examples == 16
  with h5py.File(reference, "r") as f:
    assert set(f.keys()) == {"jet", "Y", "m", "pT"}
    assert f["jet"].shape == (16, SMALL, SMALL, 8)
    for key in ("Y", "m", "pT"):
      assert f[key].shape == (16, 1)
    for dataset in f.values():
      assert dataset.dtype == np.float32
      assert dataset.chunks is None and dataset.compression is None  # contiguous, like the real files
    labels, jets = f["Y"][:, 0], f["jet"][...]
  assert set(np.unique(labels)) == {0.0, 1.0} and labels.sum() == 8
  assert jets.min() >= 0.0 and jets.max() <= 255.0
  assert np.all((jets > 0).any(axis=(0, 1, 2)))  # every channel sees something


def test_labels_are_the_particle_level_jets_in_the_pt_window(reference, truth):
  with h5py.File(reference, "r") as f:
    mass, pt, label = f["m"][:, 0], f["pT"][:, 0], f["Y"][:, 0]

  np.testing.assert_array_equal(mass, truth["mass"].astype(np.float32))
  np.testing.assert_array_equal(pt, truth["pt"].astype(np.float32))
  np.testing.assert_array_equal(label, truth["label"])
  assert np.all((pt >= 400.0) & (pt < 600.0)) and np.all(np.abs(truth["eta"]) < pythia.JET_ETA_MAX)


def test_every_top_jet_contains_its_b_q_and_q_prime(truth):
  top = truth["label"] == 1
  partons = truth["parton_p4"][top]  # (tops, 3, 4): b, q, q' as (E, px, py, pz)
  parton_eta, parton_phi = pythia.eta_phi(partons)

  distance = pythia.delta_r(parton_eta, parton_phi, truth["eta"][top, None], truth["phi"][top, None])

  assert top.sum() == 8 and np.all(distance < 0.8)
  total = partons.sum(axis=1)
  mass = np.sqrt(total[:, 0] ** 2 - np.sum(total[:, 1:] ** 2, axis=1))
  assert np.all(np.abs(mass - 172.5) < 25.0)  # the three are one top's decay, not any three partons


def test_qcd_jets_are_the_leading_jets_of_their_events(truth):
  qcd = truth["label"] == 0

  assert qcd.sum() == 8
  assert set(truth["jet_rank"][qcd]) <= {0, 1}
  assert np.isnan(truth["parton_p4"][qcd]).all()


def test_sidecar_constituents_add_up_to_their_jets(truth):
  offsets = truth["constituent_offsets"]
  columns = {name: truth[f"constituents/{name}"] for name in pythia.CONSTITUENT_COLUMNS}

  assert offsets[0] == 0 and offsets[-1] == len(columns["px"]) and np.all(np.diff(offsets) > 0)
  for i in range(len(offsets) - 1):
    part = slice(offsets[i], offsets[i + 1])
    e, px, py, pz = (columns[k][part].sum() for k in ("e", "px", "py", "pz"))
    np.testing.assert_allclose(np.sqrt(e**2 - px**2 - py**2 - pz**2), truth["mass"][i], rtol=1e-6)
    np.testing.assert_allclose(np.hypot(px, py), truth["pt"][i], rtol=1e-9)
  assert not np.isin(np.abs(columns["pdg_id"]), detector.NEUTRINOS).any()
  tau = truth["tau"]
  assert tau.shape == (16, 3) and np.all(tau >= 0) and np.all(tau[:, 0] >= tau[:, 1])


def test_unlabelled_file_has_only_images_at_the_requested_signal_fraction(tmp_path):
  path = str(tmp_path / "unlabelled.h5")

  jet_files.write_pythia_hdf5(
    path,
    8,
    labelled=False,
    seed=5,
    image_size=SMALL,
    workers=1,
    chunk_size=8,
    signal_fraction=0.25,
    sparse=True,
    progress=False,
  )

  sources.validate_file(path, labelled=False, image_size=SMALL)
  sources.validate_file(jet_files.sparse_path(path), labelled=False, image_size=SMALL)
  with h5py.File(path, "r") as f:
    assert set(f.keys()) == {"jet"}
  assert _read(jet_files.sidecar_path(path))["label"].sum() == 2


def test_chunk_plan_holds_exactly_the_requested_number_of_tops():
  plan = jet_files.chunk_plan(103, 10, 0.37)

  assert [size for _, size, _ in plan] == [10] * 10 + [3]
  assert sum(tops for _, _, tops in plan) == round(103 * 0.37)
  assert all(0 <= tops <= size for _, size, tops in plan)
  assert jet_files.chunk_plan(20, 10, 0.5) == [(0, 10, 5), (10, 10, 5)]


def test_a_killed_run_resumes_from_its_chunks_and_writes_the_same_bytes(reference, tmp_path, monkeypatch):
  path = str(tmp_path / "jets.h5")
  with open(path, "wb") as f:
    f.write(b"an older good file")
  real_run_chunk = jet_files._run_chunk
  calls = []

  def killed_at_the_third_chunk(task):
    calls.append(task[2])
    if len(calls) == 3:
      raise KeyboardInterrupt  # like Ctrl-C or a kill: the chunk in progress is lost
    return real_run_chunk(task)

  monkeypatch.setattr(jet_files, "_run_chunk", killed_at_the_third_chunk)
  with pytest.raises(KeyboardInterrupt):
    jet_files.write_pythia_hdf5(path, workers=1, **REFERENCE)
  chunks = jet_files.chunk_directory(path)
  assert _file_bytes(path) == b"an older good file"
  assert sorted(e for e in os.listdir(chunks) if e.startswith("chunk-")) == [
    "chunk-000000.npz",
    "chunk-000001.npz",
  ]
  half_chunk = paths.temporary_name(os.path.join(chunks, "chunk-000002.npz"), pid=999)
  with open(half_chunk, "wb") as f:
    f.write(b"half a chunk")  # what a kill during np.savez leaves
  calls.clear()
  monkeypatch.setattr(jet_files, "_run_chunk", lambda task: calls.append(task[2]) or real_run_chunk(task))

  summary = jet_files.write_pythia_hdf5(path, workers=1, **REFERENCE)

  assert calls == [2, 3] and summary["generated"] == 8
  assert _file_bytes(path) == _file_bytes(reference)
  assert _file_bytes(jet_files.sidecar_path(path)) == _file_bytes(jet_files.sidecar_path(reference))
  assert not os.path.exists(chunks)


def test_stored_chunks_of_other_arguments_are_refused_and_kept(tmp_path):
  """An interrupted generation resumed with a changed flag: the old code deleted its chunks."""
  directory = str(tmp_path / ".jets.h5.chunks")
  old = {"seed": 1, "pt_range": [400.0, 600.0]}
  jet_files._prepare_chunk_directory(directory, old)
  with open(os.path.join(directory, "chunk-000000.npz"), "wb") as f:
    f.write(b"a chunk of seed 1")

  jet_files._prepare_chunk_directory(directory, old)
  kept = sorted(os.listdir(directory))
  with pytest.raises(errors.ConfigError, match=r"other settings \(seed\); rerun with the settings"):
    jet_files._prepare_chunk_directory(directory, dict(old, seed=2))

  assert kept == ["chunk-000000.npz", "settings.json"]
  assert sorted(os.listdir(directory)) == kept


BAD_ARGUMENTS = [
  ({"pt_range": (600.0, 400.0)}, "pt_range"),
  ({"pt_range": (500.0, 500.0)}, "pt_range"),
  ({"image_size": 30}, "image_size"),
  ({"num": 0}, "num"),
  ({"workers": 0}, "workers"),
  ({"signal_fraction": 1.5}, "signal_fraction"),
  ({"signal_fraction": -0.1}, "signal_fraction"),
  ({"chunk_size": 0}, "chunk_size"),
]


@pytest.mark.parametrize("overrides, name", BAD_ARGUMENTS, ids=[n for _, n in BAD_ARGUMENTS])
def test_bad_arguments_fail_in_one_line_before_any_event(overrides, name, tmp_path, monkeypatch):
  def no_events(*args, **kwargs):
    raise AssertionError("an event generator was started")

  monkeypatch.setattr(pythia, "make_pythia", no_events)
  arguments = {**REFERENCE, "workers": 1, **overrides}

  with pytest.raises(errors.ConfigError) as failure:
    jet_files.write_pythia_hdf5(str(tmp_path / "jets.h5"), **arguments)

  message = str(failure.value)
  assert message.startswith(f"{name}: got ") and "expected" in message and "\n" not in message
  assert os.listdir(tmp_path) == []


def test_command_line_writes_valid_files(tmp_path):
  path = str(tmp_path / "sub" / "cli.h5")

  result = subprocess.run(
    [
      sys.executable,
      "scripts/make_pythia.py",
      "--out",
      path,
      "--num",
      "4",
      "--seed",
      "2",
      "--image-size",
      str(SMALL),
      "--workers",
      "1",
      "--chunk-size",
      "4",
      "--sparse",
      "--no-progress",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )

  assert result.returncode == 0, result.stderr
  assert path in result.stdout and "FastJet" not in result.stdout
  sources.validate_file(path, labelled=True, image_size=SMALL)
  sources.validate_file(jet_files.sparse_path(path), labelled=True, image_size=SMALL)
  assert os.path.exists(jet_files.sidecar_path(path))


@pytest.mark.parametrize(
  "arguments, start",
  [
    (["--pt-min", "600", "--pt-max", "400"], "error: pt_range: got (600.0, 400.0)"),
    (["--num", "many"], "error: argument --num"),
  ],
)
def test_command_line_rejects_bad_arguments_with_one_error_line(arguments, start, tmp_path):
  result = subprocess.run(
    [sys.executable, "scripts/make_pythia.py", "--out", str(tmp_path / "x.h5"), "--num", "4", *arguments],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )

  assert result.returncode == 2
  assert result.stderr.startswith(start) and result.stderr.count("\n") == 1
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# The detector model on hand-built particles.


def _particles(*rows: dict) -> detector.Particles:
  """Particles from (pt, eta, phi, mass, charge, pdg_id, vertex) dicts; vertex (x, y, z) in mm."""
  columns = {name: [] for name in ("px", "py", "pz", "e", "charge", "pdg_id", "x", "y", "z")}
  for row in rows:
    pt, eta, phi, mass = row["pt"], row["eta"], row["phi"], row.get("mass", 0.0)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    for name, value in zip(
      ("px", "py", "pz", "e", "charge", "pdg_id"),
      (px, py, pz, np.sqrt(px**2 + py**2 + pz**2 + mass**2), row["charge"], row["pdg_id"]),
    ):
      columns[name].append(value)
    for name, value in zip(("x", "y", "z"), row.get("vertex", (0.0, 0.0, 0.0))):
      columns[name].append(value)
  return detector.Particles.from_columns(**columns)


def _render(particles, size=detector.REAL_IMAGE_SIZE, axis=(0.0, 0.0), model=EXACT) -> np.ndarray:
  return detector.jet_image(particles, *axis, np.random.default_rng(0), image_size=size, model=model)


def _pixel(eta: float, phi: float, size: int = detector.REAL_IMAGE_SIZE) -> tuple[int, int]:
  cell = detector.pixel_size(size)
  return (
    int(np.floor((eta + detector.WINDOW_HALF_WIDTH) / cell)),
    int(np.floor((phi + detector.WINDOW_HALF_WIDTH) / cell)),
  )


def _channels_hit(image: np.ndarray) -> set[int]:
  return set(np.flatnonzero((image > 0).any(axis=(0, 1))).tolist())


def test_displaced_charged_pion_has_a_track_and_hits_only_the_layers_outside_its_vertex():
  # Produced at r = 40 mm, between pixel layers 1 (29 mm) and 2 (68 mm), 0.05 rad off its flight line.
  r0, offset, z0, eta, phi = 40.0, 0.05, 3.0, 0.1, 0.2
  vertex = (r0 * np.cos(phi + offset), r0 * np.sin(phi + offset), z0)
  model = dataclasses.replace(EXACT, d0_gain=0.01, dz_gain=0.01)  # no saturation: exact values
  displaced = _render(
    _particles(
      {"pt": 50.0, "eta": eta, "phi": phi, "mass": 0.1396, "charge": 1, "pdg_id": 211, "vertex": vertex}
    ),
    model=model,
  )
  prompt = _render(
    _particles({"pt": 50.0, "eta": eta, "phi": phi, "mass": 0.1396, "charge": 1, "pdg_id": 211}), model=model
  )

  assert _channels_hit(displaced) == {0, 1, 2, 3, 4, 6, 7}  # not layer 1 (channel 5)
  assert _channels_hit(prompt) == {0, 3, 4, 5, 6, 7}  # no impact parameters above threshold
  # Straight line from the vertex: |d0| = r0 sin(offset), |dz| = |z0 − r0 cos(offset) sinh(η)|.
  d0_um = 1000 * r0 * np.sin(offset)
  dz_um = 1000 * abs(z0 - r0 * np.cos(offset) * np.sinh(eta))
  track_pixel = tuple(np.argwhere(displaced[..., 0] > 0)[0])
  np.testing.assert_allclose(displaced[track_pixel][[1, 2]], [0.01 * d0_um, 0.01 * dz_um], rtol=1e-5)
  np.testing.assert_allclose(displaced[..., 0].sum(), model.track_pt_gain * 50.0, rtol=1e-5)


def test_photon_deposits_only_in_the_ecal_around_its_crystal():
  image = _render(_particles({"pt": 20.0, "eta": 0.05, "phi": -0.1, "charge": 0, "pdg_id": 22}))

  assert _channels_hit(image) == {3}
  ecal = image[..., 3]
  assert np.unravel_index(np.argmax(ecal), ecal.shape) == _pixel(0.05, -0.1)
  energy = 20.0 * np.cosh(0.05)
  np.testing.assert_allclose(ecal.sum(), EXACT.ecal_gain * energy, rtol=1e-5)  # sharing keeps energy
  assert (ecal > 0).sum() == 5  # its crystal and the four edge neighbours


def test_neutral_hadron_deposits_only_in_the_hcal_spread_over_its_tower():
  image = _render(
    _particles({"pt": 30.0, "eta": -0.3, "phi": 0.25, "mass": 0.4976, "charge": 0, "pdg_id": 130})
  )

  assert _channels_hit(image) == {4}
  hcal = image[..., 4]
  row, col = (5 * (index // 5) for index in _pixel(-0.3, 0.25))  # the tower's first crystal
  tower = hcal[row : row + 5, col : col + 5]
  assert np.all(tower == tower[0, 0]) and tower[0, 0] == hcal.max() > 0
  # Every tower is uniform over its 5 × 5 crystals, as in the real files.
  towers = hcal.reshape(25, 5, 25, 5)
  assert np.all(towers == towers[:, :1, :, :1])
  assert ((towers[:, 0, :, 0] > 0).sum()) == 5  # its tower and the four it leaks into


def test_image_size_that_splits_hcal_towers_is_refused():
  particles = _particles({"pt": 20.0, "eta": 0.0, "phi": 0.0, "charge": 0, "pdg_id": 22})

  with pytest.raises(errors.ConfigError, match=r"^image_size: got 30, expected a positive multiple of 25"):
    _render(particles, size=30)
  assert _render(particles, size=50).shape == (50, 50, 8)


def test_phi_wraps_around_at_pi():
  axis = (0.0, np.pi - 0.01)
  image = _render(
    _particles({"pt": 20.0, "eta": 0.0, "phi": -np.pi + 0.03, "charge": 0, "pdg_id": 22}), axis=axis
  )

  ecal = image[..., 3]
  assert np.unravel_index(np.argmax(ecal), ecal.shape) == _pixel(0.0, 0.04)  # Δφ = +0.04, not −6.24


def test_charged_particles_bend_clockwise_and_soft_ones_never_reach_the_calorimeter():
  def render(pt, charge):
    return _render(
      _particles({"pt": pt, "eta": 0.0, "phi": 0.0, "mass": 0.1396, "charge": charge, "pdg_id": 211 * charge})
    )

  positive, negative, curler = render(2.0, 1), render(2.0, -1), render(0.5, 1)

  bend = np.arcsin(detector.BEND_PER_METRE * detector.ECAL_RADIUS / 2.0)
  assert tuple(np.argwhere(positive[..., 0] > 0)[0]) == _pixel(0.0, -bend)
  assert tuple(np.argwhere(negative[..., 0] > 0)[0]) == _pixel(0.0, bend)
  assert _channels_hit(curler) == {5, 6, 7}  # 0.5 GeV: R = 44 cm, it turns back before the ECAL


def test_neutrinos_leave_nothing_and_smearing_follows_the_generator():
  neutrino = _particles({"pt": 100.0, "eta": 0.0, "phi": 0.0, "charge": 0, "pdg_id": 14})
  pion = _particles({"pt": 10.0, "eta": 0.0, "phi": 0.0, "mass": 0.1396, "charge": 1, "pdg_id": 211})

  def smeared(seed):
    return detector.jet_image(pion, 0.0, 0.0, np.random.default_rng(seed), image_size=SMALL)

  assert not _render(neutrino).any()
  np.testing.assert_array_equal(smeared(1), smeared(1))
  assert not np.array_equal(smeared(1), smeared(2))


def test_generated_files_of_the_multi_stage_runs_are_refused_when_the_pt_window_changed(tmp_path):
  """``experiments.stages.data_files`` reads the settings back from the Pythia file itself: another
  pT window or signal fraction is refused (one line naming the field); other workers are not (the
  files are byte-identical whatever the number of workers)."""
  import runpy  # pylint: disable=import-outside-toplevel
  from l2vit_jax.experiments import stages  # pylint: disable=import-outside-toplevel

  def config(**generate):
    config = runpy.run_path(os.path.join(REPO_ROOT, "configs", "quickstart.py"))["get_config"]()
    config.model.img_size = SMALL
    config.generate.update({"num_labelled": 4, "num_unlabelled": 4, "workers": 1, **generate})
    return config

  files = stages.data_files(config(), str(tmp_path))
  assert stages.data_files(config(workers=2), str(tmp_path)) == files
  for field, value in [("pt_min", 450.0), ("pt_max", 650.0), ("signal_fraction", 0.3)]:
    kind = "unlabelled" if field == "signal_fraction" else "labelled"
    with pytest.raises(errors.ConfigError, match=rf"^{files[kind]}: generated with generate\.{field}="):
      stages.data_files(config(**{field: value}), str(tmp_path))

"""On-device densify + augment of sparse batches: bit-identical to host augmentation, same semantics."""

import jax
import numpy as np
import pytest

from conftest import tiny_config, write_jet_file
from l2vit_jax.checkpoint import model_io, naming
from l2vit_jax.training import loop
from l2vit_jax.data import augment, device_augment, pipeline, sources, sparse

TASK_KEYS = {"physics": ("image", "label", "mass"), "simclr": ("view1", "view2")}


def nonzero_counts(images: np.ndarray) -> np.ndarray:
  """Per image, the number of pixels with a non-zero bit pattern (the ``.sparse`` file's entries)."""
  flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
  return np.count_nonzero(flat.view(np.uint32), axis=1)


def _special_jets(num=48, size=25):
  """Random sparse jets plus the awkward values: -0.0, the smallest denormal (it scales to 0) and 255."""
  rng = np.random.default_rng(1)
  jet = np.zeros((num, size, size, 8), np.float32)
  hits = rng.random(jet.shape) < 0.03
  jet[hits] = rng.exponential(5.0, hits.sum()).astype(np.float32)
  jet[0, 1, 2, 3] = -0.0
  jet[1:4, 0, 0, 0] = np.float32(1.4e-45)
  jet[4, size - 1, size - 1, 7] = 255.0
  return jet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("device_augment")
  labelled = write_jet_file(root / "labelled.h5", num=64, overrides={"jet": _special_jets(64)})
  unlabelled = write_jet_file(root / "unlabelled.h5", num=48, labelled=False, seed=2)
  for path in (labelled, unlabelled):
    sparse.convert_hdf5(path, path.replace(".h5", sparse.SUFFIX))
  return {
    "labelled": labelled.replace(".h5", sparse.SUFFIX),
    "unlabelled": unlabelled.replace(".h5", sparse.SUFFIX),
  }


def _bits(array):
  return np.asarray(array).view(np.uint32)


@pytest.mark.parametrize("augmentation, pixel_scale", [("physics", 255.0), ("simclr", 7.3), ("simclr", 1.0)])
def test_device_batches_equal_host_batches_bit_for_bit(files, augmentation, pixel_scale):
  source = sources.open_source(files["labelled"], labelled=True)
  make = lambda on_device: iter(
    pipeline.make_train_dataset(
      source,
      batch_size=8,
      seed=5,
      augmentation=augmentation,
      pixel_scale=pixel_scale,
      device_augmentation=on_device,
    )
  )
  host, device = make(False), make(True)
  keys = device_augment.batch_keys(TASK_KEYS[augmentation], augmentation)
  prepare = jax.jit(device_augment.prepare_batch(augmentation, source.image_shape))
  shipped = 0
  for _ in range(10):  # more than one epoch of 64 images
    want, sparse_batch = next(host), next(device)
    shipped += sum(np.asarray(sparse_batch[k]).nbytes for k in keys)
    got = prepare({k: sparse_batch[k] for k in keys})
    assert sorted(got) == sorted(TASK_KEYS[augmentation])
    for key in got:
      assert np.asarray(got[key]).dtype == want[key].dtype, key
      np.testing.assert_array_equal(
        _bits(got[key]) if key.startswith(("image", "view")) else got[key],
        _bits(want[key]) if key.startswith(("image", "view")) else want[key],
        err_msg=key,
      )
  dense = sum(want[view].nbytes for view in augment.VIEWS[augmentation]) * 10
  assert shipped < dense / 5  # 3 % non-zeros here; the real files ship ≈ 2 % of the dense bytes


def test_underflowing_pixels_are_dropped_so_noise_stays_aligned(files):
  source = sources.open_source(files["labelled"], labelled=True, indices=[1, 2, 3, 0])
  batch = sparse.ReadPaddedBatch(source, pixel_scale=255.0).map(np.arange(4))
  dense = np.stack([source[i]["image"] for i in range(4)]).reshape(4, -1) / np.float32(255.0)
  np.testing.assert_array_equal(batch["count"], nonzero_counts(dense))
  assert _bits(batch["values"][3][batch["positions"][3] == (1 * 25 + 2) * 8 + 3])[0] == 0x80000000  # -0.0


def test_parameters_have_the_documented_distributions():
  rng = np.random.default_rng(0)
  params = augment.draw_view_params(
    rng, 20000, (25, 25, 8), channel_dropout_probability=0.5, noise_relative_std=0.05
  )
  assert abs(params["flip_phi"].mean() - 0.5) < 0.02 and abs(params["flip_eta"].mean() - 0.5) < 0.02
  assert np.all(np.bincount(params["shift"], minlength=25) > 20000 / 25 * 0.8)  # uniform over φ
  dropped = (~params["keep_channels"]).sum(axis=1)
  assert abs((dropped > 0).mean() - 0.5) < 0.02 and set(np.unique(dropped)) == {0, 1, 2}
  assert abs((dropped == 1).sum() / (dropped > 0).sum() - 0.5) < 0.03
  # Each channel: dropped with probability 1/2 · (1 + 2)/2 · 1/8 (no channel favoured).
  assert np.all(np.abs((~params["keep_channels"]).mean(axis=0) - 0.5 * 1.5 / 8) < 0.01)
  seeds = params["noise_seed"]
  assert seeds.dtype == np.uint32 and len(np.unique(seeds)) > 19900
  # Factors of 64 images × 4096 pixels: N(1, 0.05), table indices uniform, no correlation between
  # neighbouring pixels or between images.
  indices = augment.noise_indices(seeds[:64, None], np.arange(4096)[None, :])
  factors = augment.noise_table(0.05)[indices]
  assert abs(factors.mean() - 1) < 0.001 and abs(factors.std() - 0.05) < 0.001
  assert np.bincount((indices >> 12).ravel(), minlength=16).min() > 64 * 4096 / 16 * 0.95
  assert abs(np.corrcoef(factors[:, :-1].ravel(), factors[:, 1:].ravel())[0, 1]) < 0.01
  assert abs(np.corrcoef(factors[:-1].ravel(), factors[1:].ravel())[0, 1]) < 0.01
  table = augment.noise_table(0.05)
  assert np.all(np.diff(table) >= 0) and abs(float(table[0]) - (1 - 0.05 * 4.17)) < 0.01


def test_physics_keeps_intensity_and_empty_pixels_and_simclr_only_removes(files):
  source = sources.open_source(files["labelled"], labelled=True)
  images = np.stack([source[i]["image"] for i in range(16)])
  rng = np.random.default_rng(3)
  physics = augment.PhysicsAugment().random_map({"image": images}, rng)["image"]
  np.testing.assert_allclose(physics.sum(axis=(1, 2)), images.sum(axis=(1, 2)), rtol=1e-5)
  np.testing.assert_array_equal(nonzero_counts(physics), nonzero_counts(images))
  views = augment.SimCLRViews().random_map({"image": images}, rng)
  for view in ("view1", "view2"):
    assert np.all((views[view] != 0) <= _moved_support(images, views[view]))
    assert np.all(nonzero_counts(views[view]) <= nonzero_counts(images))


def _moved_support(images, view):
  """Pixels a view may fill: the non-zero pixels of some flip and roll of the image (per image)."""
  support = np.zeros_like(view, bool)
  for b in range(len(images)):
    for eta_flip in (False, True):
      for phi_flip in (False, True):
        image = images[b][::-1] if eta_flip else images[b]
        image = image[:, ::-1] if phi_flip else image
        for shift in range(image.shape[1]):
          rolled = np.roll(image, shift, axis=1) != 0
          if np.all((view[b] != 0) <= rolled):
            support[b] |= rolled
  return support


def test_settings(files, tmp_path):
  sparse_source = sources.open_source(files["labelled"], labelled=True)
  h5 = write_jet_file(tmp_path / "x.h5", num=8)
  h5_source = sources.open_source(h5, labelled=True)
  assert device_augment.enabled("auto", sparse_source) and not device_augment.enabled("auto", h5_source)
  assert not device_augment.enabled("off", sparse_source)
  with pytest.raises(Exception, match="needs a .sparse training file"):
    device_augment.enabled("on", h5_source)
  with pytest.raises(ValueError, match="expected one of"):
    device_augment.enabled("yes", sparse_source)


def _final_params(workdir):
  arrays, _ = model_io.read_model_checkpoint(workdir, prefer=(naming.LATEST_DIR,))
  return arrays


@pytest.mark.parametrize("task", ["finetune", "simclr"])
def test_training_on_device_equals_host_and_resumes(files, tmp_path, task):
  """The same run from a .sparse file with host and with device augmentation ends at the same
  parameters bit for bit; an interrupted finetuning run on the device resumes to them too (the
  iterator state is that of the host path: the same Grain map dataset of key batches)."""
  config = lambda setting, **kw: tiny_config(
    task,
    files["labelled"],
    files["unlabelled"],
    num_epochs=1,
    **{"data.device_augmentation": setting, "data.pixel_scale": 3.0, **kw},
  )
  loop.train_and_evaluate(config("off"), str(tmp_path / "host"))
  if task == "finetune":
    workdirs = ["resumed"]
    resumed = str(tmp_path / "resumed")
    assert loop.train_and_evaluate(config("auto", stop_after_steps=2), resumed)["step"] == 2
    loop.train_and_evaluate(config("auto"), resumed)
  else:
    workdirs = ["device"]
    loop.train_and_evaluate(config("on"), str(tmp_path / "device"))
  want = _final_params(str(tmp_path / "host"))
  for workdir in workdirs:
    got = _final_params(str(tmp_path / workdir))
    for group in want:
      for name in want[group]:
        np.testing.assert_array_equal(got[group][name], want[group][name], err_msg=f"{workdir} {name}")


def test_workers_ship_the_same_sparse_batches(files):
  source = sources.open_source(files["unlabelled"], labelled=False)
  make = lambda workers: iter(
    pipeline.make_train_dataset(
      source, batch_size=8, seed=1, augmentation="simclr", device_augmentation=True, worker_count=workers
    )
  )
  single, workers = make(0), make(2)
  for _ in range(3):
    a, b = next(single), next(workers)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_each_process_ships_its_own_augmentation_parameters(files):
  source = sources.open_source(files["unlabelled"], labelled=False)
  make = lambda process: iter(
    pipeline.make_train_dataset(
      source,
      batch_size=8,
      seed=1,
      augmentation="simclr",
      device_augmentation=True,
      process_index=process,
      process_count=2,
    )
  )
  first, second, again = make(0), make(1), make(1)
  names = augment.SimCLRViews().param_names()
  for _ in range(3):
    a, b, c = next(first), next(second), next(again)
    for name in names:
      np.testing.assert_array_equal(b[f"view1:{name}"], c[f"view1:{name}"])  # reproducible
    assert not all(np.array_equal(a[f"view1:{name}"], b[f"view1:{name}"]) for name in names)
    assert not np.array_equal(a["view1:noise_seed"], b["view1:noise_seed"])

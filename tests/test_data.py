"""HDF5 validation, split, augmentations and Grain pipeline behaviour on tiny files."""

import numpy as np
import pytest

from conftest import write_jet_file
from l2vit_jax.data import augment, hdf5, pipeline, split
from l2vit_jax import errors


# --- validation -------------------------------------------------------------------------------------


def _nan_image(num=40, size=25):
  jet = np.zeros((num, size, size, 8), np.float32)
  jet[-1, 3, 4, 5] = np.nan  # the last image is always among those checked
  return jet


@pytest.mark.parametrize(
  "kwargs, expected",
  [
    (dict(drop=("m",)), "key 'm': missing"),
    (dict(overrides={"jet": np.zeros((40, 25, 25, 3), np.float32)}), "key 'jet': expected shape"),
    (dict(overrides={"jet": np.zeros((40, 25, 25, 8), np.float64)}), "expected dtype float32"),
    (dict(overrides={"jet": _nan_image()}), "NaN/Inf in image 39"),
    (dict(overrides={"jet": -np.ones((40, 25, 25, 8), np.float32)}), "expected pixels >= 0"),
    (
      dict(overrides={"Y": np.full((40, 1), 2.0, np.float32)}),
      "key 'Y': expected class labels in {0, 1}, found 2.0",
    ),
    (dict(overrides={"m": np.zeros((40, 1), np.float32)}), "key 'm': expected finite positive masses"),
    (dict(overrides={"pT": np.zeros((39, 1), np.float32)}), "key 'pT': expected shape (40, 1)"),
  ],
)
def test_malformed_labelled_file_gives_one_line_error(tmp_path, kwargs, expected):
  path = write_jet_file(tmp_path / "bad.h5", **kwargs)
  with pytest.raises(errors.DataError) as error:
    hdf5.validate_file(path, labelled=True)
  message = str(error.value)
  assert expected in message and path in message and "\n" not in message


def test_not_hdf5_truncated_and_missing_files(tmp_path):
  text = tmp_path / "notes.h5"
  text.write_text("<html>404</html>")
  with pytest.raises(errors.DataError, match="not an HDF5 file"):
    hdf5.validate_file(str(text), labelled=True)
  with pytest.raises(errors.DataError, match="file not found"):
    hdf5.validate_file(str(tmp_path / "absent.h5"), labelled=False)
  good = write_jet_file(tmp_path / "good.h5")
  truncated = tmp_path / "truncated.h5"
  truncated.write_bytes(open(good, "rb").read()[:300_000])
  with pytest.raises(errors.DataError, match="truncated"):
    hdf5.validate_file(str(truncated), labelled=True)


def test_valid_files_and_sampled_value_check(tmp_path, jet_file):
  info = hdf5.validate_file(jet_file, labelled=True, image_size=25, value_sample=8)
  assert (info.num_examples, info.image_size) == (40, 25)
  assert info.bytes_read_for_values == 8 * 25 * 25 * 8 * 4  # a sample, not the whole file
  unlabelled = write_jet_file(tmp_path / "unlabelled.h5", labelled=False)
  assert hdf5.validate_file(unlabelled, labelled=False).num_examples == 40
  with pytest.raises(errors.DataError, match="key 'Y': missing"):
    hdf5.validate_file(unlabelled, labelled=True)
  with pytest.raises(errors.DataError, match="need at least 64"):
    hdf5.validate_file(jet_file, labelled=True, min_examples=64)


def test_source_is_picklable_and_reads_records(jet_file):
  import pickle

  source = hdf5.HDF5Source(jet_file, labelled=True, indices=[3, 7])
  first = source[1]
  clone = pickle.loads(pickle.dumps(source))  # an open handle must not travel to workers
  np.testing.assert_array_equal(clone[1]["image"], first["image"])
  assert first["index"] == 7 and first["label"] == 1 and first["image"].shape == (25, 25, 8)


# --- split ------------------------------------------------------------------------------------------


def test_split_is_deterministic_stratified_and_disjoint():
  labels = np.array([1] * 5122 + [0] * 4878)
  parts = split.stratified_split(labels)
  assert {k: len(v) for k, v in parts.items()} == {"train": 7000, "val": 1000, "test": 2000}
  everything = np.concatenate(list(parts.values()))
  assert len(np.unique(everything)) == len(labels)
  for indices in parts.values():
    assert abs(labels[indices].mean() - labels.mean()) < 0.002
  again = split.stratified_split(labels)
  other = split.stratified_split(labels, seed=7)
  assert all(np.array_equal(parts[k], again[k]) for k in parts)
  assert not np.array_equal(parts["test"], other["test"])
  small = split.stratified_split(np.arange(37) % 2)
  assert sum(len(v) for v in small.values()) == 37 and len(small["val"]) > 0


def test_mass_statistics_use_train_split_only():
  masses = np.array([1.0, 3.0, 100.0])
  assert split.mass_statistics(masses, np.array([0, 1])) == (2.0, 1.0)


# --- augmentations ----------------------------------------------------------------------------------


def _sparse_image(seed=0):
  rng = np.random.default_rng(seed)
  image = np.zeros((25, 25, 8), np.float32)
  image[rng.integers(25, size=30), rng.integers(25, size=30), rng.integers(8, size=30)] = 1 + rng.random(30)
  return image


def test_physics_augment_preserves_shape_sign_and_intensity():
  image = _sparse_image()
  outputs = [
    augment.PhysicsAugment().random_map({"image": image[None]}, np.random.default_rng(s))["image"][0]
    for s in range(20)
  ]
  for out in outputs:
    assert out.shape == image.shape and out.min() >= 0
    np.testing.assert_allclose(out.sum(axis=(0, 1)), image.sum(axis=(0, 1)), rtol=1e-6)
    # η-profile is only ever mirrored (never mixed with φ): rows are a permutation of flipped rows.
    eta_profile = out.sum(axis=(1, 2))
    assert np.allclose(eta_profile, image.sum(axis=(1, 2))) or np.allclose(
      eta_profile, image.sum(axis=(1, 2))[::-1]
    )
  assert len({o.tobytes() for o in outputs}) > 10


def test_simclr_views_differ_and_keep_empty_pixels_empty():
  image = _sparse_image()
  record = augment.SimCLRViews(channel_dropout_probability=1.0).random_map(
    {"image": image[None], "index": np.zeros(1, np.int64)}, np.random.default_rng(0)
  )
  assert "image" not in record and record["index"][0] == 0
  for view in (record["view1"][0], record["view2"][0]):
    assert view.shape == image.shape and view.min() >= 0
    assert np.count_nonzero(view) <= np.count_nonzero(image)
    assert 1 <= sum(view[..., c].sum() == 0 and image[..., c].sum() > 0 for c in range(8)) <= 2
  assert not np.array_equal(record["view1"], record["view2"])


def test_pixel_scale_divides_images_only():
  record = augment.ScalePixels(255.0).map({"image": np.full((2, 2, 8), 255.0, np.float32), "mass": 90.0})
  assert record["image"].max() == 1.0 and record["mass"] == 90.0


# --- pipeline ---------------------------------------------------------------------------------------


def _records(n=37):
  return [
    {"image": np.full((5, 5, 8), i, np.float32), "index": np.int64(i), "label": np.int32(i % 2)}
    for i in range(n)
  ]


def test_restored_iterator_yields_the_same_batches():
  dataset = pipeline.make_train_dataset(_records(), batch_size=4, seed=3, augmentation="physics")
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(12)]  # crosses epoch boundaries
  restored = iter(dataset)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["image"], want["image"])


def test_epochs_are_reshuffled_and_each_epoch_is_a_permutation():
  dataset = pipeline.make_train_dataset(_records(36), batch_size=4, seed=0, augmentation="none")
  iterator = iter(dataset)
  epochs = [np.concatenate([next(iterator)["index"] for _ in range(9)]) for _ in range(2)]
  assert sorted(epochs[0]) == list(range(36)) and sorted(epochs[1]) == list(range(36))
  assert not np.array_equal(epochs[0], epochs[1])


def test_process_shards_are_disjoint_and_cover_the_data():
  seen = []
  for process in range(2):
    iterator = iter(
      pipeline.make_train_dataset(
        _records(37), batch_size=3, seed=0, augmentation="none", process_index=process, process_count=2
      )
    )
    seen.append(np.concatenate([next(iterator)["index"] for _ in range(6)]))
  assert set(seen[0]).isdisjoint(seen[1])
  assert len(set(seen[0]) | set(seen[1])) == 36  # 37 trimmed to equal shards of 18


def test_each_process_draws_its_own_augmentations_and_redraws_them_on_resume():
  """Every record holds the same image, so batch j of each process differs only by its augmentation:
  with Grain's (seed, batch index) alone, every process would flip, roll, drop and jitter alike."""
  image = _sparse_image()
  records = [{"image": image, "index": np.int64(i)} for i in range(32)]
  make = lambda process: iter(
    pipeline.make_train_dataset(
      records, batch_size=4, seed=0, augmentation="simclr", process_index=process, process_count=2
    )
  )
  first, second = make(0), make(1)
  for _ in range(3):
    a, b = next(first), next(second)
    assert not np.array_equal(a["view1"], b["view1"]) and not np.array_equal(a["view2"], b["view2"])
  state = second.get_state()
  expected = [next(second) for _ in range(5)]  # crosses an epoch boundary (4 batches per epoch)
  for iterator in (make(1), make(1)):  # a restored iterator, and one in a restarted process
    iterator.set_state(state)
    for want in expected:
      got = next(iterator)
      np.testing.assert_array_equal(got["view1"], want["view1"])
      np.testing.assert_array_equal(got["index"], want["index"])
  assert pipeline.augmentation_seed(7, 0) == 8  # a single process draws what it always drew
  assert len({pipeline.augmentation_seed(2**32 - 1, i) for i in range(1024)}) == 1024


def test_eval_pass_visits_every_example_once_with_masked_padding():
  masks, indices, batches = [], [], []
  for process in range(2):
    batches.append(
      list(pipeline.make_eval_dataset(_records(37), batch_size=4, process_index=process, process_count=2))
    )
    for batch in batches[-1]:
      assert batch["image"].shape[0] == 4
      masks.append(batch["mask"])
      indices.append(batch["index"])
  assert len(batches[0]) == len(batches[1])  # equal step counts on every process
  real = np.concatenate(indices)[np.concatenate(masks) == 1]
  assert sorted(real) == list(range(37))


def test_train_dataset_rejects_too_few_examples():
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_train_dataset(_records(3), batch_size=4, seed=0, augmentation="none")


def test_multiprocess_workers_read_hdf5_lazily(jet_file):
  source = hdf5.HDF5Source(jet_file, labelled=True)
  single = iter(pipeline.make_train_dataset(source, batch_size=4, seed=1, augmentation="simclr"))
  workers = iter(
    pipeline.make_train_dataset(source, batch_size=4, seed=1, augmentation="simclr", worker_count=2)
  )
  for _ in range(3):
    a, b = next(single), next(workers)
    np.testing.assert_array_equal(a["view1"], b["view1"])
    np.testing.assert_array_equal(a["index"], b["index"])

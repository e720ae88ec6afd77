"""Shared test fixtures: small hand-made jet files that follow (or deliberately break) the schema."""

import h5py
import numpy as np
import pytest


def write_jet_file(path, num=40, size=25, *, labelled=True, seed=0, overrides=None, drop=()):
  """Writes a sparse random jet file; ``overrides`` replaces datasets by key, ``drop`` removes keys."""
  rng = np.random.default_rng(seed)
  jet = np.zeros((num, size, size, 8), np.float32)
  hits = rng.random(jet.shape) < 0.02
  jet[hits] = rng.exponential(5.0, hits.sum()).astype(np.float32)
  arrays = {"jet": jet}
  if labelled:
    labels = (np.arange(num) % 2).astype(np.float32)
    arrays.update(Y=labels[:, None], m=rng.uniform(50, 300, (num, 1)).astype(np.float32),
                  pT=rng.normal(520, 100, (num, 1)).astype(np.float32))
  arrays.update(overrides or {})
  with h5py.File(path, "w") as f:
    for key, value in arrays.items():
      if key not in drop:
        f.create_dataset(key, data=value)
  return str(path)


@pytest.fixture
def jet_file(tmp_path):
  return write_jet_file(tmp_path / "labelled.h5")

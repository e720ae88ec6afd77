"""Boosted decision trees on jet observables: the physics baseline beside the networks in every report.

  physics_baseline_predictions(labelled_path: str, splits: dict[str, np.ndarray], *, seed: int = 0,
                               cache_dir: str | None = None) -> dict
      → {"index": the 'test' indices sorted, "prob": P(class 1), "mass_pred": mass in GeV}

``splits`` holds 'train', 'val' and 'test' index arrays into the labelled file (HDF5 or ``.sparse``).
scikit-learn's ``HistGradientBoostingClassifier`` (label) and ``HistGradientBoostingRegressor`` (mass)
are fitted on the 'train' examples' observables (``observables.py``) with a fixed ``random_state``; the
'val' examples choose how many boosting iterations to keep (lowest validation log-loss, and lowest
validation MAE for the mass; all MAX_ITERATIONS when 'val' is empty). The regressor fits the mass in GeV
with the absolute-error loss: MAE in GeV is the headline mass metric, and the absolute error is robust to
the long high-mass tail (on 1000 synthetic jets, absolute or squared error on GeV or on log GeV all came
within 0.3 GeV of each other).

The observables of the whole file are computed once and, when ``cache_dir`` is given, kept there in an npz
keyed on the file's absolute path, size and modification time (and the observables' definition), so a
study that calls this many times on one file reads the images once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from absl import logging
from sklearn import ensemble, metrics
from threadpoolctl import threadpool_limits

from l2vit_jax.runtime import paths
from l2vit_jax.baselines import observables
from l2vit_jax.data import sources, substructure

BASELINE_NAME = "physics_bdt"
MAX_ITERATIONS = 300
LEARNING_RATE = 0.1
# The trees fit in seconds on one core. With OpenMP's default of one thread per core, a fit on a busy
# machine (CI, a host also feeding accelerators) was 20× slower than on one thread: spinning threads wait
# on each other.
NUM_THREADS = 1
# Bump when observables.py changes what it computes, so stale caches are not reused.
OBSERVABLES_VERSION = 2

REPORT_DESCRIPTION = f"""\
**{BASELINE_NAME}** is the physics baseline: boosted decision trees (scikit-learn
`HistGradientBoostingClassifier` for the class, `HistGradientBoostingRegressor` with absolute-error loss
for the mass in GeV) on {len(observables.observable_names())} jet observables computed from the pixels,
fitted on the labelled file's train split (number of trees chosen on the validation split) and evaluated
on the same examples as the networks. Observables: invariant mass, vector pT, pT-weighted width (girth)
and N-subjettiness τ1, τ2, τ3, τ21, τ32 (β = 1, R0 = 0.8) of the calorimeter (ECAL + HCAL) constituents
and of the track-pT constituents; the active-pixel count and the energy fraction of each of the 8
channels; the summed intensity. Assumptions: every non-zero pixel is a massless constituent at its cell
centre; cells of 0.0174 × 0.0174 in (η, φ) at 125 × 125 pixels (ECAL crystals; smaller images show the
same window with coarser cells); HCAL towers of 5 × 5 crystals repeated on each crystal (so weighted
1/25); constituents within ΔR < 0.8 of the pT-weighted jet axis; φ periodic with the image width; pixel
values in channel units (the trees learn the calibration). N-subjettiness: FastJet contrib's
Nsubjettiness (normalised measure, OnePass_KT_Axes) on those constituents.
Details: `l2vit_jax/baselines/observables.py`."""


def _cache_path(labelled_path: str, cache_dir: str) -> str:
  stat = os.stat(labelled_path)
  identity = json.dumps(
    [
      os.path.abspath(labelled_path),
      stat.st_size,
      stat.st_mtime_ns,
      OBSERVABLES_VERSION,
      substructure.AXES,
      observables.observable_names(),
    ]
  )
  return paths.join(cache_dir, f"observables-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.npz")


def _read_cache(path: str) -> np.ndarray | None:
  try:
    with np.load(io.BytesIO(paths.as_path(path).read_bytes())) as cached:
      if tuple(cached["names"]) == observables.observable_names():
        return cached["features"]
  except (OSError, ValueError, KeyError) as error:  # a damaged cache is recomputed, not trusted
    logging.warning("Ignoring unreadable observables cache %s: %s", path, error)
  return None


def file_observables(labelled_path: str, *, cache_dir: str | None = None) -> np.ndarray:
  """(N, F) observables of every image of a jet file, read from or written to ``cache_dir``'s cache.

  ``cache_dir`` may be local or ``gs://`` (``runtime.paths``); the cache is written whole or not at all.
  """
  cache = _cache_path(labelled_path, cache_dir) if cache_dir else None
  if cache is not None and paths.exists(cache):
    features = _read_cache(cache)
    if features is not None:
      return features
  source = sources.open_source(labelled_path, labelled=False)
  logging.info("Computing jet observables of %d images of %s", len(source), labelled_path)
  features = observables.source_observables(source)
  if cache is not None:
    paths.write_with(cache, np.savez, features=features, names=np.array(observables.observable_names()))
  return features


def _at_best_stage(staged_val, staged_test, val_loss) -> np.ndarray:
  """Test predictions of the earliest boosting stage with the lowest validation loss."""
  best_loss, best = np.inf, None
  for val_prediction, test_prediction in zip(staged_val, staged_test):
    loss = val_loss(val_prediction)
    if loss < best_loss:
      best_loss, best = loss, test_prediction
  return best


def fit_and_predict(
  features: np.ndarray,
  labels: np.ndarray,
  masses: np.ndarray,
  splits: dict[str, np.ndarray],
  *,
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """Fits the trees on ``splits['train']``, picks iterations on 'val', predicts 'test' (see module doc)."""
  train, test = (np.asarray(splits[name], dtype=np.int64) for name in ("train", "test"))
  val = np.asarray(splits.get("val", ()), dtype=np.int64)
  test = np.sort(test)
  if len(np.unique(labels[train])) < 2:
    raise ValueError(
      "splits['train']: the boosted trees need examples of both classes, found "
      f"{np.unique(labels[train]).tolist()}"
    )
  options = dict(
    max_iter=MAX_ITERATIONS, learning_rate=LEARNING_RATE, early_stopping=False, random_state=seed
  )
  classifier = ensemble.HistGradientBoostingClassifier(**options)
  regressor = ensemble.HistGradientBoostingRegressor(loss="absolute_error", **options)
  with threadpool_limits(limits=NUM_THREADS, user_api="openmp"):
    classifier.fit(features[train], labels[train])
    regressor.fit(features[train], masses[train])
    if len(val):
      prob = _at_best_stage(
        classifier.staged_predict_proba(features[val]),
        classifier.staged_predict_proba(features[test]),
        lambda p: metrics.log_loss(labels[val], p, labels=classifier.classes_),
      )
      mass_pred = _at_best_stage(
        regressor.staged_predict(features[val]),
        regressor.staged_predict(features[test]),
        lambda m: metrics.mean_absolute_error(masses[val], m),
      )
    else:
      prob, mass_pred = classifier.predict_proba(features[test]), regressor.predict(features[test])
  class_one = list(classifier.classes_).index(1)
  return {
    "index": test,
    "prob": prob[:, class_one].astype(np.float64),
    "mass_pred": mass_pred.astype(np.float64),
  }


def physics_baseline_predictions(
  labelled_path: str, splits: dict[str, np.ndarray], *, seed: int = 0, cache_dir: str | None = None
) -> dict[str, np.ndarray]:
  """Boosted-tree predictions for ``splits['test']`` of a labelled file (signature in the module doc)."""
  labels = sources.read_labels(labelled_path)
  features = file_observables(labelled_path, cache_dir=cache_dir)
  if len(features) != len(labels["label"]):
    raise ValueError(f"{labelled_path}: {len(features)} observables rows for {len(labels['label'])} labels")
  return fit_and_predict(features, labels["label"], labels["mass"].astype(np.float64), splits, seed=seed)

"""Frozen-feature probes: how good are a backbone's features, without finetuning it?

Self-supervised toolkits (solo-learn, lightly) judge a backbone by simple models on its frozen
features; big_vision's ``evaluators/fewshot_lsr.py`` does it with closed-form ridge regression. Here:

- ``extract_features(backbone, source, *, pixel_scale, batch_size, mesh)``
  → ``{"index": (N,) int64, "features": (N, D) float32}``: ``L2ViT.features`` (final LayerNorm, mean
  over tokens) in eval mode, for every record of ``source`` once, sorted by index, on every process.
- ``fit_linear_probe(train_features, train_labels, train_mass_z, val_features, val_labels, val_mass_z,
  *, l2_grid=DEFAULT_L2_GRID)`` → ``LinearProbe``: L2-regularised least squares for the class (targets
  0/1) and the standardised mass, the ridge strength chosen separately for each by validation (class:
  ROC-AUC, mass: MAE). ``LinearProbe.predict(features)`` → ``(prob (N,) in [0, 1], mass_z (N,))``.
- ``knn_class_probability(train_features, train_labels, query_features, *, k=20)`` → ``(Q,)``:
  cosine-similarity kNN; ``knn_mean`` averages any per-example value (the mass) the same way.
- ``probe_checkpoint(directory, labelled_path, splits, *, batch_size, mesh, k=20)`` → ``{"index",
  "prob", "mass_pred", "knn_prob", "knn_mass_pred"}`` (test indices sorted; masses in GeV): both probes
  on the backbone of any checkpoint (pretraining, finetuned or imported), fitted on ``splits["train"]``,
  ridge strength chosen on ``splits["val"]``, predicted on ``splits["test"]``.
- ``probe_metrics(fit, select, evaluate, *, mass_mean, mass_std, k=20)`` → ``linear_accuracy``,
  ``linear_auc``, ``linear_mass_mae`` (GeV), ``knn_accuracy``, ``knn_auc`` on ``evaluate``.
- ``online_probe(config)`` → ``OnlineProbe`` or None: the per-epoch probe of SimCLR/MAE pretraining
  (``config.online_probe``), which ``training.loop`` calls at validation time; its metrics land in
  ``metrics.jsonl`` as ``probe/linear_accuracy``, ``probe/linear_auc``, ``probe/linear_mass_mae`` (GeV),
  ``probe/knn_accuracy`` and ``probe/knn_auc``.

Everything after feature extraction is deterministic float64 numpy, so in multi-process runs every
process fits the same probe on the same gathered features and the processes stay in step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from l2vit_jax import models
from l2vit_jax.checkpoint import model_io
from l2vit_jax.evaluation import inference
from l2vit_jax.runtime import sharding
from l2vit_jax.data import sources, split
from l2vit_jax.evaluation import metrics

# Ridge strengths in units of the standardised features: λ ≈ N penalises as much as the data pulls.
DEFAULT_L2_GRID = tuple(float(10.0**e) for e in np.arange(-2.0, 5.01, 0.5))
# Feature standard deviations get this added (as big_vision): constant features do not blow up.
STD_EPSILON = 1e-5
# kNN similarity temperature: weights exp(cos / T), as the kNN monitor of Wu et al. (2018) and
# solo-learn; T → ∞ gives the plain neighbour fraction, small T trusts the closest neighbours most.
KNN_TEMPERATURE = 0.07
# Rows of queries per kNN block: a (block, N_train) float32 similarity matrix (1024 × 7000 = 28 MB).
KNN_CHUNK = 1024
# The online probe's fit subset is split once more: this fraction chooses the ridge strength.
ONLINE_SELECTION_FRACTION = 0.25


# --- features ---------------------------------------------------------------------------------------


# The graph definition is hashable and static: one compilation per architecture, reused every epoch.
@functools.partial(jax.jit, static_argnums=0)
def _pooled_features(graphdef, state, images):
  return nnx.merge(graphdef, state).features(images).astype(jnp.float32)


def extract_features(
  backbone: models.L2ViT, source: Sequence[dict], *, pixel_scale: float, batch_size: int, mesh
) -> dict[str, np.ndarray]:
  """Pooled features of ``backbone`` (set to eval mode) for every record of ``source``.

  Returns:
    ``{"index": (N,) int64, "features": (N, D) float32}``, sorted by index, the same on every process.
  """
  backbone.eval()
  graphdef, state = nnx.split(backbone)
  state = sharding.replicate(state, mesh)
  return inference.map_source(
    lambda images: {"features": _pooled_features(graphdef, state, images)},
    source,
    pixel_scale=pixel_scale,
    batch_size=batch_size,
    mesh=mesh,
  )


# --- linear probe: closed-form ridge ----------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_platt_scaling(
  scores: np.ndarray, labels: np.ndarray, *, iterations: int = 100
) -> tuple[float, float]:
  """(a, b) of P(y=1 | s) = sigmoid(a·s + b) by maximum likelihood (Platt, 1999).

  Platt's smoothed targets ((N₊+1)/(N₊+2) and 1/(N₋+2) instead of 1 and 0) keep the optimum finite
  when the scores separate the classes. Newton's method with step halving on the convex log-loss.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1) == 1
  num_pos, num_neg = labels.sum(), (~labels).sum()
  targets = np.where(labels, (num_pos + 1.0) / (num_pos + 2.0), 1.0 / (num_neg + 2.0))
  design = np.stack([scores, np.ones_like(scores)], axis=1)

  def loss(params):
    z = design @ params
    return float(np.sum(np.logaddexp(0.0, z) - targets * z))

  params = np.array([0.0, np.log((num_pos + 1.0) / (num_neg + 1.0))])
  current = loss(params)
  for _ in range(iterations):
    p = _sigmoid(design @ params)
    gradient = design.T @ (p - targets)
    hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-12 * np.eye(2)
    direction = np.linalg.solve(hessian, gradient)
    step = 1.0
    while step > 1e-10 and loss(params - step * direction) > current:
      step *= 0.5
    params = params - step * direction
    previous, current = current, loss(params)
    if previous - current < 1e-12 * max(abs(previous), 1.0):
      break
  return float(params[0]), float(params[1])


@dataclasses.dataclass(frozen=True, eq=False)
class LinearProbe:
  """A fitted linear probe on standardised features (see ``fit_linear_probe``).

  Class score s = x·w_class + b_class (least squares on 0/1 targets); its probability is
  sigmoid(platt_slope · s + platt_offset), Platt-scaled on the validation scores: monotone in s (the
  ROC is the score's) and calibrated, where clipping s to [0, 1] would tie many jets at 0 and 1.
  """

  mean: np.ndarray  # (D,) train feature means
  std: np.ndarray  # (D,) train feature standard deviations (+ STD_EPSILON)
  class_weights: np.ndarray  # (D,)
  class_bias: float
  mass_weights: np.ndarray  # (D,)
  mass_bias: float
  platt_slope: float
  platt_offset: float
  class_l2: float  # the chosen ridge strengths
  mass_l2: float
  l2_grid: tuple[float, ...]
  val_auc: tuple[float, ...]  # per l2_grid entry (accuracy instead when validation has one class)
  val_mass_mae: tuple[float, ...]  # per l2_grid entry, in standardised-mass units

  def standardise(self, features: np.ndarray) -> np.ndarray:
    return (np.asarray(features, np.float64) - self.mean) / self.std

  def class_score(self, features: np.ndarray) -> np.ndarray:
    """The uncalibrated linear class score (its logit before Platt scaling)."""
    return self.standardise(features) @ self.class_weights + self.class_bias

  def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class-1 probability in [0, 1], standardised mass) for features (N, D)."""
    prob = _sigmoid(self.platt_slope * self.class_score(features) + self.platt_offset)
    return prob, self.standardise(features) @ self.mass_weights + self.mass_bias


def _class_selection_metric(labels: np.ndarray, scores: np.ndarray) -> float:
  if np.unique(labels).size < 2:  # AUC is undefined: fall back to accuracy at the 0/1 midpoint
    return metrics.accuracy(labels, np.clip(scores, 0.0, 1.0))
  return metrics.roc_auc(labels, scores)


def ridge_path(x: np.ndarray, targets: np.ndarray, l2_grid: Sequence[float]) -> list[np.ndarray]:
  """Ridge weights (D, T) of centred ``targets`` (N, T) on ``x`` (N, D) for every λ, from one eigh.

  With N ≥ D, w(λ) = Q (E + λ)⁻¹ Qᵀ xᵀy from xᵀx = Q E Qᵀ; with D > N the same through x xᵀ
  (w = xᵀ Q (E + λ)⁻¹ Qᵀ y), as big_vision's fewshot_lsr. Each λ then costs one (D, K)·(K, T) product.
  """
  if x.shape[0] >= x.shape[1]:
    eigenvalues, q = np.linalg.eigh(x.T @ x)
    lhs, rhs = q, q.T @ (x.T @ targets)
  else:
    eigenvalues, q = np.linalg.eigh(x @ x.T)
    lhs, rhs = x.T @ q, q.T @ targets
  eigenvalues = np.maximum(eigenvalues, 0.0)  # round-off can leave tiny negatives
  return [lhs @ (rhs / (eigenvalues + l2)[:, None]) for l2 in l2_grid]


def fit_linear_probe(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  train_mass_z: np.ndarray,
  val_features: np.ndarray,
  val_labels: np.ndarray,
  val_mass_z: np.ndarray,
  *,
  l2_grid: Sequence[float] = DEFAULT_L2_GRID,
) -> LinearProbe:
  """Closed-form L2-regularised least squares for class (0/1 targets) and standardised mass.

  Features are standardised with the train statistics. Their train means are then zero, so the bias
  column decouples from the weights: the bias is the target mean, unpenalised (as scikit-learn's
  ``Ridge(fit_intercept=True)``; big_vision approximates this with a large constant bias feature).
  xᵀx is eigendecomposed once and the ridge strength swept over ``l2_grid``; the class λ maximises the
  validation ROC-AUC, the mass λ minimises the validation MAE (ties go to the stronger λ).
  """
  grid = tuple(sorted(float(l2) for l2 in l2_grid))
  if not grid or grid[0] <= 0:
    raise ValueError(f"l2_grid must hold positive ridge strengths, got {tuple(l2_grid)}")
  train_features = np.asarray(train_features, np.float64)
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + STD_EPSILON
  x = (train_features - mean) / std
  targets = np.stack(
    [np.asarray(train_labels, np.float64).reshape(-1), np.asarray(train_mass_z, np.float64).reshape(-1)],
    axis=1,
  )
  bias = targets.mean(axis=0)
  weights = ridge_path(x, targets - bias, grid)

  x_val = (np.asarray(val_features, np.float64) - mean) / std
  val_labels = np.asarray(val_labels).reshape(-1)
  val_mass_z = np.asarray(val_mass_z, np.float64).reshape(-1)
  val_predictions = [x_val @ w + bias for w in weights]
  val_auc = [_class_selection_metric(val_labels, p[:, 0]) for p in val_predictions]
  val_mae = [float(np.mean(np.abs(p[:, 1] - val_mass_z))) for p in val_predictions]
  last = len(grid) - 1  # scanning from the strongest λ makes ties pick it
  class_choice = last - int(np.argmax(val_auc[::-1]))
  mass_choice = last - int(np.argmin(val_mae[::-1]))
  slope, offset = fit_platt_scaling(val_predictions[class_choice][:, 0], val_labels)
  return LinearProbe(
    mean=mean,
    std=std,
    class_weights=weights[class_choice][:, 0],
    class_bias=float(bias[0]),
    mass_weights=weights[mass_choice][:, 1],
    mass_bias=float(bias[1]),
    platt_slope=slope,
    platt_offset=offset,
    class_l2=grid[class_choice],
    mass_l2=grid[mass_choice],
    l2_grid=grid,
    val_auc=tuple(val_auc),
    val_mass_mae=tuple(val_mae),
  )


# --- kNN ----------------------------------------------------------------------------------------------


def _unit_rows(features: np.ndarray) -> np.ndarray:
  features = np.asarray(features, np.float32)
  return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_mean(
  train_features: np.ndarray,
  train_values: np.ndarray,
  query_features: np.ndarray,
  *,
  k: int = 20,
  temperature: float = KNN_TEMPERATURE,
) -> np.ndarray:
  """Similarity-weighted mean of ``train_values`` over each query's k nearest training examples.

  Neighbours are by cosine similarity (features L2-normalised); neighbour i weighs exp(cos_i / T),
  normalised over the k. Queries go in blocks of ``KNN_CHUNK`` rows, so memory stays
  O(KNN_CHUNK · N_train) whatever the query count.

  Returns:
    (Q,) float64 for (N,) values, or (Q, M) for (N, M).
  """
  bank = _unit_rows(train_features)
  queries = _unit_rows(query_features)
  values = np.asarray(train_values, np.float64)
  k = min(int(k), len(bank))
  if k < 1:
    raise ValueError(f"kNN needs k ≥ 1 and a non-empty training set (k={k}, N={len(bank)})")
  out = np.empty((len(queries),) + values.shape[1:], np.float64)
  for start in range(0, len(queries), KNN_CHUNK):
    similarity = queries[start : start + KNN_CHUNK] @ bank.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(similarity, nearest, axis=1).astype(np.float64)
    weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)  # the max cancels out
    weights /= weights.sum(axis=1, keepdims=True)
    out[start : start + KNN_CHUNK] = np.einsum("qk,qk...->q...", weights, values[nearest])
  return out


def knn_class_probability(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  query_features: np.ndarray,
  *,
  k: int = 20,
  temperature: float = KNN_TEMPERATURE,
) -> np.ndarray:
  """(Q,) class-1 probability: the similarity-weighted fraction of class-1 among the k neighbours."""
  labels = (np.asarray(train_labels).reshape(-1) == 1).astype(np.float64)
  return knn_mean(train_features, labels, query_features, k=k, temperature=temperature)


# --- probing a checkpoint -----------------------------------------------------------------------------


def _labelled_features(
  backbone,
  labelled: sources.LabelledFile,
  indices: np.ndarray,
  *,
  mass_mean: float,
  mass_std: float,
  pixel_scale: float,
  batch_size: int,
  mesh,
) -> dict:
  """Features of the labelled jets ``indices`` with their label, mass (GeV) and standardised mass."""
  out = extract_features(
    backbone, labelled.source(indices), pixel_scale=pixel_scale, batch_size=batch_size, mesh=mesh
  )
  out["label"] = labelled.labels["label"][out["index"]]
  out["mass"] = labelled.labels["mass"][out["index"]].astype(np.float64)
  out["mass_z"] = (out["mass"] - mass_mean) / mass_std
  return out


def _fit_and_predict(
  fit: Mapping, select: Mapping, query: Mapping, *, k: int, mass_mean: float, mass_std: float
) -> dict[str, np.ndarray]:
  probe = fit_linear_probe(
    fit["features"], fit["label"], fit["mass_z"], select["features"], select["label"], select["mass_z"]
  )
  prob, mass_z = probe.predict(query["features"])
  return {
    "index": query["index"],
    "prob": prob,
    "mass_pred": split.destandardise_mass(mass_z, mass_mean, mass_std),
    "knn_prob": knn_class_probability(fit["features"], fit["label"], query["features"], k=k),
    "knn_mass_pred": knn_mean(fit["features"], fit["mass"], query["features"], k=k),
  }


def probe_checkpoint(
  directory: str,
  labelled: sources.LabelledFile,
  splits: Mapping[str, np.ndarray],
  *,
  batch_size: int,
  mesh,
  k: int = 20,
) -> dict[str, np.ndarray]:
  """Linear and kNN probes on the frozen backbone of ``directory``, evaluated on ``splits["test"]``.

  Args:
    directory: a training workdir (pretraining or finetuning) or imported weights.
    labelled: the labelled file (HDF5 or ``.sparse``) that ``splits`` index.
    splits: ``train`` (probe fit and kNN memory), ``val`` (ridge strength and calibration), ``test``.
    batch_size: global batch of the feature pass.
    mesh: device mesh; every process must call this.
    k: kNN neighbours.

  Returns:
    ``index`` (sorted test indices), ``prob`` and ``mass_pred`` (GeV) of the linear probe,
    ``knn_prob`` and ``knn_mass_pred`` (GeV) of the kNN probe; masses are standardised with the
    train-split mean and standard deviation for the linear fit.
  """
  backbone, meta = model_io.restore_backbone(directory)
  labelled.check_image_size(meta["model_config"], directory)
  mass_mean, mass_std = labelled.mass_statistics(splits["train"])
  features = {
    part: _labelled_features(
      backbone,
      labelled,
      np.asarray(splits[part]),
      mass_mean=mass_mean,
      mass_std=mass_std,
      pixel_scale=meta.get("pixel_scale", 1.0),
      batch_size=batch_size,
      mesh=mesh,
    )
    for part in ("train", "val", "test")
  }
  return _fit_and_predict(
    features["train"], features["val"], features["test"], k=k, mass_mean=mass_mean, mass_std=mass_std
  )


def probe_metrics(
  fit: Mapping, select: Mapping, evaluate: Mapping, *, mass_mean: float, mass_std: float, k: int = 20
) -> dict[str, float | None]:
  """Accuracy, ROC-AUC and mass MAE (GeV) of the linear probe and kNN, fitted on ``fit``.

  Each argument holds ``features``, ``label``, ``mass`` (GeV) and ``mass_z`` (standardised with
  ``mass_mean``/``mass_std``); ``select`` chooses the ridge strength and calibrates, ``evaluate`` is
  scored. AUCs are None when ``evaluate`` holds one class.
  """
  out = _fit_and_predict(fit, select, evaluate, k=k, mass_mean=mass_mean, mass_std=mass_std)
  labels = evaluate["label"]
  two_classes = np.unique(labels).size == 2
  return {
    "linear_accuracy": metrics.accuracy(labels, out["prob"]),
    "linear_auc": metrics.roc_auc(labels, out["prob"]) if two_classes else None,
    "linear_mass_mae": metrics.mass_mae(evaluate["mass"], out["mass_pred"]),
    "knn_accuracy": metrics.accuracy(labels, out["knn_prob"]),
    "knn_auc": metrics.roc_auc(labels, out["knn_prob"]) if two_classes else None,
  }


# --- online probe during pretraining ------------------------------------------------------------------


@dataclasses.dataclass
class OnlineProbe:
  """The probe ``training.loop`` runs at validation time of SimCLR/MAE pretraining (``config.online_probe``).

  Three fixed stratified subsets of the labelled file: ``fit`` and ``select`` from its train split
  (ridge fit and kNN memory; ridge-strength choice), ``evaluate`` from its validation split (what is
  logged). Features come from the ``encoder`` of the model being trained, in eval mode.
  """

  labelled: sources.LabelledFile
  subsets: dict[str, np.ndarray]
  mass_mean: float
  mass_std: float
  pixel_scale: float
  batch_size: int
  every_epochs: int
  num_epochs: float
  k: int

  def due(self, epoch: float) -> bool:
    """Every ``every_epochs``-th epoch, and at the end of training."""
    return round(epoch) % self.every_epochs == 0 or epoch >= self.num_epochs

  def __call__(self, model: nnx.Module, state: tuple, mesh, *, epoch: float) -> dict[str, float]:
    """``probe/*`` metrics of ``model.encoder`` with the current ``state``; {} when not due.

    Args:
      model: the pretraining model (``ContrastiveModel`` or ``MaskedImageModel``); only its structure
        is used, so the training loop's module is left as it is.
      state: its current (params, batch_stats, other) states, as the train step returns them.
      mesh: the device mesh; every process must call this.
      epoch: the epoch just finished.
    """
    if not self.due(epoch):
      return {}
    backbone = nnx.merge(nnx.graphdef(model), *state).encoder  # a copy: eval mode stays local
    features = {
      name: _labelled_features(
        backbone,
        self.labelled,
        indices,
        mass_mean=self.mass_mean,
        mass_std=self.mass_std,
        pixel_scale=self.pixel_scale,
        batch_size=self.batch_size,
        mesh=mesh,
      )
      for name, indices in self.subsets.items()
    }
    scores = probe_metrics(
      features["fit"],
      features["select"],
      features["evaluate"],
      mass_mean=self.mass_mean,
      mass_std=self.mass_std,
      k=self.k,
    )
    return {f"probe/{key}": value for key, value in scores.items() if value is not None}


def online_probe(config) -> OnlineProbe | None:
  """The online probe ``config.online_probe`` asks for, or None when its ``labelled_path`` is empty.

  The labelled file is validated here (before a run touches its workdir) and split as finetuning
  splits it (``data.split_seed``); subsets are prefixes of ``split.stratified_order`` (seed
  ``online_probe.seed``), so they keep the class balance and stay the same all run long.
  """
  settings = config.get("online_probe")
  if settings is None or not settings.get("labelled_path"):
    return None
  path = settings.labelled_path
  labelled = sources.open_labelled(path, split_seed=config.data.split_seed, image_size=config.model.img_size)
  labels, parts = labelled.labels, labelled.parts
  seed = int(settings.get("seed", 0))
  fit_pool = split.stratified_order(labels["label"], parts["train"], seed=seed)[: settings.num_train]
  num_select = max(int(round(ONLINE_SELECTION_FRACTION * len(fit_pool))), 1)
  subsets = {
    "fit": np.sort(fit_pool[num_select:]),
    "select": np.sort(fit_pool[:num_select]),
    "evaluate": np.sort(split.stratified_order(labels["label"], parts["val"], seed=seed)[: settings.num_val]),
  }
  if int(settings.every_epochs) < 1:
    raise ValueError(f"config.online_probe.every_epochs must be ≥ 1, got {settings.every_epochs}")
  if len(subsets["fit"]) < 2 or not len(subsets["evaluate"]):
    raise ValueError(
      f"{path}: config.online_probe needs at least 3 train-split and 1 validation-split "
      f"jets, found {len(parts['train'])} and {len(parts['val'])}"
    )
  mass_mean, mass_std = labelled.mass_statistics(parts["train"])
  logging.info(
    "Online probe: %s, fit/select/evaluate on %s jets, every %d epoch(s)",
    path,
    "/".join(str(len(v)) for v in subsets.values()),
    settings.every_epochs,
  )
  return OnlineProbe(
    labelled=labelled,
    subsets=subsets,
    mass_mean=mass_mean,
    mass_std=mass_std,
    pixel_scale=float(config.data.pixel_scale),
    batch_size=config.eval_batch_size,
    every_epochs=int(settings.every_epochs),
    num_epochs=config.num_epochs,
    k=int(settings.k),
  )

"""Frozen-feature probes: closed-form ridge, kNN, features of a backbone, online and offline probing."""

import json
import os
import runpy

import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config, write_jet_file
from l2vit_jax import models
from l2vit_jax import errors
from l2vit_jax.evaluation import evaluate, probes
from l2vit_jax.models import build
from l2vit_jax.runtime import sharding
from l2vit_jax.training import loop
from l2vit_jax.data import sources, split
from l2vit_jax.evaluation import metrics, plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _regression_data(rng, num, dim, noise=1.0):
  features = rng.normal(size=(num, dim)) * rng.uniform(0.5, 3.0, dim) + rng.normal(size=dim)
  direction = rng.normal(size=dim)
  latent = features @ direction
  labels = (latent + noise * rng.normal(size=num) > np.median(latent)).astype(np.int64)
  mass_z = 0.5 * latent / latent.std() + noise * rng.normal(size=num)
  return features, labels, mass_z


@pytest.mark.parametrize("num, dim", [(80, 12), (15, 40)])  # x^T x and x x^T eigendecompositions
def test_ridge_equals_sklearn_ridge(num, dim):
  linear_model = pytest.importorskip("sklearn.linear_model")
  rng = np.random.default_rng(0)
  features, labels, mass_z = _regression_data(rng, num, dim)
  for l2 in (0.1, 3.0, 300.0):
    probe = probes.fit_linear_probe(
      features, labels, mass_z, features[:6], labels[:6], mass_z[:6], l2_grid=(l2,)
    )
    x = probe.standardise(features)
    for target, weights, bias in (
      (labels, probe.class_weights, probe.class_bias),
      (mass_z, probe.mass_weights, probe.mass_bias),
    ):
      reference = linear_model.Ridge(alpha=l2).fit(x, target)
      np.testing.assert_allclose(weights, reference.coef_, atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(bias, reference.intercept_, atol=1e-5)
    np.testing.assert_allclose(probe.predict(features)[1], reference.predict(x), atol=1e-5)


def test_ridge_strength_is_chosen_by_validation_for_each_target():
  rng = np.random.default_rng(1)
  features, labels, mass_z = _regression_data(rng, 140, 30, noise=1.5)
  fit, val = slice(0, 60), slice(60, None)  # few examples per feature: the strength matters
  grid = (0.01, 1.0, 30.0, 1000.0, 1e5)
  probe = probes.fit_linear_probe(
    features[fit], labels[fit], mass_z[fit], features[val], labels[val], mass_z[val], l2_grid=grid
  )
  aucs, maes = [], []
  for l2 in grid:  # each strength fitted on its own
    single = probes.fit_linear_probe(
      features[fit], labels[fit], mass_z[fit], features[val], labels[val], mass_z[val], l2_grid=(l2,)
    )
    aucs.append(metrics.roc_auc(labels[val], single.class_score(features[val])))
    maes.append(np.mean(np.abs(single.predict(features[val])[1] - mass_z[val])))
  np.testing.assert_allclose(probe.val_auc, aucs, atol=1e-12)
  np.testing.assert_allclose(probe.val_mass_mae, maes, atol=1e-12)
  assert len(set(np.round(maes, 9))) == len(grid)  # the choice is not a tie
  assert probe.class_l2 == grid[len(grid) - 1 - int(np.argmax(aucs[::-1]))]
  assert probe.mass_l2 == grid[int(np.argmin(maes))]


def test_linear_probe_on_separable_features_beats_chance():
  rng = np.random.default_rng(2)
  labels = np.arange(600) % 2
  mass = np.where(labels == 1, 175.0, 90.0) + rng.normal(0, 10, 600)
  features = rng.normal(size=(600, 16))
  features[:, 0] += 3.0 * labels
  features[:, 1] += (mass - 130.0) / 20.0
  mass_z = (mass - mass[:400].mean()) / mass[:400].std()
  probe = probes.fit_linear_probe(
    features[:300], labels[:300], mass_z[:300], features[300:400], labels[300:400], mass_z[300:400]
  )
  prob, predicted_z = probe.predict(features[400:])
  assert ((prob >= 0) & (prob <= 1)).all()
  assert metrics.accuracy(labels[400:], prob) > 0.9
  assert metrics.roc_auc(labels[400:], prob) > 0.95
  assert np.mean(np.abs(predicted_z - mass_z[400:])) < 0.5 * np.mean(np.abs(mass_z[400:]))


def test_knn_probabilities_on_two_clusters_are_exact():
  bank = np.array([[1, 0], [2, 0], [3, 0.0], [0, 1], [0, 5]], np.float32)  # class 1 on x, 0 on y
  labels = np.array([1, 1, 1, 0, 0])
  queries = np.array([[5, 0], [0, 2], [1, 1.0]])
  # k=4 from (5, 0): three class-1 neighbours at cosine 1 (weight e = exp(1/T)), one class-0 at
  # cosine 0 (weight 1); from (0, 2): two class-0 at cosine 1, two (of three) class-1 at cosine 0.
  e = np.exp(1 / probes.KNN_TEMPERATURE)
  got = probes.knn_class_probability(bank, labels, queries[:2], k=4)
  np.testing.assert_allclose(got, [3 * e / (3 * e + 1), 2 / (2 * e + 2)], rtol=1e-6)
  # (1, 1) is equally similar to all five: weights are equal, so 3 of the 5 (k ≥ N is clipped to N).
  np.testing.assert_allclose(probes.knn_class_probability(bank, labels, queries[2:], k=10), [0.6], rtol=1e-6)
  # A huge temperature makes it the plain neighbour fraction.
  plain = probes.knn_class_probability(bank, labels, queries[:2], k=4, temperature=1e9)
  np.testing.assert_allclose(plain, [0.75, 0.5], rtol=1e-6)
  # Blocks of queries give the same answer as one block.
  many = np.repeat(queries[:2], 1500, axis=0)
  np.testing.assert_allclose(
    probes.knn_class_probability(bank, labels, many, k=4), np.repeat(got, 1500), rtol=1e-12
  )


def test_features_cover_every_record_once_in_index_order(jet_file):
  config = tiny_config("finetune", jet_file)
  backbone = models.L2ViT(**build.model_kwargs(config.model.to_dict()), rngs=nnx.Rngs(0))
  indices = np.sort([3, 1, 4, 15, 9, 26, 5, 35, 8, 37, 2])  # 11: the last batch is padded

  def features(chosen):
    source = sources.open_source(jet_file, labelled=True, indices=chosen)
    return probes.extract_features(backbone, source, pixel_scale=2.0, batch_size=4, mesh=sharding.make_mesh())

  out = features(indices)
  np.testing.assert_array_equal(out["index"], indices)
  assert out["features"].shape == (11, config.model.embed_dim)
  assert out["features"].dtype == np.float32 and np.isfinite(out["features"]).all()
  # Each row belongs to its index: the same jets in other batch positions give the same rows, and
  # different jets give different rows.
  subset = features(indices[1::3])
  np.testing.assert_array_equal(subset["index"], indices[1::3])
  np.testing.assert_allclose(subset["features"], out["features"][1::3], atol=1e-6)
  assert np.abs(np.diff(out["features"], axis=0)).max(axis=1).min() > 1e-4


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
  """A tiny SimCLR run with the online probe on: 2 epochs of 3 steps."""
  root = tmp_path_factory.mktemp("probes")
  labelled = write_jet_file(root / "labelled.h5", num=64)
  unlabelled = write_jet_file(root / "unlabelled.h5", num=32, labelled=False)
  config = tiny_config("simclr", labelled, unlabelled, **{"online_probe.labelled_path": labelled})
  workdir = str(root / "simclr")
  loop.train_and_evaluate(config, workdir)
  return {"labelled": labelled, "workdir": workdir, "config": config}


def test_online_probe_logs_probe_metrics_every_epoch(simclr_run):
  with open(os.path.join(simclr_run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  epochs = [r for r in records if "val/loss" in r]
  assert [r["epoch"] for r in epochs] == [1.0, 2.0]
  for record in epochs:
    for key in ("probe/linear_accuracy", "probe/linear_auc", "probe/knn_accuracy", "probe/knn_auc"):
      assert 0.0 <= record[key] <= 1.0, key
    assert record["probe/linear_mass_mae"] > 0
  assert not any(k.startswith("probe/") for r in records if "val/loss" not in r for k in r)
  # The training-curves plot gets a probe panel.
  assert any(matches("probe/linear_auc") for label, matches in plots._PANELS if "probe" in label)


def test_online_probe_is_off_without_a_labelled_path_and_skips_epochs(simclr_run):
  config = simclr_run["config"].copy_and_resolve_references()
  assert probes.online_probe(config).due(2.0)
  config.online_probe.every_epochs = 2
  probe = probes.online_probe(config)
  assert not probe.due(1.0) and probe.due(2.0)
  fit, select, held = (probe.subsets[k] for k in ("fit", "select", "evaluate"))
  parts = split.stratified_split(probe.labelled.labels["label"])
  assert set(fit) | set(select) <= set(parts["train"]) and not set(fit) & set(select)
  assert set(held) <= set(parts["val"])
  config.online_probe.labelled_path = ""
  assert probes.online_probe(config) is None


def test_probe_checkpoint_of_a_simclr_run(simclr_run):
  labelled = sources.open_labelled(simclr_run["labelled"], split_seed=split.SPLIT_SEED)
  labels, splits = labelled.labels, labelled.parts
  out = probes.probe_checkpoint(
    simclr_run["workdir"], labelled, splits, batch_size=16, mesh=sharding.make_mesh(), k=5
  )
  assert set(out) == {"index", "prob", "mass_pred", "knn_prob", "knn_mass_pred"}
  np.testing.assert_array_equal(out["index"], splits["test"])
  for key in ("prob", "knn_prob"):
    assert out[key].shape == (len(splits["test"]),) and ((out[key] >= 0) & (out[key] <= 1)).all()
  for key in ("mass_pred", "knn_mass_pred"):
    assert out[key].shape == (len(splits["test"]),) and np.isfinite(out[key]).all()
  masses = labels["mass"][splits["train"]]  # a weighted mean of neighbours stays in their range
  assert masses.min() <= out["knn_mass_pred"].min() and out["knn_mass_pred"].max() <= masses.max()


def test_evaluate_with_probe_reports_probe_rows_of_a_pretraining_checkpoint(simclr_run, tmp_path):
  config = tiny_config("evaluate", simclr_run["labelled"])
  config.checkpoints = f"simclr={simclr_run['workdir']}"
  config.split = "test"
  config.bootstrap_samples = 20
  config.report_title = "probe report"
  config.report_notes = ""
  config.probe = True
  config.probe_k = 5
  out = str(tmp_path / "report")
  results = evaluate.evaluate_checkpoints(config, out)
  assert set(results) == {"simclr_linear_probe", "simclr_knn"}  # no supervised row for a backbone
  report = open(os.path.join(out, "report.md")).read()
  assert "simclr_linear_probe" in report and "simclr_knn" in report
  for row in results:
    assert 0 <= results[row]["accuracy"] <= 1 and results[row]["mass_mae"] > 0
    assert os.path.exists(os.path.join(out, row, "predictions.npz"))
  assert os.path.exists(os.path.join(out, "simclr_linear_probe", "training_curves.png"))
  config.probe = False  # without probes, a pretraining checkpoint is still refused
  with pytest.raises(errors.CheckpointMismatchError, match="pretraining .* --config.probe=True"):
    evaluate.evaluate_checkpoints(config, str(tmp_path / "refused"))


def test_quickstart_pretraining_stages_run_the_online_probe(tmp_path):
  from l2vit_jax.experiments import quickstart  # pylint: disable=import-outside-toplevel

  config = runpy.run_path(os.path.join(REPO, "configs", "quickstart.py"))["get_config"]()
  config.pretrain = "both"
  files = {"labelled": str(tmp_path / "labelled.h5"), "unlabelled": str(tmp_path / "unlabelled.h5")}
  stages = quickstart.stage_configs(config, str(tmp_path), files)
  assert {name for name, stage in stages.items() if stage.online_probe.labelled_path} == {"simclr", "mae"}
  assert stages["simclr"].online_probe.labelled_path == files["labelled"]

"""Jet observables on hand-computed images, and the boosted-tree physics baseline on synthetic jets."""

from __future__ import annotations

import os
import runpy

import h5py
import numpy as np
import pytest

from conftest import tiny_config
from l2vit_jax.baselines import bdt, observables
from l2vit_jax.data import detector, sources, split, synthetic

CELL = 0.05  # (η, φ) size of a pixel in the hand-made images
SIZE = 40  # pixels per side: a 2.0 × 2.0 window, wider than the 0.8 cone
ECAL, HCAL, TRACK = observables.ECAL, observables.HCAL, observables.TRACK_PT


def _image(deposits, size=SIZE):
  """One (size, size, 8) image with value v at (row, col, channel) for each (row, col, channel, v)."""
  image = np.zeros((size, size, 8), np.float32)
  for row, col, channel, value in deposits:
    image[row, col, channel] = value
  return image


def _observe(*images, **kwargs) -> list[dict[str, float]]:
  kwargs.setdefault("cell_size", CELL)
  values = observables.compute_observables(np.stack(images), **kwargs)
  return [dict(zip(observables.observable_names(), row)) for row in values]


def _massless_pair_mass(pt1, pt2, d_eta, d_phi):
  return np.sqrt(2 * pt1 * pt2 * (np.cosh(d_eta) - np.cos(d_phi)))


def test_names_match_columns():
  names = observables.observable_names()
  assert len(set(names)) == len(names)
  assert observables.compute_observables(np.zeros((2, 8, 8, 8), np.float32)).shape == (2, len(names))


def test_one_pixel_is_a_massless_jet_without_width():
  (jet,) = _observe(_image([(20, 20, ECAL, 50.0)]))
  assert jet["calo_mass"] == 0 and jet["calo_girth"] == 0
  assert jet["calo_pt"] == pytest.approx(50.0)
  for name in ("tau1", "tau2", "tau3", "tau21", "tau32"):
    assert jet[f"calo_{name}"] == 0
  assert jet["track_pt"] == 0 and jet["active_pixels_ecal"] == 1 and jet["fraction_ecal"] == 1


def test_two_equal_pixels_mass_width_and_subjettiness():
  # Δη = 3 cells, Δφ = 4 cells: ΔR = 5 cells = 0.25.
  (jet,) = _observe(_image([(18, 17, ECAL, 40.0), (21, 21, ECAL, 40.0)]))
  d_eta, d_phi = 3 * CELL, 4 * CELL
  assert jet["calo_mass"] == pytest.approx(_massless_pair_mass(40, 40, d_eta, d_phi), rel=1e-9)
  assert jet["calo_girth"] == pytest.approx(0.25 / 2)  # the axis is the midpoint
  # Any axis on the segment gives Σ pT ΔR = 40 × 0.25; normalised by Σ pT R0 = 80 × 0.8.
  assert jet["calo_tau1"] == pytest.approx(0.25 / (2 * 0.8), rel=1e-6)
  assert jet["calo_tau2"] == pytest.approx(0, abs=1e-12) and jet["calo_tau21"] == pytest.approx(0, abs=1e-10)


def test_three_prongs_have_zero_tau3():
  prongs = [(20, 20, ECAL, 100.0), (14, 24, ECAL, 60.0), (25, 13, ECAL, 30.0)]
  (jet,) = _observe(_image(prongs))
  centres = [((row + 0.5) * CELL, (col + 0.5) * CELL, pt) for row, col, _, pt in prongs]
  mass_squared = sum(
    _massless_pair_mass(a[2], b[2], a[0] - b[0], a[1] - b[1]) ** 2
    for i, a in enumerate(centres)
    for b in centres[i + 1 :]
  )
  assert jet["calo_mass"] == pytest.approx(np.sqrt(mass_squared), rel=1e-9)
  assert jet["calo_tau3"] == pytest.approx(0, abs=1e-12) and jet["calo_tau32"] == pytest.approx(0, abs=1e-10)
  assert jet["calo_tau1"] > jet["calo_tau2"] > 0
  # τ2 ≈ the value with axes on the two hardest prongs (only the 30 GeV prong is away from an axis):
  # FastJet's OnePass_KT_Axes end within 0.1 % of that minimum (one pass, not an exact minimiser).
  nearest = min(np.hypot(5 - dr, -7 - dc) for dr, dc in ((0, 0), (-6, 4))) * CELL
  assert jet["calo_tau2"] <= 30 * nearest / (190 * 0.8) * (1 + 1e-3)


def test_tracks_and_calorimeter_are_separate_sets_and_hcal_is_weighted_per_tower():
  # At 125 × 125 (default cells of one ECAL crystal) an HCAL tower is 5 × 5 pixels repeating its value.
  tower = [(row, col, HCAL, 25.0) for row in range(60, 65) for col in range(60, 65)]
  (jet,) = _observe(_image(tower + [(62, 62, TRACK, 7.0)], size=125), cell_size=None)
  assert jet["calo_pt"] == pytest.approx(25.0, rel=1e-3)  # 25 pixels × 25 / 25, nearly collinear
  assert jet["calo_girth"] > 0 and jet["track_pt"] == pytest.approx(7.0) and jet["track_mass"] == 0
  assert observables.default_cell_size(125) == pytest.approx(0.0174)


def test_channel_counts_and_energy_fractions():
  deposits = [
    (1, 1, TRACK, 2.0),
    (2, 2, TRACK, 2.0),
    (3, 3, ECAL, 6.0),
    (4, 4, HCAL, 5.0),
    (5, 5, 5, 10.0),
    (6, 6, 7, 15.0),
  ]
  (jet,) = _observe(_image(deposits))
  counts = {
    "track_pt": 2,
    "track_d0": 0,
    "track_dz": 0,
    "ecal": 1,
    "hcal": 1,
    "pixel_layer_1": 1,
    "pixel_layer_2": 0,
    "pixel_layer_3": 1,
  }
  sums = {"track_pt": 4, "ecal": 6, "hcal": 5, "pixel_layer_1": 10, "pixel_layer_3": 15}
  for channel, count in counts.items():
    assert jet[f"active_pixels_{channel}"] == count
    assert jet[f"fraction_{channel}"] == pytest.approx(sums.get(channel, 0) / 40)
  assert jet["total_intensity"] == 40


def test_phi_wraps_around_the_image_edges():
  # Pixels in the first and last columns are one cell apart in φ.
  (edge,) = _observe(_image([(20, 0, ECAL, 30.0), (20, SIZE - 1, ECAL, 30.0)]))
  assert edge["calo_mass"] == pytest.approx(_massless_pair_mass(30, 30, 0, CELL), rel=1e-9)
  # A jet rolled in φ until it straddles the edges keeps all its observables.
  rng = np.random.default_rng(0)
  jet = _image(
    [
      (18 + int(r), 18 + int(c), channel, float(v))
      for r, c, channel, v in zip(
        rng.integers(-5, 6, 30),
        rng.integers(-5, 6, 30),
        rng.choice([TRACK, ECAL, HCAL], 30),
        rng.uniform(1, 50, 30),
      )
    ]
  )
  centred, rolled = _observe(jet, np.roll(jet, SIZE // 2, axis=1))
  assert rolled["calo_mass"] > 0
  np.testing.assert_allclose(list(rolled.values()), list(centred.values()), rtol=1e-9, atol=1e-12)


def test_constituents_outside_the_jet_radius_are_ignored():
  # 1.0 away from the hard pixel: outside the 0.8 cone around the axis.
  (jet,) = _observe(_image([(10, 20, ECAL, 100.0), (30, 20, ECAL, 0.01)]))
  assert jet["calo_mass"] == 0 and jet["calo_pt"] == pytest.approx(100.0)
  assert jet["active_pixels_ecal"] == 2  # channel counts cover the whole image


def test_empty_images_are_zero_and_do_not_disturb_their_chunk():
  jets = [_image([]), _image([(20, 20, ECAL, 5.0), (22, 25, HCAL, 3.0), (21, 19, TRACK, 1.0)]), _image([])]
  together = observables.compute_observables(np.stack(jets), cell_size=CELL)
  assert np.isfinite(together).all() and not together[[0, 2]].any()
  alone = observables.compute_observables(np.stack(jets[1:2]), cell_size=CELL)
  np.testing.assert_array_equal(together[1], alone[0])


def test_synthetic_jets_have_ordered_subjettiness_and_a_mass_that_tracks_the_truth(tmp_path):
  path = str(tmp_path / "jets.h5")
  synthetic.write_synthetic_hdf5(path, 64, seed=3, image_size=25)
  source = sources.open_source(path, labelled=True)
  features = observables.source_observables(source, chunk_size=10)
  np.testing.assert_allclose(features, observables.source_observables(source, chunk_size=64), rtol=1e-12)
  jet = dict(zip(observables.observable_names(), features.T))
  assert (jet["calo_tau1"] >= jet["calo_tau2"]).all() and (jet["calo_tau2"] >= jet["calo_tau3"]).all()
  assert ((jet["calo_tau21"] >= 0) & (jet["calo_tau21"] <= 1)).all()
  assert np.corrcoef(jet["calo_mass"], sources.read_labels(path)["mass"])[0, 1] > 0.8


def test_bad_image_shape_is_refused():
  with pytest.raises(ValueError, match=r"\(N, H, W, 8\)"):
    observables.compute_observables(np.zeros((2, 8, 8, 3)))


@pytest.fixture(scope="module")
def synthetic_labelled(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bdt") / "labelled.h5")
  synthetic.write_synthetic_hdf5(path, 480, labelled=True, seed=1, image_size=25)
  return path


def test_boosted_trees_beat_chance_and_the_median_mass(synthetic_labelled, tmp_path, monkeypatch):
  labels = sources.read_labels(synthetic_labelled)
  splits = split.stratified_split(labels["label"])
  cache = str(tmp_path / "cache")
  predicted = bdt.physics_baseline_predictions(synthetic_labelled, splits, seed=0, cache_dir=cache)
  np.testing.assert_array_equal(predicted["index"], splits["test"])
  label, mass = labels["label"][splits["test"]], labels["mass"][splits["test"]]
  assert np.mean((predicted["prob"] > 0.5) == label) > 0.8
  median_mae = np.mean(np.abs(np.median(labels["mass"][splits["train"]]) - mass))
  assert np.mean(np.abs(predicted["mass_pred"] - mass)) < 0.7 * median_mae

  # A second call reads the cached observables instead of the images, and predicts the same.
  assert len(os.listdir(cache)) == 1
  monkeypatch.setattr(observables, "source_observables", lambda *a, **k: pytest.fail("recomputed"))
  again = bdt.physics_baseline_predictions(synthetic_labelled, splits, seed=0, cache_dir=cache)
  for key, value in predicted.items():
    np.testing.assert_array_equal(again[key], value)


def test_evaluation_and_quickstart_reports_include_the_baseline():
  from l2vit_jax.experiments import quickstart  # pylint: disable=import-outside-toplevel

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  configs = {
    name: runpy.run_path(os.path.join(repo, "configs", f"{name}.py"))["get_config"]()
    for name in ("evaluate", "quickstart")
  }
  assert configs["evaluate"].physics_baseline
  files = {"labelled": "l.h5", "unlabelled": "u.h5"}
  assert quickstart.stage_configs(configs["quickstart"], "runs/q", files)["evaluate"].physics_baseline


def test_a_checkpoint_named_like_the_baseline_is_refused(tmp_path):
  from l2vit_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel

  config = tiny_config("evaluate", str(tmp_path / "labelled.h5"))
  config.checkpoints = f"{bdt.BASELINE_NAME}={tmp_path / 'run'}"
  config.physics_baseline = True
  with pytest.raises(ValueError, match="physics baseline's row"):
    evaluate.evaluate_checkpoints(config, str(tmp_path / "report"))


# --- N-subjettiness held against FastJet on Pythia jets ---------------------------------------------


@pytest.fixture(scope="module")
def pythia_jets(tmp_path_factory):
  pytest.importorskip("pythia8mc")
  from l2vit_jax.data import jet_files  # pylint: disable=import-outside-toplevel

  path = str(tmp_path_factory.mktemp("pythia") / "jets.h5")
  jet_files.write_pythia_hdf5(path, 240, labelled=True, seed=3, image_size=125, workers=2, progress=False)
  with h5py.File(path) as f:
    return f["jet"][:]


def test_image_tau_n_equals_fastjet_njettiness_on_the_same_pixel_constituents(pythia_jets):
  """τ1–τ3 of the ``calo`` and ``track`` columns, against FastJet contrib's Nsubjettiness run here on
  the pixel constituents (β = 1, R0 = 0.8, normalised measure, OnePass_KT_Axes) of 240 Pythia jets."""
  ak = pytest.importorskip("awkward")
  fastjet = pytest.importorskip("fastjet")
  columns = observables.compute_observables(pythia_jets)
  names = observables.observable_names()
  cell = observables.default_cell_size(pythia_jets.shape[2])
  deposits = observables.Deposits.from_images(pythia_jets)
  for group, weights in observables.constituent_weights(cell).items():
    jet = observables.find_constituents(deposits, weights, cell, detector.JET_RADIUS)
    counts = np.bincount(jet.image, minlength=jet.num_images)
    assert (counts > 0).all()
    vectors = ak.unflatten(
      ak.Array(
        {
          "px": jet.pt * np.cos(jet.phi),
          "py": jet.pt * np.sin(jet.phi),
          "pz": jet.pt * np.sinh(jet.eta),
          "E": jet.pt * np.cosh(jet.eta),
        }
      ),
      counts,
    )
    sequence = fastjet.ClusterSequence(vectors, fastjet.JetDefinition(fastjet.antikt_algorithm, 10.0))
    reference = sequence.njettiness(
      measure_definition="NormalizedMeasure",
      axes_definition="OnePass_KT_Axes",
      njets=[1, 2, 3],
      beta=1.0,
      R0=0.8,
    )
    reference = np.asarray(ak.to_numpy(reference), dtype=np.float64).reshape(len(counts), 3)  # (jet, N)
    for n in (1, 2, 3):
      np.testing.assert_allclose(
        columns[:, names.index(f"{group}_tau{n}")], reference[:, n - 1], rtol=1e-9, err_msg=f"{group} tau{n}"
      )
  tau32 = columns[:, names.index("calo_tau32")]
  assert 0.2 < np.median(tau32) < 0.95  # real substructure, not degenerate values

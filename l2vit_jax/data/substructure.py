"""N-subjettiness through FastJet contrib's Nsubjettiness, the field's reference implementation, for
particle-level jets (the Pythia sidecar) and for pixel constituents (the physics baseline) alike.

τ_N = Σ_i pT_i min_k ΔR(i, axis_k) / (R0 Σ_i pT_i) (``NormalizedMeasure``, β = 1, R0 = 0.8), axes
``OnePass_KT_Axes`` (exclusive kT axes, then one pass of the minimisation; Thaler and Van Tilburg,
2011). Each jet's constituents are clustered back into one jet with anti-kT R = 10, so every
constituent counts.
"""

from __future__ import annotations

import os
import sys

import numpy as np

MEASURE = "NormalizedMeasure"
AXES = "OnePass_KT_Axes"
BETA = 1.0
R0 = 0.8
MAX_SUBJETS = 3

_QUIET = [False]


def quiet_fastjet() -> None:
  """Prints FastJet's banner into /dev/null: it goes to stdout on a process's first clustering, which
  would land in the middle of a progress bar or a report. Idempotent."""
  if _QUIET[0]:
    return
  import fastjet  # pylint: disable=import-outside-toplevel
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    with open(os.devnull, "w", encoding="utf-8") as devnull:
      os.dup2(devnull.fileno(), 1)
      fastjet.ClusterSequence([fastjet.PseudoJet(1.0, 0.0, 0.0, 1.0)],
                              fastjet.JetDefinition(fastjet.antikt_algorithm, 0.8)).inclusive_jets()
  finally:
    os.dup2(saved, 1)
    os.close(saved)
  _QUIET[0] = True


def njettiness(px: np.ndarray, py: np.ndarray, pz: np.ndarray, energy: np.ndarray, counts: np.ndarray,
               *, r0: float = R0, max_subjets: int = MAX_SUBJETS) -> np.ndarray:
  """(num_jets, max_subjets) τ_1 … τ_max of jets whose constituents are the flat 4-vector arrays cut
  into ``counts`` consecutive runs (jet j owns ``counts[j]`` of them); jets without constituents get 0."""
  import awkward as ak  # pylint: disable=import-outside-toplevel
  import fastjet  # pylint: disable=import-outside-toplevel
  counts = np.asarray(counts, dtype=np.int64)
  taus = np.zeros((len(counts), max_subjets))
  filled = counts > 0
  if not filled.any():
    return taus
  quiet_fastjet()
  # Jets without constituents own no entries of the flat arrays: the runs are the filled jets'.
  vectors = ak.unflatten(ak.Array({"px": px, "py": py, "pz": pz, "E": energy}), counts[filled])
  sequence = fastjet.ClusterSequence(vectors, fastjet.JetDefinition(fastjet.antikt_algorithm, 10.0))
  measured = sequence.njettiness(measure_definition=MEASURE, axes_definition=AXES,
                                 njets=list(range(1, max_subjets + 1)), beta=BETA, R0=r0)
  taus[filled] = np.asarray(ak.to_numpy(measured), dtype=np.float64).reshape(int(filled.sum()),
                                                                            max_subjets)
  return taus

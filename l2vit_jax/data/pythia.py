"""Top and QCD jets from Pythia 8 and FastJet, rendered by the CMS-like detector model (detector.py).

Physics. pp collisions at √s = 13 TeV with Pythia's defaults for showers, hadronisation, multi-parton
interactions and decays (no pile-up):

* Signal: tt̄ (``Top:gg2ttbar``, ``Top:qqbar2ttbar``) with both W bosons forced to decay to quarks
  (``24:onMode = off``, ``24:onIfAny = 1 2 3 4 5``). A jet is a top jet when every parton of a
  hadronically decaying top — its b and the q, q′ of its W, taken where they are created, before their
  showers — lies within ΔR < 0.8 of the jet axis (fully merged tops, as in top-tagging samples). Forcing
  both W's doubles the top jets per event, and the only change it makes to a selected jet is to what
  the *other* top leaves in the image window: two hadronic tops instead of the natural 46 % (lepton +
  jets otherwise). The tops are back to back in φ to within the ISR recoil, and the window reaches only
  ±1.09 from the axis, so this touches the window's edge in rare, hard-ISR events; the tagged top, its
  decay and its b-hadron decays (leptons included) are untouched.
* Background: QCD 2 → 2 (``HardQCD:all``); each of the two highest-pT jets of the event is a candidate.
* Both: anti-kT R = 0.8 (FastJet) on all visible final-state particles (neutrinos excluded); a jet is
  kept when its pT is inside the window (default 400–600 GeV, the real dataset's boosted regime) and
  |η| < 1.4 (barrel). ``PhaseSpace:pTHatMin`` is 0.7 × the window's lower edge (280 GeV for 400–600),
  a trade between bias and speed, measured at 400–600 GeV with pTHatMin = 235 on ~100 window jets per
  class: a jet can carry more pT than its hard process (ISR recoil, the underlying event or other
  radiation in the cone), and a cut at pTHat = 340 (0.85×) lost 27 % of the QCD and 13 % of the top
  window jets — the low-pT-edge jets with hard ISR — at 1.8 and 3.3 events per window jet; 280 loses
  ≈ 8 % and 3 % (±3 %) at 3.8 and 6.7 events per jet; 240 loses ≈ 1 % at 8 and 11.5 events per jet.

The image of a jet is ``detector.jet_image`` of every visible final-state particle of its event,
centred on the jet axis: the window shows the underlying event and neighbouring jets, as real images do.

Labels. ``m`` and ``pT`` are the *particle-level* jet's (invariant mass and pT of the clustered visible
particles, E-scheme), not quantities measured from the image: the detector model is a tunable
approximation, and labels that move whenever a gain is retuned would make mass-window selections,
mass decorrelation and regression targets depend on it. The real files' ``m`` and ``pT`` are
reconstructed-jet values, which differ from these by the detector's resolution (≈ 10 % in mass).

Determinism. ``generate_chunk`` is a pure function of (seed, chunk index, counts, image size, pT
window) and the installed Pythia, FastJet and numpy: each class of each chunk runs its own Pythia
instance seeded from ``SeedSequence(seed, spawn_key=(chunk, class, 0))``, and the detector's smearing
draws from ``(chunk, class, 1)``; the jets of both classes are then shuffled with ``(chunk, 2)``. So
chunks can be generated in any order, in any process (jet_files.py relies on this).

N-subjettiness. τ1, τ2, τ3 of each jet's constituents from FastJet contrib's Nsubjettiness through
``substructure.njettiness`` (``NormalizedMeasure``, β = 1, R0 = 0.8, so τ_N = Σ pT_i min_k ΔR_ik /
(R0 Σ pT_i) is dimensionless; ``OnePass_KT_Axes``), the same code as the physics baseline's.
"""

from __future__ import annotations

import numpy as np

from l2vit_jax.data import detector, substructure

QCD, TOP = 0, 1
CLASS_NAMES = {QCD: "qcd", TOP: "top"}
CENTRE_OF_MASS_GEV = 13000.0
JET_ETA_MAX = 1.4
PT_HAT_MIN_FRACTION = 0.7  # see the module docstring
CLUSTER_PT_MIN_GEV = 20.0  # jets below this play no part (QCD candidates are the two leading jets)
# A class's generator gives up after this many events per requested jet: the windows allowed by
# jet_files.check_arguments need a few events per jet, so this only stops a loop that cannot end.
MAX_EVENTS_PER_JET = 1000
# Per-constituent columns of the sidecar, in this order.
CONSTITUENT_COLUMNS = ("px", "py", "pz", "e", "charge", "pdg_id")
PYTHIA_MAX_SEED = 900_000_000


def library_versions() -> dict[str, str]:
  """The versions a chunk's content depends on (a resume with others starts afresh)."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  return {name: metadata.version(name) for name in ("pythia8mc", "fastjet", "numpy")}


def _seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
  return np.random.SeedSequence(seed, spawn_key=key)


def pythia_seed(seed: int, chunk_index: int, kind: int) -> int:
  """Pythia's seed for one class of one chunk, in 1..900,000,000 (Pythia's range)."""
  state = _seed_sequence(seed, chunk_index, kind, 0).generate_state(1, dtype=np.uint64)[0]
  return int(state % PYTHIA_MAX_SEED) + 1


def pythia_settings(kind: int, pt_min: float, seed: int) -> list[str]:
  process = (["Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "24:onMode = off", "24:onIfAny = 1 2 3 4 5"]
             if kind == TOP else ["HardQCD:all = on"])
  return [f"Beams:eCM = {CENTRE_OF_MASS_GEV}", *process,
          f"PhaseSpace:pTHatMin = {PT_HAT_MIN_FRACTION * pt_min:.6g}", "Random:setSeed = on",
          f"Random:seed = {seed}", "Print:quiet = on"]


def make_pythia(kind: int, pt_min: float, seed: int):
  import pythia8mc  # pylint: disable=import-outside-toplevel
  generator = pythia8mc.Pythia("", False)  # no banner
  for line in pythia_settings(kind, pt_min, seed):
    if not generator.readString(line):
      raise RuntimeError(f"Pythia refused the setting {line!r}")
  if not generator.init():
    raise RuntimeError(f"Pythia failed to initialise with {pythia_settings(kind, pt_min, seed)}")
  return generator


# ---------------------------------------------------------------------------------------------------
# One event.


def visible_final_state(event) -> detector.Particles:
  rows = [(q.px(), q.py(), q.pz(), q.e(), round(q.charge()), q.id(), q.xProd(), q.yProd(), q.zProd())
          for q in event if q.isFinal() and q.isVisible()]
  columns = np.array(rows, dtype=np.float64).reshape(-1, 9).T
  return detector.Particles.from_columns(**dict(zip(
      ("px", "py", "pz", "e", "charge", "pdg_id", "x", "y", "z"), columns)))


def _p4(particle) -> tuple[float, float, float, float]:
  return (particle.e(), particle.px(), particle.py(), particle.pz())


def hadronic_top_partons(event) -> list[np.ndarray]:
  """(3, 4) arrays (E, px, py, pz) of the b, q, q′ of each hadronically decaying top of the event.

  The top is followed to its last copy (after the recoils of initial- and final-state radiation), whose
  daughters are the b and the W as created in the decay; the W's last copy's daughters are q and q′.
  """
  found = []
  for i in range(event.size()):
    top = event[i]
    if top.idAbs() != 6 or top.statusAbs() != 22:  # the hard process's tops
      continue
    last = event[top.iBotCopyId()]
    daughters = [event[d] for d in last.daughterList()]
    b = [d for d in daughters if d.idAbs() == 5]
    w = [d for d in daughters if d.idAbs() == 24]
    if len(b) != 1 or len(w) != 1:
      continue
    quarks = [event[d] for d in event[w[0].iBotCopyId()].daughterList()]
    if len(quarks) != 2 or not all(1 <= q.idAbs() <= 5 for q in quarks):
      continue
    found.append(np.array([_p4(b[0]), _p4(quarks[0]), _p4(quarks[1])]))
  return found


def eta_phi(p4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pseudorapidity and azimuth of (..., 4) arrays (E, px, py, pz)."""
  pt = np.hypot(p4[..., 1], p4[..., 2])
  return np.arcsinh(p4[..., 3] / pt), np.arctan2(p4[..., 2], p4[..., 1])


def delta_r(eta1, phi1, eta2, phi2) -> np.ndarray:
  return np.hypot(np.subtract(eta1, eta2), detector.wrap_phi(np.subtract(phi1, phi2)))


def cluster(particles: detector.Particles) -> tuple[list, object]:
  """Anti-kT R = 0.8 jets above CLUSTER_PT_MIN_GEV, hardest first; constituents carry the particle's
  index in ``particles`` as user_index. Returns (jets, cluster sequence): the jets' constituents live
  only as long as the sequence."""
  import fastjet  # pylint: disable=import-outside-toplevel
  inputs = []
  for index, (px, py, pz, e) in enumerate(zip(particles.px, particles.py, particles.pz, particles.e)):
    pseudojet = fastjet.PseudoJet(float(px), float(py), float(pz), float(e))
    pseudojet.set_user_index(index)
    inputs.append(pseudojet)
  sequence = fastjet.ClusterSequence(inputs, fastjet.JetDefinition(fastjet.antikt_algorithm,
                                                                    detector.JET_RADIUS))
  return fastjet.sorted_by_pt(sequence.inclusive_jets(CLUSTER_PT_MIN_GEV)), sequence


def _in_window(jet, pt_range: tuple[float, float]) -> bool:
  return pt_range[0] <= jet.pt() < pt_range[1] and abs(jet.eta()) < JET_ETA_MAX and jet.m() > 0


def top_jets(jets: list, partons: list[np.ndarray], pt_range) -> list[tuple[int, np.ndarray]]:
  """(rank, partons) of jets that contain all three partons of a top and pass the window.

  Of several jets containing a top's partons (only possible for R = 0.8 jets closer than 1.6), the one
  nearest the top's direction wins; a jet is used for one top at most.
  """
  selected, used = [], set()
  for top in partons:
    parton_eta, parton_phi = eta_phi(top)
    top_eta, top_phi = eta_phi(top.sum(axis=0))
    best = None
    for rank, jet in enumerate(jets):
      if rank in used or np.any(delta_r(parton_eta, parton_phi, jet.eta(), jet.phi_std())
                                >= detector.JET_RADIUS):
        continue
      distance = float(delta_r(top_eta, top_phi, jet.eta(), jet.phi_std()))
      if best is None or distance < best[0]:
        best = (distance, rank)
    if best is not None and _in_window(jets[best[1]], pt_range):
      used.add(best[1])
      selected.append((best[1], top))
  return selected


def qcd_jets(jets: list, pt_range) -> list[tuple[int, np.ndarray]]:
  """(rank, no partons) of the event's two leading jets that pass the window."""
  no_partons = np.full((3, 4), np.nan)
  return [(rank, no_partons) for rank, jet in enumerate(jets[:2]) if _in_window(jet, pt_range)]


def _constituents(jet, particles: detector.Particles) -> np.ndarray:
  """(k, 6) CONSTITUENT_COLUMNS of the jet's particles, hardest first."""
  index = np.array([c.user_index() for c in jet.constituents()], dtype=np.int64)
  pt = np.hypot(particles.px[index], particles.py[index])
  index = index[np.argsort(-pt, kind="stable")]
  return np.stack([getattr(particles, name)[index].astype(np.float64) for name in CONSTITUENT_COLUMNS],
                  axis=1)


# ---------------------------------------------------------------------------------------------------
# Many events.


def class_jets(kind: int, count: int, *, seed: int, chunk_index: int, image_size: int,
               pt_range: tuple[float, float], model: detector.DetectorModel = detector.CMS
               ) -> list[dict]:
  """The first ``count`` selected jets of one class's event stream for this chunk, as dicts.

  Jets are taken in event order (within an event: the top record's order, or by pT for QCD); the
  images of the last event's unused jets are never drawn, so the detector's random stream depends
  only on the jets kept.
  """
  if count == 0:
    return []
  substructure.quiet_fastjet()
  generator = make_pythia(kind, pt_range[0], pythia_seed(seed, chunk_index, kind))
  rng = np.random.default_rng(_seed_sequence(seed, chunk_index, kind, 1))
  jets_out: list[dict] = []
  events = 0
  while len(jets_out) < count:
    if events >= MAX_EVENTS_PER_JET * count:
      raise RuntimeError(f"{CLASS_NAMES[kind]} jets: {len(jets_out)} of {count} found in {events} "
                         f"events for pT in {pt_range} GeV; giving up")
    events += 1
    if not generator.next():
      continue  # Pythia's own rare failures; its next event follows from its random stream
    particles = visible_final_state(generator.event)
    jets, sequence = cluster(particles)
    selected = (top_jets(jets, hadronic_top_partons(generator.event), pt_range) if kind == TOP
                else qcd_jets(jets, pt_range))
    for rank, partons in selected[:count - len(jets_out)]:
      jet = jets[rank]
      jets_out.append({
          "image": detector.jet_image(particles, jet.eta(), jet.phi_std(), rng, image_size=image_size,
                                      model=model),
          "label": kind, "mass": jet.m(), "pt": jet.pt(), "eta": jet.eta(), "phi": jet.phi_std(),
          "rank": rank, "partons": partons, "event": events - 1,
          "constituents": _constituents(jet, particles)})
    del sequence  # the jets' constituents are read; the sequence may go
  return jets_out


def _nsubjettiness(constituents: list[np.ndarray]) -> np.ndarray:
  """(n, 3) τ1, τ2, τ3 of each jet's (k, CONSTITUENT_COLUMNS) constituents."""
  if not constituents:
    return np.zeros((0, substructure.MAX_SUBJETS))
  flat = np.concatenate(constituents)
  return substructure.njettiness(flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 3],
                                 np.array([len(c) for c in constituents]))


def generate_chunk(seed: int, chunk_index: int, num_top: int, num_qcd: int, *, image_size: int,
                   pt_range: tuple[float, float], model: detector.DetectorModel = detector.CMS
                   ) -> dict[str, np.ndarray]:
  """``num_top`` top and ``num_qcd`` QCD jets of one chunk, shuffled; see the module docstring.

  Returns ``jet`` (n, S, S, 8) float32, ``Y``/``m``/``pT`` (n, 1) float32 (the file's labels) and the
  particle-level sidecar columns: ``label`` int8, ``mass``/``pt``/``eta``/``phi`` float64, ``tau``
  (n, 3), ``jet_rank`` int8 (pT rank in its event), ``parton_p4`` (n, 3, 4) (b, q, q′ as E, px, py, pz;
  NaN for QCD), ``event`` int32 (its event's number in its class's stream), ``constituent_counts``
  int64 (n,) and ``constituents`` (Σ counts, 6) in CONSTITUENT_COLUMNS order, jet by jet.
  """
  detector.check_image_size(image_size)
  jets = [*class_jets(TOP, num_top, seed=seed, chunk_index=chunk_index, image_size=image_size,
                      pt_range=pt_range, model=model),
          *class_jets(QCD, num_qcd, seed=seed, chunk_index=chunk_index, image_size=image_size,
                      pt_range=pt_range, model=model)]
  order = np.random.default_rng(_seed_sequence(seed, chunk_index, 2)).permutation(len(jets))
  jets = [jets[i] for i in order]
  n = len(jets)
  column = lambda key, dtype: np.array([j[key] for j in jets], dtype=dtype).reshape(n)  # noqa: E731
  constituents = [j["constituents"] for j in jets]
  return {
      "jet": np.stack([j["image"] for j in jets]) if jets
             else np.zeros((0, image_size, image_size, detector.NUM_CHANNELS), np.float32),
      "Y": column("label", np.float32)[:, None],
      "m": column("mass", np.float32)[:, None],
      "pT": column("pt", np.float32)[:, None],
      "label": column("label", np.int8),
      "mass": column("mass", np.float64),
      "pt": column("pt", np.float64),
      "eta": column("eta", np.float64),
      "phi": column("phi", np.float64),
      "tau": _nsubjettiness(constituents),
      "jet_rank": column("rank", np.int8),
      "parton_p4": np.array([j["partons"] for j in jets], dtype=np.float64).reshape(n, 3, 4),
      "event": column("event", np.int32),
      "constituent_counts": np.array([len(c) for c in constituents], dtype=np.int64),
      "constituents": (np.concatenate(constituents) if constituents
                       else np.zeros((0, len(CONSTITUENT_COLUMNS)))),
  }

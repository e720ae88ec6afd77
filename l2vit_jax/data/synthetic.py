"""Synthetic CMS-like jet images with exactly the schema of the real files (docs/design.md, Data).

The real files (4.7 GiB and 28 GiB) cannot be fetched everywhere, so tests and demos run on jets generated
here. The labels must be learnable from the pixels the way they are in the real data, not planted as a
marker, so each image is rendered from a toy event:

* Class 1 (top-like): a boosted top decays t → b W, W → q q' with 4-vector kinematics, giving three hard
  prongs whose invariant mass is near 173 GeV and a W subpair near 80 GeV. Charged tracks from the b
  prong are displaced (larger d0).
* Class 0 (QCD-like): one prong, or two prongs from a parent with a broad, falling mass spectrum and
  soft-enhanced momentum sharing; a few QCD prongs are heavy-flavour (displaced) too.

Each prong fragments into a handful of massless constituents (charged hadrons, photons, neutral hadrons)
with a narrow, pT-dependent angular spread; soft pile-up is sprinkled over the whole window. The labels
``m`` and ``pT`` are the invariant mass and vector pT of every generated particle within ΔR < 0.8 of the
jet axis (an AK8-like jet), so they are what the pixels actually show, pile-up included.

Constituents are drawn on an (η, φ) grid of ECAL-crystal-sized pixels (125 × 0.0174 ≈ ±1.09 around the
jet axis); smaller ``image_size`` values show the same physical window with coarser pixels. Channels
follow the detector: 0 track pT, 1 track |d0|, 2 track |dz| (tracks only, one pixel each), 3 ECAL
(photons plus the electromagnetic part of charged hadrons, a small shower spread), 4 HCAL (hadronic energy
on 5 × 5-crystal towers, hence dense), 5–7 the hits of all charged particles in three pixel-detector
layers. Charged particles bend in the 3.8 T field, so their calorimeter and outer-layer hits move in φ
by an amount ∝ 1/pT. Channel gains and thresholds are tuned so that sparsity and means at 125 × 125 are
close to the real files' (about 99 % zero pixels overall).
"""

from __future__ import annotations

import os
from typing import Callable

import h5py
import numpy as np

from l2vit_jax import errors
from l2vit_jax.runtime import console, paths
from l2vit_jax.data import detector, hdf5

# The geometry — the window (125 crystals of 0.0174, HCAL towers of 5 × 5), the AK8 radius, the
# 8-bit-like saturation, the field and the radii of the calorimeters and pixel layers — is the
# detector's: one definition in detector.py (``detector.X`` below), shared with the Pythia generator and
# the physics baseline.

# Images drawn from one random generator. The generator of block b is seeded from
# SeedSequence(seed, spawn_key=(b,)), so the content of image i depends only on (seed, i, image_size):
# files are identical whatever chunk_size is used to write them, and a shorter file is a prefix of a
# longer one with the same seed.
IMAGES_PER_SEED_BLOCK = 32

# Kinematics (GeV).
JET_PT_MEAN, JET_PT_STD, JET_PT_MIN = 515.0, 100.0, 150.0
TOP_MASS, TOP_MASS_SPREAD = 173.0, 4.0
W_MASS, W_MASS_SPREAD = 80.4, 2.5
TOP_CONTAINMENT_TRIES, TOP_CONTAINMENT_RADIUS = 4, 0.6
QCD_ONE_PRONG_FRACTION = 0.35
QCD_PARENT_MASS_MIN, QCD_PARENT_MASS_SHAPE, QCD_PARENT_MASS_SCALE = 30.0, 1.8, 45.0
QCD_MIN_MOMENTUM_SHARE = 0.05
QCD_HEAVY_FLAVOUR_FRACTION = 0.08
QCD_GLUON_FRACTION = 0.6
# Fragmentation: 2 + Poisson(a + b log(pT / 10 GeV)) constituents (more for gluons), momentum shares
# ~ Gamma(alpha), angular spread (each of Δη, Δφ) kT / pT_i with kT exponential, clipped.
FRAGMENTS_BASE, FRAGMENTS_PER_LOG_PT = 2.0, 4.0
GLUON_MULTIPLICITY_RATIO = 1.5
FRAGMENT_SHARE_ALPHA = 0.6
QUARK_KT, GLUON_KT = 1.0, 2.0
FRAGMENT_SPREAD_MIN, FRAGMENT_SPREAD_MAX = 0.003, 0.3
# Particle species: charged hadron, photon, neutral hadron.
SPECIES_PROBABILITIES = (0.62, 0.26, 0.12)
CHARGED, PHOTON, NEUTRAL_HADRON = 0, 1, 2
# Pile-up and underlying event, over the whole window.
PILEUP_MEAN_COUNT = 80.0
PILEUP_PT_MIN, PILEUP_PT_SCALE = 0.2, 0.5

# Detector response (geometry from detector.py). Bending: Δφ ≈ 0.3 B r / (2 pT) =
# detector.BEND_PER_METRE · r / pT, r in metres.
TRACK_PT_MIN, TRACK_EFFICIENCY = 0.5, 0.92
CALO_PT_MIN = 0.8  # softer charged particles curl up before the calorimeters
D0_RESOLUTION_UM, D0_RESOLUTION_PT_UM = 15.0, 60.0  # σ(d0) = 15 ⊕ 60 / pT µm
DZ_RESOLUTION_UM = 40.0
B_DECAY_LENGTH_UM = 350.0  # mean |d0| of tracks from b-hadron decays
PILEUP_VERTEX_SPREAD_MM = 40.0
D0_THRESHOLD_UM = 12.0
DZ_THRESHOLD_MM = 1.0
# Calorimeter responses: a charged hadron leaves a MIP plus an early-shower fraction in the ECAL.
ECAL_MIP_GEV = 0.3
ECAL_EARLY_SHOWER_MAX = 0.3
HCAL_RESPONSE_MEAN, HCAL_RESPONSE_SPREAD = 0.85, 0.15
HCAL_CENTRAL_SHARE = 0.7  # the rest leaks equally into the four neighbouring towers
ECAL_NEIGHBOUR_SHARE_AT_125 = 0.1  # to each of the four edge neighbours of the hit crystal
PIXEL_HIT_EFFICIENCY = 0.97
PIXEL_CLUSTER_SPLIT_AT_125 = 0.5  # chance that a hit shares its charge with the next φ pixel
PIXEL_NOISE_HITS_PER_LAYER = (30.0, 45.0, 45.0)  # at 125 × 125, scaled with the pixel count
# Gains (channel units per GeV, µm, mm, or hit) and zero-suppression thresholds (channel units),
# tuned so that channel means and zero fractions at 125 × 125 come close to the real files'.
TRACK_PT_GAIN = 4.5
D0_GAIN = 0.6
DZ_GAIN = 1.0
ECAL_GAIN = 10.0
ECAL_THRESHOLD = 0.4
HCAL_GAIN = 4.2
HCAL_THRESHOLD = 3.5
PIXEL_HIT_GAIN = 230.0
PIXEL_HIT_THRESHOLD = 20.0


def _to_pixel(coordinate: np.ndarray, image_size: int) -> np.ndarray:
  """Pixel index along one axis; outside the window gives an index outside [0, image_size)."""
  return np.floor((coordinate + detector.WINDOW_HALF_WIDTH)
                  / detector.pixel_size(image_size)).astype(np.int64)


def _pixel_sums(image_index: np.ndarray, row: np.ndarray, col: np.ndarray, values: np.ndarray,
                size: int) -> tuple[np.ndarray, np.ndarray]:
  """Sums ``values`` landing on the same pixel of (image, size, size) grids.

  Returns (flat pixel index, sum) for the touched pixels inside the window only. Images are ~99 % empty,
  so sparse sums are many times faster than dense per-image arrays.
  """
  inside = (row >= 0) & (row < size) & (col >= 0) & (col < size)
  flat = (image_index[inside] * size + row[inside]) * size + col[inside]
  pixels, inverse = np.unique(flat, return_inverse=True)
  return pixels, np.bincount(inverse, weights=values[inside], minlength=len(pixels))


def _zero_suppress(pixels: np.ndarray, sums: np.ndarray, threshold: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Like detector readout: small signals are dropped, large ones saturate the 8-bit-like range."""
  keep = sums >= threshold
  return pixels[keep], np.minimum(sums[keep], detector.MAX_PIXEL_VALUE)


def _with_neighbours(row: np.ndarray, col: np.ndarray, values: np.ndarray, neighbour_share: float,
                     *extra: np.ndarray) -> tuple[np.ndarray, ...]:
  """Shares ``values`` between a cell and its four edge neighbours (a shower's lateral leakage).

  Returns rows, cols, values and each of ``extra`` repeated five times, ready for ``_pixel_sums``.
  """
  d_row = np.array([0, 1, -1, 0, 0])
  d_col = np.array([0, 0, 0, 1, -1])
  shares = np.array([1 - 4 * neighbour_share] + [neighbour_share] * 4)
  return ((row[None] + d_row[:, None]).ravel(), (col[None] + d_col[:, None]).ravel(),
          (values[None] * shares[:, None]).ravel(), *(np.tile(e, 5) for e in extra))


# ---------------------------------------------------------------------------------------------------
# Kinematics.


def _four_vector(pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, mass: np.ndarray | float = 0.0
                 ) -> np.ndarray:
  """(E, px, py, pz) with a trailing axis of 4."""
  px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
  energy = np.sqrt(px**2 + py**2 + pz**2 + np.square(mass))
  return np.stack([energy, px, py, pz], axis=-1)


def _pt_eta_phi(p4: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  pt = np.hypot(p4[..., 1], p4[..., 2])
  return pt, np.arcsinh(p4[..., 3] / pt), np.arctan2(p4[..., 2], p4[..., 1])


def _boost(p4_rest: np.ndarray, beta: np.ndarray) -> np.ndarray:
  """Lorentz-boosts rest-frame 4-vectors by velocity ``beta`` (..., 3) into the lab frame."""
  beta2 = np.maximum(np.sum(beta**2, axis=-1), 1e-300)
  gamma = 1.0 / np.sqrt(1.0 - beta2)
  energy, momentum = p4_rest[..., 0], p4_rest[..., 1:]
  beta_dot_p = np.sum(beta * momentum, axis=-1)
  lab_energy = gamma * (energy + beta_dot_p)
  scale = (gamma - 1.0) * beta_dot_p / beta2 + gamma * energy
  return np.concatenate([lab_energy[..., None], momentum + scale[..., None] * beta], axis=-1)


def _two_body_decay(parent: np.ndarray, parent_mass: np.ndarray, mass1: np.ndarray | float,
                    mass2: np.ndarray | float, cos_theta: np.ndarray, azimuth: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Decays lab 4-vectors ``parent`` (n, 4) into two daughters.

  ``cos_theta`` is the rest-frame polar angle of daughter 1 measured from the parent's flight direction,
  so a non-uniform ``cos_theta`` controls how asymmetrically the lab momentum is shared.
  """
  m, m1, m2 = parent_mass, np.asarray(mass1, dtype=np.float64), np.asarray(mass2, dtype=np.float64)
  p_star = np.sqrt(np.maximum((m**2 - (m1 + m2)**2) * (m**2 - (m1 - m2)**2), 0.0)) / (2 * m)
  axis = parent[:, 1:] / np.linalg.norm(parent[:, 1:], axis=-1, keepdims=True)
  # Any unit vector orthogonal to the flight axis; the axes here are never parallel to z.
  ortho1 = np.cross(axis, np.array([0.0, 0.0, 1.0]))
  ortho1 /= np.linalg.norm(ortho1, axis=-1, keepdims=True)
  ortho2 = np.cross(axis, ortho1)
  sin_theta = np.sqrt(1.0 - cos_theta**2)
  direction = (cos_theta[:, None] * axis + (sin_theta * np.cos(azimuth))[:, None] * ortho1
               + (sin_theta * np.sin(azimuth))[:, None] * ortho2)
  momentum = p_star[:, None] * direction
  rest1 = np.concatenate([np.sqrt(p_star**2 + m1**2)[:, None], momentum], axis=-1)
  rest2 = np.concatenate([np.sqrt(p_star**2 + m2**2)[:, None], -momentum], axis=-1)
  beta = parent[:, 1:] / parent[:, :1]
  return _boost(rest1, beta), _boost(rest2, beta)


def _top_decays(rng: np.random.Generator, jet_pt: np.ndarray) -> np.ndarray:
  """Partons (num, 3, 4) of t → b W, W → q q' (isotropic decays), keeping fully merged tops.

  Like top-tagging samples, which take tops whose three daughters all lie inside the jet, each decay is
  drawn up to TOP_CONTAINMENT_TRIES times and the first one with every parton within
  TOP_CONTAINMENT_RADIUS of the axis is kept (the last try when none is, as happens for soft tops).
  A fixed number of draws keeps the generator's stream, hence the images, reproducible.
  """
  num = len(jet_pt)
  tries = TOP_CONTAINMENT_TRIES
  pt = np.tile(jet_pt, tries)
  zeros = np.zeros(tries * num)
  top_mass = rng.normal(TOP_MASS, TOP_MASS_SPREAD, tries * num)
  w_mass = rng.normal(W_MASS, W_MASS_SPREAD, tries * num)
  top = _four_vector(pt, zeros, zeros, top_mass)
  b, w = _two_body_decay(top, top_mass, 0.0, w_mass, rng.uniform(-1, 1, tries * num),
                         rng.uniform(0, 2 * np.pi, tries * num))
  q1, q2 = _two_body_decay(w, w_mass, 0.0, 0.0, rng.uniform(-1, 1, tries * num),
                           rng.uniform(0, 2 * np.pi, tries * num))
  partons = np.stack([b, q1, q2], axis=1).reshape(tries, num, 3, 4)
  _, eta, phi = _pt_eta_phi(partons)
  contained = np.all(np.hypot(eta, phi) < TOP_CONTAINMENT_RADIUS, axis=-1)  # (tries, num)
  chosen = np.where(contained.any(axis=0), np.argmax(contained, axis=0), tries - 1)
  return partons[chosen, np.arange(num)]


def _hard_prongs(rng: np.random.Generator, labels: np.ndarray, jet_pt: np.ndarray
                 ) -> tuple[np.ndarray, ...]:
  """Up to three massless partons per jet, whose sum points along the jet axis (η = φ = 0).

  Returns (pt, eta, phi, valid, heavy_flavour, gluon), each (num, 3): top-like jets have b, q, q'; QCD-like
  jets one parton or a soft-enhanced splitting of a parent with a broad, falling mass spectrum.
  """
  num = len(labels)
  is_top = labels == 1
  zeros = np.zeros(num)
  top_partons = _top_decays(rng, jet_pt)

  parent_mass = QCD_PARENT_MASS_MIN + rng.gamma(QCD_PARENT_MASS_SHAPE, QCD_PARENT_MASS_SCALE, num)
  share = np.exp(rng.uniform(np.log(QCD_MIN_MOMENTUM_SHARE), np.log(0.5), num))
  # For a boosted parent the lab share of daughter 1 is ≈ (1 + cos θ*) / 2.
  cos_theta = np.where(rng.random(num) < 0.5, 1 - 2 * share, 2 * share - 1)
  parent = _four_vector(jet_pt, zeros, zeros, parent_mass)
  d1, d2 = _two_body_decay(parent, parent_mass, 0.0, 0.0, cos_theta, rng.uniform(0, 2 * np.pi, num))
  single = _four_vector(jet_pt, zeros, zeros)
  one_prong = rng.random(num) < QCD_ONE_PRONG_FRACTION
  qcd_partons = np.stack([np.where(one_prong[:, None], single, d1), d2, d2], axis=1)

  pt, eta, phi = _pt_eta_phi(np.where(is_top[:, None, None], top_partons, qcd_partons))
  valid = np.ones((num, 3), dtype=bool)
  valid[~is_top, 2] = False
  valid[~is_top & one_prong, 1] = False
  heavy = np.zeros((num, 3), dtype=bool)
  heavy[is_top, 0] = True
  heavy[~is_top] = rng.random((int((~is_top).sum()), 3)) < QCD_HEAVY_FLAVOUR_FRACTION
  gluon = ~is_top[:, None] & (rng.random((num, 3)) < QCD_GLUON_FRACTION) & ~heavy
  return pt, eta, phi, valid, heavy, gluon


def _fragment(rng: np.random.Generator, parton_pt: np.ndarray, parton_eta: np.ndarray,
              parton_phi: np.ndarray, parton_heavy: np.ndarray, parton_gluon: np.ndarray,
              parton_image: np.ndarray) -> dict[str, np.ndarray]:
  """Splits each parton into 2 + Poisson(...) massless constituents around its direction.

  A constituent of transverse momentum pT sits at an angle ≈ kT / pT from its parton, kT exponential:
  soft constituents spread wide, hard ones stay in the core, and the resulting prong mass grows with
  pT like real jets'. Gluons radiate more than quarks (more, wider constituents).
  """
  mean_count = FRAGMENTS_BASE + FRAGMENTS_PER_LOG_PT * np.log(np.maximum(parton_pt, 10.0) / 10.0)
  counts = 2 + rng.poisson(mean_count * np.where(parton_gluon, GLUON_MULTIPLICITY_RATIO, 1.0))
  owner = np.repeat(np.arange(len(parton_pt)), counts)
  shares = rng.gamma(FRAGMENT_SHARE_ALPHA, 1.0, len(owner)) + 1e-6
  shares /= np.bincount(owner, weights=shares, minlength=len(parton_pt))[owner]
  pt = shares * parton_pt[owner]
  kt = rng.exponential(np.where(parton_gluon, GLUON_KT, QUARK_KT)[owner])
  spread = np.clip(kt / pt, FRAGMENT_SPREAD_MIN, FRAGMENT_SPREAD_MAX)
  eta = parton_eta[owner] + spread * rng.standard_normal(len(owner))
  phi = parton_phi[owner] + spread * rng.standard_normal(len(owner))
  return {"image": parton_image[owner], "pt": pt, "eta": eta, "phi": phi,
          "heavy_flavour": parton_heavy[owner], "pileup": np.zeros(len(owner), dtype=bool)}


def _pileup(rng: np.random.Generator, num: int) -> dict[str, np.ndarray]:
  counts = rng.poisson(PILEUP_MEAN_COUNT, num)
  total = int(counts.sum())
  return {"image": np.repeat(np.arange(num), counts),
          "pt": PILEUP_PT_MIN + rng.exponential(PILEUP_PT_SCALE, total),
          "eta": rng.uniform(-detector.WINDOW_HALF_WIDTH, detector.WINDOW_HALF_WIDTH, total),
          "phi": rng.uniform(-detector.WINDOW_HALF_WIDTH, detector.WINDOW_HALF_WIDTH, total),
          "heavy_flavour": np.zeros(total, dtype=bool), "pileup": np.ones(total, dtype=bool)}


def _jet_mass_and_pt(particles: dict[str, np.ndarray], num: int) -> tuple[np.ndarray, np.ndarray]:
  """Invariant mass and vector pT of all particles within ΔR < detector.JET_RADIUS of the axis, per image."""
  in_jet = np.hypot(particles["eta"], particles["phi"]) < detector.JET_RADIUS
  p4 = _four_vector(particles["pt"][in_jet], particles["eta"][in_jet], particles["phi"][in_jet])
  image = particles["image"][in_jet]
  total = np.stack([np.bincount(image, weights=p4[:, k], minlength=num) for k in range(4)], axis=-1)
  mass2 = total[:, 0]**2 - np.sum(total[:, 1:]**2, axis=-1)
  return np.sqrt(np.maximum(mass2, 0.0)), np.hypot(total[:, 1], total[:, 2])


# ---------------------------------------------------------------------------------------------------
# Detector response.


def _hcal_pixels(tower_pixels: np.ndarray, tower_sums: np.ndarray, size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Spreads each tower over the image pixels whose centres it covers (the real HCAL is upsampled)."""
  towers_per_side = detector.NUM_HCAL_TOWERS
  image = tower_pixels // towers_per_side**2
  tower_row = tower_pixels // towers_per_side % towers_per_side
  tower_col = tower_pixels % towers_per_side
  centres = (np.arange(size) + 0.5) * detector.pixel_size(size)
  tower_of_pixel = np.minimum((centres / detector.HCAL_TOWER_SIZE).astype(np.int64), towers_per_side - 1)
  first = np.searchsorted(tower_of_pixel, np.arange(towers_per_side))
  count = np.searchsorted(tower_of_pixel, np.arange(towers_per_side), side="right") - first
  span = max(int(count.max()), 1)
  offset = np.arange(span)
  row = first[tower_row][:, None, None] + offset[None, :, None]
  col = first[tower_col][:, None, None] + offset[None, None, :]
  valid = (offset[None, :, None] < count[tower_row][:, None, None]) \
      & (offset[None, None, :] < count[tower_col][:, None, None])
  flat = (image[:, None, None] * size + row) * size + col
  return flat[valid], np.broadcast_to(tower_sums[:, None, None], valid.shape)[valid]


def _render(rng: np.random.Generator, particles: dict[str, np.ndarray], num: int, size: int
            ) -> np.ndarray:
  """Draws the particles into (num, size, size, 8) float32 detector images."""
  n = len(particles["pt"])
  image, pt, eta = particles["image"], particles["pt"], particles["eta"]
  phi = detector.wrap_phi(particles["phi"])
  species = rng.choice(3, size=n, p=SPECIES_PROBABILITIES)
  charged = species == CHARGED
  charge = np.where(rng.random(n) < 0.5, -1.0, 1.0)
  row = _to_pixel(eta, size)
  col = _to_pixel(phi, size)
  scale_to_125 = size / detector.REAL_IMAGE_SIZE
  channels = []  # (flat pixel index, value) per channel

  # Tracks: pT, |d0| (b-hadron daughters are displaced), |dz| (pile-up comes from other vertices).
  tracked = charged & (pt > TRACK_PT_MIN) & (rng.random(n) < TRACK_EFFICIENCY)
  t_img, t_row, t_col, t_pt = image[tracked], row[tracked], col[tracked], pt[tracked]
  num_tracks = len(t_pt)
  heavy = particles["heavy_flavour"][tracked]
  d0_sigma = np.hypot(D0_RESOLUTION_UM, D0_RESOLUTION_PT_UM / t_pt)
  d0_um = np.abs(d0_sigma * rng.standard_normal(num_tracks)
                 + heavy * rng.exponential(B_DECAY_LENGTH_UM, num_tracks))
  dz_um = np.abs(DZ_RESOLUTION_UM * rng.standard_normal(num_tracks)
                 + heavy * rng.exponential(B_DECAY_LENGTH_UM, num_tracks))
  dz_mm = np.where(particles["pileup"][tracked],
                   np.abs(rng.normal(0.0, PILEUP_VERTEX_SPREAD_MM, num_tracks)), dz_um / 1000.0)
  # Tracks have no readout threshold of their own: suppress only pixels that sum to nothing.
  channels.append(_zero_suppress(*_pixel_sums(t_img, t_row, t_col, TRACK_PT_GAIN * t_pt, size), 1e-6))
  d0_kept = d0_um >= D0_THRESHOLD_UM
  channels.append(_zero_suppress(*_pixel_sums(t_img[d0_kept], t_row[d0_kept], t_col[d0_kept],
                                              D0_GAIN * d0_um[d0_kept], size), 1e-6))
  dz_kept = dz_mm >= DZ_THRESHOLD_MM
  channels.append(_zero_suppress(*_pixel_sums(t_img[dz_kept], t_row[dz_kept], t_col[dz_kept],
                                              DZ_GAIN * dz_mm[dz_kept], size), 1e-6))

  # Calorimeters. Charged particles reach them bent in φ, and only if they are not too soft.
  reaches_calo = ~charged | (pt > CALO_PT_MIN)
  ecal_fraction = np.where(charged, ECAL_MIP_GEV / pt + rng.uniform(0, ECAL_EARLY_SHOWER_MAX, n), 0.0)
  ecal_fraction = np.where(species == PHOTON, 1.0, np.minimum(ecal_fraction, 1.0))
  ecal_energy = np.where(reaches_calo, ecal_fraction * pt, 0.0)
  ecal_col = _to_pixel(
      detector.wrap_phi(phi + charged * charge * detector.BEND_PER_METRE * detector.ECAL_RADIUS / pt), size)
  deposits = ecal_energy > 0
  # Coarser pixels contain more of each shower, so less leaks into their neighbours.
  e_row, e_col, e_val, e_img = _with_neighbours(row[deposits], ecal_col[deposits],
                                                ECAL_GAIN * ecal_energy[deposits],
                                                ECAL_NEIGHBOUR_SHARE_AT_125 * scale_to_125, image[deposits])
  channels.append(_zero_suppress(*_pixel_sums(e_img, e_row, e_col, e_val, size), ECAL_THRESHOLD))

  response = np.maximum(rng.normal(HCAL_RESPONSE_MEAN, HCAL_RESPONSE_SPREAD, n), 0.0)
  hcal_energy = np.where(reaches_calo & (species != PHOTON), (pt - ecal_energy) * response, 0.0)
  hcal_phi = detector.wrap_phi(phi + charged * charge * detector.BEND_PER_METRE * detector.HCAL_RADIUS / pt)
  deposits = hcal_energy > 0
  tower_row, tower_col = (np.floor((angle[deposits] + detector.WINDOW_HALF_WIDTH)
                                   / detector.HCAL_TOWER_SIZE).astype(np.int64) for angle in (eta, hcal_phi))
  h_row, h_col, h_val, h_img = _with_neighbours(tower_row, tower_col, HCAL_GAIN * hcal_energy[deposits],
                                                (1 - HCAL_CENTRAL_SHARE) / 4, image[deposits])
  towers = _zero_suppress(*_pixel_sums(h_img, h_row, h_col, h_val, detector.NUM_HCAL_TOWERS), HCAL_THRESHOLD)
  channels.append(_hcal_pixels(*towers, size))

  # Pixel-detector layers: every charged particle, bent a little more in each outer layer, its charge
  # sometimes shared with the next φ pixel; plus isolated noise hits.
  c_img, c_row, c_phi, c_pt = image[charged], row[charged], phi[charged], pt[charged]
  c_charge = charge[charged]
  num_charged = len(c_pt)
  for radius, noise_hits in zip(detector.PIXEL_LAYER_RADII, PIXEL_NOISE_HITS_PER_LAYER):
    hit_col = _to_pixel(detector.wrap_phi(c_phi + c_charge * detector.BEND_PER_METRE * radius / c_pt), size)
    deposit = PIXEL_HIT_GAIN * rng.gamma(4.0, 0.25, num_charged) \
        * (rng.random(num_charged) < PIXEL_HIT_EFFICIENCY)
    split = (rng.random(num_charged) < PIXEL_CLUSTER_SPLIT_AT_125 * scale_to_125) \
        * rng.uniform(0.2, 0.5, num_charged)
    split_col = hit_col + np.where(rng.random(num_charged) < 0.5, 1, -1)
    noise_img = np.repeat(np.arange(num), rng.poisson(noise_hits * scale_to_125**2, num))
    num_noise = len(noise_img)
    channels.append(_zero_suppress(*_pixel_sums(
        np.concatenate([c_img, c_img, noise_img]),
        np.concatenate([c_row, c_row, rng.integers(0, size, num_noise)]),
        np.concatenate([hit_col, split_col, rng.integers(0, size, num_noise)]),
        np.concatenate([(1 - split) * deposit, split * deposit,
                        PIXEL_HIT_GAIN * rng.uniform(0.1, 0.6, num_noise)]), size), PIXEL_HIT_THRESHOLD))

  jet = np.zeros((num, size, size, detector.NUM_CHANNELS), dtype=np.float32)
  flat_jet = jet.reshape(-1)
  for channel, (pixels, values) in enumerate(channels):
    flat_jet[pixels * detector.NUM_CHANNELS + channel] = values
  return jet


def generate_jets(rng: np.random.Generator, num: int, *, image_size: int = detector.REAL_IMAGE_SIZE,
                  labelled: bool = True) -> dict[str, np.ndarray]:
  """Generates ``num`` synthetic jets with ``rng``.

  Returns:
    ``jet`` (num, S, S, 8) float32 channels-last with values in [0, 255]; when ``labelled`` also ``Y``
    (num, 1) float32 in {0, 1} (1 = top-like), ``m`` (num, 1) jet mass in GeV and ``pT`` (num, 1) jet pT
    in GeV, both computed from the generated particles. Unlabelled jets are drawn the same way (the mix is
    still half top-like) and only the labels are dropped.
  """
  if num < 0 or image_size < 1:
    raise ValueError(f"need num >= 0 and image_size >= 1, got num={num}, image_size={image_size}")
  labels = (rng.random(num) < 0.5).astype(np.int64)
  jet_pt = np.maximum(rng.normal(JET_PT_MEAN, JET_PT_STD, num), JET_PT_MIN)
  pt, eta, phi, valid, heavy, gluon = _hard_prongs(rng, labels, jet_pt)
  parton_image = np.broadcast_to(np.arange(num)[:, None], valid.shape)
  fragments = _fragment(rng, pt[valid], eta[valid], phi[valid], heavy[valid], gluon[valid],
                        parton_image[valid])
  pileup = _pileup(rng, num)
  particles = {k: np.concatenate([fragments[k], pileup[k]]) for k in fragments}
  out = {"jet": _render(rng, particles, num, image_size)}
  if labelled:
    mass, vector_pt = _jet_mass_and_pt(particles, num)
    out["Y"] = labels.astype(np.float32)[:, None]
    out["m"] = mass.astype(np.float32)[:, None]
    out["pT"] = vector_pt.astype(np.float32)[:, None]
  return out


# ---------------------------------------------------------------------------------------------------
# Files.


# ``config.generate`` fields that only the Pythia generator reads: this one draws its own pT spectrum
# (JET_PT_MEAN, JET_PT_STD), makes every file an even mixture of top-like and QCD-like jets, and runs
# in one process.
PYTHIA_ONLY_SETTINGS = ("pt_min", "pt_max", "signal_fraction", "workers")


def refuse_unused_settings(settings, defaults) -> None:
  """Raises ``errors.ConfigError`` naming the first of PYTHIA_ONLY_SETTINGS whose value in
  ``settings`` (``config.generate``) differs from ``defaults``: this generator would silently ignore
  it, and the run would not be the one asked for."""
  for name in PYTHIA_ONLY_SETTINGS:
    if settings[name] != defaults[name]:
      raise errors.ConfigError(
          f"config.generate.{name}={settings[name]!r}: the synthetic generator ignores it (only "
          f"generate.generator='pythia' reads it); leave it at {defaults[name]!r}, or use "
          "--config.generate.generator=pythia")


def _block_rng(seed: int, block_index: int) -> np.random.Generator:
  # Same as the block_index-th child of SeedSequence(seed).spawn(), without spawning all of them.
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block_index,)))


def write_synthetic_hdf5(path: str, num: int, *, labelled: bool = True, seed: int = 0,
                         image_size: int = detector.REAL_IMAGE_SIZE, chunk_size: int = 256,
                         progress: Callable[[int], None] | None = None) -> None:
  """Writes a synthetic jet file with the real files' schema, ``chunk_size`` images at a time.

  Datasets are contiguous, uncompressed float32 like the real files: ``jet`` (num, S, S, 8) and, when
  ``labelled``, ``Y``, ``m``, ``pT`` (num, 1). Memory stays near ``chunk_size`` images whatever ``num``
  is. The file is written under a temporary name in the same directory and renamed into place only once
  complete (``paths.replacing``), so an interrupted run never leaves a partial file under ``path`` nor
  destroys one already there (a killed process leaves a hidden ``.NAME.PID@HOST.*.partial`` file behind,
  never a truncated NAME; the next write of NAME on that host deletes it once process PID is gone).

  Image i is drawn from the generator of its block of IMAGES_PER_SEED_BLOCK images, so the content
  depends only on (seed, num, image_size), never on ``chunk_size``; an unlabelled file holds the same
  images as the labelled file with the same seed.

  Args:
    progress: called with the number of images written so far after every chunk; without one, a
      progress bar shows on a terminal and one line logs the rate at the end (``console.ProgressBar``).
  """
  if num < 1 or chunk_size < 1 or image_size < 1:
    raise ValueError(f"need num, chunk_size and image_size >= 1, got {num}, {chunk_size}, {image_size}")
  with console.ProgressBar(num, os.path.basename(path), "jet", report=progress) as bar, \
      paths.replacing(path) as temporary, h5py.File(temporary, "w-") as f:
    f.attrs["generator"] = "l2vit_jax.data.synthetic"
    f.attrs["seed"] = seed
    jet = f.create_dataset(hdf5.IMAGE_KEY, shape=(num, image_size, image_size, detector.NUM_CHANNELS),
                           dtype=np.float32)
    labels = {key: np.empty((num, 1), dtype=np.float32) for key in hdf5.LABEL_KEYS} if labelled else {}
    buffer = np.empty((min(chunk_size, num), image_size, image_size, detector.NUM_CHANNELS), dtype=np.float32)
    filled = 0  # images in buffer
    written = 0  # images in the file
    for block_index in range(-(-num // IMAGES_PER_SEED_BLOCK)):
      block_start = block_index * IMAGES_PER_SEED_BLOCK
      # Always generate whole blocks so the last, partial block matches a longer file's.
      block = generate_jets(_block_rng(seed, block_index), IMAGES_PER_SEED_BLOCK, image_size=image_size,
                            labelled=labelled)
      keep = min(IMAGES_PER_SEED_BLOCK, num - block_start)
      for key in labels:
        labels[key][block_start:block_start + keep] = block[key][:keep]
      taken = 0
      while taken < keep:
        count = min(keep - taken, len(buffer) - filled)
        buffer[filled:filled + count] = block["jet"][taken:taken + count]
        filled += count
        taken += count
        if filled == len(buffer) or written + filled == num:
          jet[written:written + filled] = buffer[:filled]
          written += filled
          bar.update(filled)
          filled = 0
    for key, values in labels.items():
      f.create_dataset(key, data=values)

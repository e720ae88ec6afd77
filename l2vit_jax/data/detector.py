"""A CMS-like detector model: one jet's final-state particles → one (S, S, 8) image like the real files'.

The real images (Andrews et al., CMS Open Data) are 125 × 125 crops of the barrel at ECAL-crystal
granularity (Δη = Δφ = 0.0174) around the jet; rows are η, columns φ. This module renders the same
window from generator-level particles (``Particles``: 4-momenta in GeV, charge, PDG id, production
vertex in mm), centred on a jet axis (η, φ). ``image_size`` S < 125 shows the same physical window with
coarser pixels of 0.0174 · 125 / S; S must be a multiple of 25 so that pixels tile the 25 × 25 HCAL
towers (anything else is refused: a tower split between pixels has no honest value).

Channels, in the real files' order, and what lands in each:

* 0 track pT, 1 track |d0|, 2 track |dz|: charged particles above ``track_pt_min`` produced inside the
  tracker (vertex radius < ``track_max_vertex_radius_mm``), kept with ``track_efficiency``. They are drawn
  where they cross the ECAL face, like the calorimeter deposits they belong to. pT is smeared by
  σ(pT)/pT = a ⊕ b·pT. d0 and dz are the impact parameters of the *straight* line through the
  production vertex along the momentum, relative to the primary vertex (approximation: the helix bends
  the track between vertex and closest approach by r0² / 2R, below 1 µm for b-hadron daughters with
  r0 < 3 mm and pT > 10 GeV; it matters only for soft tracks from far displaced vertices such as K⁰_S
  decays, whose d0 is then off by a fraction of itself, still huge). Both are smeared by
  σ = a ⊕ b / pT (µm) and zero-suppressed below a threshold, like the real channels, which are
  sparser than channel 0.
* 3 ECAL: photons and electrons deposit their energy, smeared by σ/E = a/√E ⊕ n/E ⊕ c (CMS barrel);
  charged hadrons and muons leave a MIP, and a charged hadron that starts its shower early
  (probability ``hadron_early_shower_probability``) a further uniform fraction of its energy. A
  shower shares ``ecal_neighbour_share_at_125`` with each of the four edge neighbours of its crystal
  (Molière radius ≈ one crystal); coarser pixels contain more of it, so the share scales with 1/pixel.
* 4 HCAL: the rest of each hadron's energy, smeared by σ/E = a/√E ⊕ c at a mean response below one
  (non-compensation), summed on 5 × 5-crystal towers (0.087 × 0.087), a fraction leaking into the four
  neighbouring towers, zero-suppressed per tower and repeated over the tower's pixels exactly as the
  real files upsample HCAL. Neutral hadrons deposit only here (a simplification: real ones may start
  showering in the ECAL too). Towers are aligned with the image, not with the detector's fixed grid.
* 5–7 barrel pixel layers at r = 2.9, 6.8, 10.9 cm: one hit per charged particle produced inside the
  layer's radius that reaches it (not a looper) within the layer's half-length, with efficiency
  ``pixel_hit_efficiency``; its charge (gamma-distributed, Landau-like tail) is shared with the next φ
  pixel with a probability set by the cluster width over the pixel's width at that radius; plus ~100
  stray hits per layer at 125 × 125 standing in for the pile-up and secondaries not generated (without
  them the layers would be twice as sparse as the real ones). Particles produced outside a layer never
  hit it: this is what makes displaced decays visible in these channels.

Geometry. A particle is followed on a straight line from its production vertex to each cylinder
(pixel layers, ECAL at 1.29 m, HCAL at 1.8 m), and a charged one is bent in the 3.8 T solenoid by
Δφ = −q · asin(0.3 B r / 2pT) (the exact azimuth at radius r of a helix from the beam line; positive
charges turn clockwise seen from +z). For displaced particles the bend is taken as if from the beam
line, an error of ≈ q·r0/R (below a crystal for r0 < 1 cm, pT > 2 GeV). Particles whose helix never
reaches a radius (pT < 0.57 GeV/m · r) leave nothing there. The barrel is taken as infinitely long for
the calorimeters (no endcap, no cracks); η and φ of an image cell are those of the impact point seen
from the origin, φ periodic. No pile-up is modelled: the primary vertex is ``primary_vertex`` (Pythia's
default puts every vertex of the hard event at the origin).

Units. Channels are physics quantities times a gain (``*_gain``) and saturate at 255 like the real
files' 8-bit-like range: GeV for track pT and calorimeters, µm for d0 and dz, hit charge for the pixel
layers. Gains and thresholds were tuned on Pythia top and QCD jets at pT 400–600 GeV so that the
per-channel means and zero fractions at 125 × 125 land near the real files' (see ``pythia.py`` for the
figures measured). Randomness (smearing, efficiencies, noise) comes only from the numpy Generator
passed in, in a fixed order, so an image is a pure function of (particles, axis, size, model, rng
state).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from l2vit_jax import errors
from l2vit_jax.data import hdf5

NUM_CHANNELS = hdf5.NUM_CHANNELS
TRACK_PT, TRACK_D0, TRACK_DZ, ECAL, HCAL = 0, 1, 2, 3, 4
PIXEL_LAYERS = (5, 6, 7)

# Geometry shared with synthetic.py (one definition each).
REAL_IMAGE_SIZE = 125
# ECAL barrel crystals span 0.0174 in η and φ; the real images are 125 crystals wide.
CRYSTAL_SIZE = 0.0174
WINDOW_HALF_WIDTH = REAL_IMAGE_SIZE * CRYSTAL_SIZE / 2
# HCAL towers cover 5 × 5 ECAL crystals (0.087 × 0.087).
CRYSTALS_PER_TOWER = 5
HCAL_TOWER_SIZE = CRYSTALS_PER_TOWER * CRYSTAL_SIZE
NUM_HCAL_TOWERS = REAL_IMAGE_SIZE // CRYSTALS_PER_TOWER
JET_RADIUS = 0.8  # CMS AK8 jets
MAX_PIXEL_VALUE = 255.0
MAGNETIC_FIELD_T = 3.8
# A track of transverse momentum pT (GeV) in B (T) has radius R = pT / (0.3 B) metres, and at radius r
# (metres) from the beam line it has turned by asin(r / 2R) = asin(BEND_PER_METRE · r / pT).
BEND_PER_METRE = 0.3 * MAGNETIC_FIELD_T / 2
ECAL_RADIUS, HCAL_RADIUS = 1.29, 1.8  # metres
PIXEL_LAYER_RADII = (0.029, 0.068, 0.109)  # metres, barrel pixel layers 1-3 (2012 detector)

ELECTRON, MUON, PHOTON = 11, 13, 22
NEUTRINOS = (12, 14, 16)


@dataclasses.dataclass(frozen=True)
class Particles:
  """Final-state particles of one event: 4-momenta (GeV), charge (e), PDG id, production vertex (mm)."""
  px: np.ndarray
  py: np.ndarray
  pz: np.ndarray
  e: np.ndarray
  charge: np.ndarray
  pdg_id: np.ndarray
  x: np.ndarray
  y: np.ndarray
  z: np.ndarray

  @classmethod
  def from_columns(cls, **columns) -> "Particles":
    """Builds from array-likes, as float64 (momenta, vertex) and int (charge, id), all of one length."""
    arrays = {name: np.asarray(columns[name], dtype=np.int64 if name in ("charge", "pdg_id")
                               else np.float64).reshape(-1)
              for name in (f.name for f in dataclasses.fields(cls))}
    if len({len(a) for a in arrays.values()}) > 1:
      raise ValueError(f"particle columns differ in length: { {k: len(a) for k, a in arrays.items()} }")
    return cls(**arrays)

  def __len__(self) -> int:
    return len(self.e)

  def select(self, mask: np.ndarray) -> "Particles":
    return Particles(**{f.name: getattr(self, f.name)[mask] for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class DetectorModel:
  """Resolutions, efficiencies, thresholds and gains of the detector. ``CMS`` is the tuned default."""
  # Tracker. σ(pT)/pT = a ⊕ b·pT; σ(d0), σ(dz) = a ⊕ b/pT µm (close to CMS 2012 tracking).
  track_pt_min: float = 0.75  # GeV; above the 0.74 GeV needed to reach the ECAL, where tracks are drawn
  track_efficiency: float = 0.95
  track_max_vertex_radius_mm: float = 500.0
  track_pt_resolution: tuple[float, float] = (0.006, 0.00015)
  d0_resolution_um: tuple[float, float] = (10.0, 90.0)
  dz_resolution_um: tuple[float, float] = (30.0, 150.0)
  d0_threshold_um: float = 15.0
  dz_threshold_um: float = 50.0
  # ECAL. σ/E = a/√E ⊕ n/E ⊕ c (CMS barrel: 2.8 %, 0.12 GeV, 0.3 %).
  ecal_resolution: tuple[float, float, float] = (0.028, 0.12, 0.003)
  ecal_neighbour_share_at_125: float = 0.08
  ecal_threshold_gev: float = 0.05
  mip_ecal_gev: float = 0.3
  hadron_early_shower_probability: float = 0.5
  hadron_early_shower_max_fraction: float = 0.6
  # HCAL. σ/E = a/√E ⊕ c around a mean response for hadrons.
  hcal_resolution: tuple[float, float] = (1.0, 0.05)
  hcal_response: float = 0.85
  hcal_central_share: float = 0.7  # the rest leaks equally into the four neighbouring towers
  hcal_threshold_gev: float = 1.0
  mip_hcal_gev: float = 1.5
  # Pixel layers.
  pixel_hit_efficiency: float = 0.98
  pixel_half_length_mm: float = 265.0
  pixel_cluster_width_mm: float = 0.15  # φ extent of a cluster; sets how often a hit spans two pixels
  # Stray hits per layer at 125 × 125 (scaled with the pixel count), with the charge of real ones: they
  # stand in for the pile-up and secondary-particle hits the model does not generate.
  pixel_noise_hits_at_125: tuple[float, float, float] = (100.0, 100.0, 100.0)
  pixel_hit_threshold: float = 20.0  # channel units
  # Gains: channel units per GeV (track pT, calorimeters), per µm (d0, dz), per mean hit charge.
  track_pt_gain: float = 5.0
  d0_gain: float = 0.8
  dz_gain: float = 0.25
  ecal_gain: float = 9.0
  hcal_gain: float = 3.6
  pixel_hit_gain: float = 150.0
  primary_vertex_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


CMS = DetectorModel()


def check_image_size(image_size: int) -> None:
  """Refuses, in one line, an image size whose pixels do not tile the 25 × 25 HCAL towers."""
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1 \
      or image_size % NUM_HCAL_TOWERS:
    raise errors.ConfigError(
        f"image_size: got {image_size!r}, expected a positive multiple of {NUM_HCAL_TOWERS} (the window "
        f"is {NUM_HCAL_TOWERS} HCAL towers of {CRYSTALS_PER_TOWER}x{CRYSTALS_PER_TOWER} crystals wide)")


def pixel_size(image_size: int) -> float:
  return 2 * WINDOW_HALF_WIDTH / image_size


def wrap_phi(phi: np.ndarray) -> np.ndarray:
  return (phi + np.pi) % (2 * np.pi) - np.pi


# ---------------------------------------------------------------------------------------------------
# Propagation and pixel indices.


def _impact(p: Particles, pt: np.ndarray, radius_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(η, φ, reaches) of where each particle crosses the cylinder of ``radius_m`` around the beam.

  Straight line from the production vertex (transverse path t solves |v + t·u| = r), plus the
  solenoid's bend of a track from the beam line. ``reaches`` is False for particles produced outside
  the cylinder and for charged ones that curl up before it.
  """
  radius_mm = radius_m * 1000.0
  ux, uy = p.px / pt, p.py / pt
  along = p.x * ux + p.y * uy
  r0_squared = p.x**2 + p.y**2
  reaches = r0_squared < radius_mm**2
  t = -along + np.sqrt(np.maximum(along**2 - r0_squared + radius_mm**2, 0.0))
  x, y, z = p.x + t * ux, p.y + t * uy, p.z + t * p.pz / pt
  charged = p.charge != 0
  sin_bend = BEND_PER_METRE * radius_m / pt
  reaches &= ~charged | (sin_bend < 1.0)
  bend = -np.sign(p.charge) * np.arcsin(np.minimum(sin_bend, 1.0)) * charged
  return np.arcsinh(z / radius_mm), wrap_phi(np.arctan2(y, x) + bend), reaches


def _cell(eta: np.ndarray, phi: np.ndarray, axis: tuple[float, float], cell_size: float, cells: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(row, col, inside) of the window cells (pixels or towers) holding points (η, φ); φ is periodic."""
  row = np.floor((eta - axis[0] + WINDOW_HALF_WIDTH) / cell_size).astype(np.int64)
  col = np.floor((wrap_phi(phi - axis[1]) + WINDOW_HALF_WIDTH) / cell_size).astype(np.int64)
  inside = (row >= 0) & (row < cells) & (col >= 0) & (col < cells)
  return row, col, inside


def _grid(row: np.ndarray, col: np.ndarray, values: np.ndarray, cells: int) -> np.ndarray:
  """Sums ``values`` into a (cells, cells) float64 grid; points outside it are dropped."""
  inside = (row >= 0) & (row < cells) & (col >= 0) & (col < cells)
  flat = row[inside] * cells + col[inside]
  return np.bincount(flat, weights=values[inside], minlength=cells * cells).reshape(cells, cells)


def _spread(row: np.ndarray, col: np.ndarray, values: np.ndarray, neighbour_share: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Shares ``values`` between a cell and its four edge neighbours (a shower's lateral leakage)."""
  d_row = np.array([0, 1, -1, 0, 0])
  d_col = np.array([0, 0, 0, 1, -1])
  shares = np.array([1 - 4 * neighbour_share] + [neighbour_share] * 4)
  return ((row[None] + d_row[:, None]).ravel(), (col[None] + d_col[:, None]).ravel(),
          (values[None] * shares[:, None]).ravel())


def _readout(grid: np.ndarray, threshold: float) -> np.ndarray:
  """Zero suppression below ``threshold`` (channel units) and saturation at the 8-bit-like maximum."""
  return np.where(grid >= threshold, np.minimum(grid, MAX_PIXEL_VALUE), 0.0)


def _quadrature(*terms: np.ndarray | float) -> np.ndarray:
  return np.sqrt(sum(np.square(t) for t in terms))


# ---------------------------------------------------------------------------------------------------
# Sub-detectors. Each takes the particles it sees and returns (S, S) channel images.


def _tracks(p: Particles, pt: np.ndarray, axis, size: int, model: DetectorModel,
            rng: np.random.Generator) -> list[np.ndarray]:
  """Channels 0-2: track pT, |d0|, |dz| at the track's ECAL impact point."""
  vx, vy, vz = (p.x - model.primary_vertex_mm[0], p.y - model.primary_vertex_mm[1],
                p.z - model.primary_vertex_mm[2])
  tracked = (p.charge != 0) & (pt > model.track_pt_min) \
      & (vx**2 + vy**2 < model.track_max_vertex_radius_mm**2)
  tracked &= rng.random(len(p)) < model.track_efficiency
  t = p.select(tracked)
  t_pt, n = pt[tracked], int(tracked.sum())
  # Straight line v + s·u (transverse unit u): closest approach to the primary vertex at s = −v·u.
  ux, uy = t.px / t_pt, t.py / t_pt
  d0_um = 1000.0 * (vx[tracked] * uy - vy[tracked] * ux)
  dz_um = 1000.0 * (vz[tracked] - (vx[tracked] * ux + vy[tracked] * uy) * t.pz / t_pt)
  d0_um += _quadrature(model.d0_resolution_um[0], model.d0_resolution_um[1] / t_pt) \
      * rng.standard_normal(n)
  dz_um += _quadrature(model.dz_resolution_um[0], model.dz_resolution_um[1] / t_pt) \
      * rng.standard_normal(n)
  measured_pt = t_pt * (1.0 + _quadrature(model.track_pt_resolution[0],
                                          model.track_pt_resolution[1] * t_pt) * rng.standard_normal(n))
  eta, phi, reaches = _impact(t, t_pt, ECAL_RADIUS)
  row, col, inside = _cell(eta, phi, axis, pixel_size(size), size)
  keep = reaches & inside
  d0, dz = np.abs(d0_um), np.abs(dz_um)
  # Impact parameters are zero-suppressed per track (below threshold a track adds nothing); the
  # pixels themselves have no threshold but the track's presence.
  values = (model.track_pt_gain * np.maximum(measured_pt, 0.0),
            model.d0_gain * d0 * (d0 >= model.d0_threshold_um),
            model.dz_gain * dz * (dz >= model.dz_threshold_um))
  return [_readout(_grid(row[keep], col[keep], v[keep], size), np.finfo(np.float64).tiny)
          for v in values]


def _calorimeter_energies(p: Particles, abs_id: np.ndarray, rng: np.random.Generator,
                          model: DetectorModel) -> tuple[np.ndarray, np.ndarray]:
  """Measured (ECAL, HCAL) energy per particle in GeV, before geometry and readout."""
  n = len(p)
  em = (abs_id == ELECTRON) | (abs_id == PHOTON)
  muon = abs_id == MUON
  hadron = ~em & ~muon & ~np.isin(abs_id, NEUTRINOS)
  charged_hadron = hadron & (p.charge != 0)
  energy = np.maximum(p.e, 1e-9)
  a, noise, c = model.ecal_resolution
  em_energy = energy * (1.0 + _quadrature(a / np.sqrt(energy), noise / energy, c)
                        * rng.standard_normal(n))
  early = (rng.random(n) < model.hadron_early_shower_probability) \
      * rng.uniform(0.0, model.hadron_early_shower_max_fraction, n)
  hadron_ecal = np.where(charged_hadron, np.minimum(model.mip_ecal_gev + early * energy, energy), 0.0)
  a, c = model.hcal_resolution
  response = model.hcal_response * (1.0 + _quadrature(a / np.sqrt(energy), c) * rng.standard_normal(n))
  hadron_hcal = (energy - hadron_ecal) * np.maximum(response, 0.0)
  ecal = np.select([em, muon, hadron], [np.maximum(em_energy, 0.0), model.mip_ecal_gev, hadron_ecal])
  hcal = np.select([muon, hadron], [model.mip_hcal_gev, hadron_hcal], 0.0)
  return ecal, hcal


def _ecal(p: Particles, pt: np.ndarray, energy: np.ndarray, axis, size: int,
          model: DetectorModel) -> np.ndarray:
  eta, phi, reaches = _impact(p, pt, ECAL_RADIUS)
  row, col, _ = _cell(eta, phi, axis, pixel_size(size), size)
  deposit = reaches & (energy > 0)
  share = model.ecal_neighbour_share_at_125 * size / REAL_IMAGE_SIZE
  grid = _grid(*_spread(row[deposit], col[deposit], model.ecal_gain * energy[deposit], share), size)
  return _readout(grid, model.ecal_gain * model.ecal_threshold_gev)


def _hcal(p: Particles, pt: np.ndarray, energy: np.ndarray, axis, size: int,
          model: DetectorModel) -> np.ndarray:
  eta, phi, reaches = _impact(p, pt, HCAL_RADIUS)
  row, col, _ = _cell(eta, phi, axis, HCAL_TOWER_SIZE, NUM_HCAL_TOWERS)
  deposit = reaches & (energy > 0)
  towers = _grid(*_spread(row[deposit], col[deposit], model.hcal_gain * energy[deposit],
                          (1 - model.hcal_central_share) / 4), NUM_HCAL_TOWERS)
  towers = _readout(towers, model.hcal_gain * model.hcal_threshold_gev)
  pixels_per_tower = size // NUM_HCAL_TOWERS
  return np.repeat(np.repeat(towers, pixels_per_tower, axis=0), pixels_per_tower, axis=1)


def _pixel_layer(p: Particles, pt: np.ndarray, radius_m: float, noise_hits_at_125: float, axis,
                 size: int, model: DetectorModel, rng: np.random.Generator) -> np.ndarray:
  """One barrel pixel layer: a hit per charged particle produced inside it, plus noise."""
  n = len(p)
  eta, phi, reaches = _impact(p, pt, radius_m)
  z_mm = radius_m * 1000.0 * np.sinh(eta)
  hit = (p.charge != 0) & reaches & (np.abs(z_mm) < model.pixel_half_length_mm)
  hit &= rng.random(n) < model.pixel_hit_efficiency
  charge = model.pixel_hit_gain * rng.gamma(4.0, 0.25, n)
  cell = pixel_size(size)
  row, col, _ = _cell(eta, phi, axis, cell, size)
  # A cluster of width w (mm) spans an image pixel boundary with probability w / (pixel width at r).
  split_probability = min(model.pixel_cluster_width_mm / (cell * radius_m * 1000.0), 1.0)
  split = (rng.random(n) < split_probability) * rng.uniform(0.2, 0.5, n)
  neighbour = col + np.where(rng.random(n) < 0.5, 1, -1)
  num_noise = rng.poisson(noise_hits_at_125 * (size / REAL_IMAGE_SIZE)**2)
  noise_row, noise_col = rng.integers(0, size, num_noise), rng.integers(0, size, num_noise)
  noise_charge = model.pixel_hit_gain * rng.gamma(4.0, 0.25, num_noise)
  grid = _grid(np.concatenate([row[hit], row[hit], noise_row]),
               np.concatenate([col[hit], neighbour[hit], noise_col]),
               np.concatenate([(1 - split[hit]) * charge[hit], split[hit] * charge[hit], noise_charge]),
               size)
  return _readout(grid, model.pixel_hit_threshold)


def jet_image(particles: Particles, axis_eta: float, axis_phi: float, rng: np.random.Generator, *,
              image_size: int = REAL_IMAGE_SIZE, model: DetectorModel = CMS) -> np.ndarray:
  """Renders ``particles`` into one (S, S, 8) float32 image centred on the jet axis (η, φ).

  Rows are η, columns φ (periodic), pixels 0.0174 · 125 / S wide; the axis lies at the centre of
  pixel S // 2. Particles may be the whole event: those landing outside the window are dropped.
  Neutrinos leave nothing.

  Raises:
    errors.ConfigError: ``image_size`` is not a positive multiple of 25.
  """
  check_image_size(image_size)
  visible = ~np.isin(np.abs(particles.pdg_id), NEUTRINOS) & (particles.e > 0)
  p = particles.select(visible)
  pt = np.maximum(np.hypot(p.px, p.py), 1e-9)
  axis = (float(axis_eta), float(axis_phi))
  channels = _tracks(p, pt, axis, image_size, model, rng)
  ecal_energy, hcal_energy = _calorimeter_energies(p, np.abs(p.pdg_id), rng, model)
  channels.append(_ecal(p, pt, ecal_energy, axis, image_size, model))
  channels.append(_hcal(p, pt, hcal_energy, axis, image_size, model))
  for radius, noise in zip(PIXEL_LAYER_RADII, model.pixel_noise_hits_at_125):
    channels.append(_pixel_layer(p, pt, radius, noise, axis, image_size, model, rng))
  return np.stack(channels, axis=-1).astype(np.float32)

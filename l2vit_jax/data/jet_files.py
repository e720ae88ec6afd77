"""Writes Pythia jet files (pythia.py) with the real files' schema: parallel, resumable, never partial.

Layout. ``write_pythia_hdf5(path, ...)`` writes

* ``path``: HDF5 with ``jet`` (N, S, S, 8) float32 and, when labelled, ``Y``, ``m``, ``pT`` (N, 1) float32,
  contiguous and uncompressed like the real files;
* ``NAME.particles.h5`` beside it (``sidecar_path``): the particle-level truth of every jet (unlabelled
  files included): ``label``, ``mass``, ``pt``, ``eta``, ``phi``, ``tau`` (N, 3), ``jet_rank``,
  ``parton_p4`` (N, 3, 4), ``chunk``, ``event``, and the constituents as ragged arrays
  ``constituent_offsets`` (N + 1,) and ``constituents/{px,py,pz,e,charge,pdg_id}`` (jet i owns rows
  offsets[i]:offsets[i + 1]). Both files carry the same ``content_id`` attribute;
* when asked, ``NAME.sparse`` (``sparse.convert_hdf5`` of ``path``).

Work. The N jets are cut into chunks of ``chunk_size`` (the last shorter). Chunk k holds a fixed number
of top jets, round((start + n)·f) − round(start·f) for signal fraction f (so the file holds exactly
round(N·f)), and its content is ``pythia.generate_chunk(seed, k, ...)``: a function of (seed, k,
settings) only. Chunks run in ``workers`` spawned processes (workers = 1: in this process) in any order,
so the file is byte-identical whatever the number of workers.

Resume. Each finished chunk is stored, sparsely (non-zero positions and values, bit-exact), as
``.NAME.chunks/chunk-KKKKKK.npz``, written under a temporary name and renamed (``paths.replacing``), next to a
``settings.json`` recording everything the content depends on (arguments that shape it, library
versions). A killed run loses only the chunks in progress; rerunning with the same arguments generates
the missing ones. Different arguments (or libraries) discard the stored chunks. The files are then
assembled under hidden temporary names and renamed into place — the sidecar first, ``path`` last —
so ``path`` is never a truncated file and an existing good one is replaced only by a complete one.
The chunk directory is removed only after every output is in place. Two writers of the same path at
once are not supported.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time

import h5py
import numpy as np

from l2vit_jax import errors
from l2vit_jax.data import detector, hdf5, pythia, substructure
from l2vit_jax.runtime import console, paths

DEFAULT_CHUNK_SIZE = 32
DEFAULT_PT_RANGE = (400.0, 600.0)
CHUNK_FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".particles.h5"
_CHUNK_NAME = "chunk-{:06d}.npz"


# ---------------------------------------------------------------------------------------------------
# Arguments and plan.


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_arguments(num, *, image_size, workers, pt_range, signal_fraction, chunk_size, seed) -> None:
  """Raises ``errors.ConfigError`` naming the first bad argument, its value and what is expected."""
  def fail(name, value, expected):
    raise errors.ConfigError(f"{name}: got {value!r}, expected {expected}")

  if not _is_int(num) or num < 1:
    fail("num", num, "a positive number of jets")
  if not _is_int(seed) or seed < 0:
    fail("seed", seed, "an integer >= 0")
  detector.check_image_size(image_size)
  if workers is not None and (not _is_int(workers) or workers < 1):
    fail("workers", workers, "a positive number of processes (or None for one per core)")
  if not _is_int(chunk_size) or chunk_size < 1:
    fail("chunk_size", chunk_size, "a positive number of jets")
  try:
    pt_min, pt_max = (float(v) for v in pt_range)
  except (TypeError, ValueError):
    fail("pt_range", pt_range, "(pt_min, pt_max) in GeV")
  half_energy = pythia.CENTRE_OF_MASS_GEV / 2
  if not 0 < pt_min < pt_max or pt_min >= half_energy / 2:
    fail("pt_range", tuple(pt_range), f"0 < pt_min < pt_max GeV with pt_min < {half_energy / 2:g} "
         f"(half the beam energy)")
  if not isinstance(signal_fraction, (int, float, np.floating)) or isinstance(signal_fraction, bool) \
      or not 0.0 <= signal_fraction <= 1.0:
    fail("signal_fraction", signal_fraction, "a fraction of top jets in [0, 1]")


def chunk_plan(num: int, chunk_size: int, signal_fraction: float) -> list[tuple[int, int, int]]:
  """(start, size, number of top jets) of every chunk; exactly round(num · signal_fraction) tops."""
  tops_before = lambda n: int(np.floor(n * signal_fraction + 0.5))  # noqa: E731
  return [(start, min(chunk_size, num - start),
           tops_before(min(start + chunk_size, num)) - tops_before(start))
          for start in range(0, num, chunk_size)]


def sidecar_path(path: str) -> str:
  return _stem(path) + SIDECAR_SUFFIX


def sparse_path(path: str) -> str:
  return _stem(path) + _sparse_format().SUFFIX


def _sparse_format():
  # Imported on use: it brings in Grain (3 s), which every spawned worker would pay for nothing.
  from l2vit_jax.data import sparse  # pylint: disable=import-outside-toplevel
  return sparse


def chunk_directory(path: str) -> str:
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f".{name}.chunks")


def _stem(path: str) -> str:
  root, extension = os.path.splitext(path)
  return root if extension in (".h5", ".hdf5") else path


def _settings(num, seed, image_size, pt_range, signal_fraction, chunk_size) -> dict:
  return {"format": CHUNK_FORMAT_VERSION, "generator": "l2vit_jax.data.pythia", "num": num, "seed": seed,
          "image_size": image_size, "pt_range": [float(v) for v in pt_range],
          "signal_fraction": float(signal_fraction), "chunk_size": chunk_size,
          "jet_eta_max": pythia.JET_ETA_MAX, "pt_hat_min_fraction": pythia.PT_HAT_MIN_FRACTION,
          "versions": pythia.library_versions()}


def _content_id(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Chunks on disk.


def _prepare_chunk_directory(directory: str, settings: dict) -> None:
  """Keeps stored chunks made with these settings and removes stray temporaries. Chunks of other
  settings (an interrupted generation resumed with a changed flag) are refused, not discarded: they
  may be hours of work, and the flag may be the mistake.

  Raises:
    errors.ConfigError: naming the directory and the differing settings.
  """
  settings_file = os.path.join(directory, "settings.json")
  if os.path.isdir(directory):
    try:
      with open(settings_file, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError):
      saved = None
    if saved != settings:
      differing = (sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
                   if isinstance(saved, dict) else ["settings.json unreadable"])
      raise errors.ConfigError(
          f"{directory}: holds the chunks of an interrupted generation with other settings "
          f"({', '.join(differing)}); rerun with the settings it was started with to finish it, or "
          "delete the directory to start over")
  if not os.path.isdir(directory):
    os.makedirs(directory)
    paths.write_json(settings_file, settings)
  for entry in os.listdir(directory):
    # A chunk that was being written when its process was killed. Any process's: two writers of one
    # file at once are not supported, so whatever is left here is a dead writer's.
    if paths.is_temporary(entry):
      os.remove(os.path.join(directory, entry))


def _chunk_path(directory: str, index: int) -> str:
  return os.path.join(directory, _CHUNK_NAME.format(index))


def _store_chunk(directory: str, index: int, chunk: dict[str, np.ndarray]) -> None:
  """Saves a chunk with its images as non-zero (position, value) pairs: bit-exact, ~1 % of the size."""
  images = chunk["jet"]
  flat = np.ascontiguousarray(images).reshape(len(images), -1)
  image_index, position = np.nonzero(flat.view(np.uint32))
  arrays = {key: value for key, value in chunk.items() if key != "jet"}
  arrays.update(jet_counts=np.bincount(image_index, minlength=len(images)),
                jet_positions=position.astype(np.int64), jet_values=flat[image_index, position],
                jet_shape=np.array(images.shape, dtype=np.int64))
  # The directory was swept once when the run started (_prepare_chunk_directory).
  with paths.replacing(_chunk_path(directory, index), sweep=False) as temporary, open(temporary, "wb") as f:
    np.savez(f, **arrays)


def _load_chunk(directory: str, index: int) -> dict[str, np.ndarray]:
  with np.load(_chunk_path(directory, index)) as stored:
    arrays = {key: stored[key] for key in stored.files}
  shape = tuple(int(v) for v in arrays.pop("jet_shape"))
  counts = arrays.pop("jet_counts")
  flat = np.zeros((shape[0], int(np.prod(shape[1:]))), np.float32)
  flat[np.repeat(np.arange(shape[0]), counts), arrays.pop("jet_positions")] = arrays.pop("jet_values")
  arrays["jet"] = flat.reshape(shape)
  return arrays


def _finished_chunks(directory: str, num_chunks: int) -> set[int]:
  return {k for k in range(num_chunks) if os.path.exists(_chunk_path(directory, k))}


def _run_chunk(task: tuple) -> tuple[int, int]:
  """Generates and stores one chunk; top-level so that spawned workers can import it."""
  directory, seed, index, size, num_top, image_size, pt_range = task
  chunk = pythia.generate_chunk(seed, index, num_top, size - num_top, image_size=image_size,
                                pt_range=pt_range)
  _store_chunk(directory, index, chunk)
  return index, size


def _generate(tasks: list[tuple], workers: int, bar) -> None:
  if workers == 1 or len(tasks) == 1:
    for task in tasks:
      bar.update(_run_chunk(task)[1])
    return
  context = multiprocessing.get_context("spawn")  # fork would copy the parent's state (JAX, threads)
  with context.Pool(min(workers, len(tasks)), initializer=substructure.quiet_fastjet) as pool:
    for _, size in pool.imap_unordered(_run_chunk, tasks):
      bar.update(size)


# ---------------------------------------------------------------------------------------------------
# Assembly.


def _write_main(temporary: str, directory: str, plan, settings: dict, labelled: bool) -> None:
  num, size = settings["num"], settings["image_size"]
  with h5py.File(temporary, "w-") as f:
    f.attrs["generator"] = settings["generator"]
    f.attrs["seed"] = settings["seed"]
    f.attrs["settings"] = json.dumps(settings, sort_keys=True)
    f.attrs["content_id"] = _content_id(settings)
    jet = f.create_dataset(hdf5.IMAGE_KEY, shape=(num, size, size, detector.NUM_CHANNELS),
                           dtype=np.float32)
    labels = {key: np.empty((num, 1), np.float32) for key in hdf5.LABEL_KEYS} if labelled else {}
    for index, (start, count, _) in enumerate(plan):
      chunk = _load_chunk(directory, index)
      jet[start:start + count] = chunk["jet"]
      for key, values in labels.items():
        values[start:start + count] = chunk[key]
    for key, values in labels.items():
      f.create_dataset(key, data=values)


_SIDECAR_COLUMNS = ("label", "mass", "pt", "eta", "phi", "tau", "jet_rank", "parton_p4", "event")


def _write_sidecar(temporary: str, directory: str, plan, settings: dict) -> None:
  columns: dict[str, list] = {key: [] for key in (*_SIDECAR_COLUMNS, "chunk", "counts", "constituents")}
  for index, (_, count, _) in enumerate(plan):
    with np.load(_chunk_path(directory, index)) as chunk:
      for key in _SIDECAR_COLUMNS:
        columns[key].append(chunk[key])
      columns["chunk"].append(np.full(count, index, np.int32))
      columns["counts"].append(chunk["constituent_counts"])
      columns["constituents"].append(chunk["constituents"])
  constituents = np.concatenate(columns.pop("constituents"))
  counts = np.concatenate(columns.pop("counts"))
  with h5py.File(temporary, "w-") as f:
    f.attrs["content_id"] = _content_id(settings)
    f.attrs["settings"] = json.dumps(settings, sort_keys=True)
    f.attrs["tau"] = (f"FastJet contrib Nsubjettiness, {substructure.MEASURE}, {substructure.AXES}, "
                      f"beta={substructure.BETA}, R0={substructure.R0}; columns tau1, tau2, tau3")
    f.attrs["parton_p4"] = "b, q, q' of the matched top as (E, px, py, pz) GeV; NaN for QCD jets"
    f.attrs["jet_rank"] = "pT rank of the jet among its event's anti-kT R=0.8 jets (0 = leading)"
    for key, values in columns.items():
      f.create_dataset(key, data=np.concatenate(values))
    f.create_dataset("constituent_offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    group = f.create_group("constituents")
    for k, name in enumerate(pythia.CONSTITUENT_COLUMNS):
      dtype = np.float64 if k < 4 else (np.int8 if name == "charge" else np.int32)
      group.create_dataset(name, data=constituents[:, k].astype(dtype))


def write_pythia_hdf5(path: str, num: int, *, labelled: bool, seed: int,
                      image_size: int = detector.REAL_IMAGE_SIZE, workers: int | None = None,
                      pt_range: tuple[float, float] = DEFAULT_PT_RANGE, signal_fraction: float = 0.5,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, sparse: bool = False,
                      progress: bool = True) -> dict:
  """Writes ``num`` Pythia jets to ``path`` (and the sidecar, and optionally ``.sparse``); see above.

  ``signal_fraction`` is the fraction of top jets: 0.5 (the default) gives the balanced classes a
  labelled file needs, and an unlabelled file is drawn from the same mixture (its truth is in the
  sidecar). ``workers`` None means one process per core.

  Returns:
    A summary: ``path``, ``sidecar``, ``sparse`` (or None), ``num``, ``generated`` (jets made by this
    call, not resumed), ``seconds`` and ``jets_per_second`` (of the generation).

  Raises:
    errors.ConfigError: a bad argument (one line naming it), before any event is generated.
  """
  check_arguments(num, image_size=image_size, workers=workers, pt_range=pt_range,
                  signal_fraction=signal_fraction, chunk_size=chunk_size, seed=seed)
  workers = workers or os.cpu_count() or 1
  pt_range = (float(pt_range[0]), float(pt_range[1]))
  settings = _settings(num, seed, image_size, pt_range, signal_fraction, chunk_size)
  plan = chunk_plan(num, chunk_size, signal_fraction)
  directory = chunk_directory(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _prepare_chunk_directory(directory, settings)
  done = _finished_chunks(directory, len(plan))
  tasks = [(directory, seed, k, size, tops, image_size, pt_range)
           for k, (_, size, tops) in enumerate(plan) if k not in done]
  resumed = sum(plan[k][1] for k in done)
  # A bar with jets/s and the ETA on a terminal, and one line with the rate at the end
  # (runtime.console.ProgressBar); jets of resumed chunks are not counted into the rate.
  start = time.perf_counter()
  with console.ProgressBar(num - resumed, os.path.basename(path), "jet", enabled=progress) as bar:
    _generate(tasks, workers, bar)
  seconds = time.perf_counter() - start
  outputs = [path, sidecar_path(path)]
  # Renamed innermost first: the sidecar, then ``path``; a failure removes the temporaries not renamed.
  with paths.replacing(outputs[0]) as main, paths.replacing(outputs[1]) as sidecar:
    _write_main(main, directory, plan, settings, labelled)
    _write_sidecar(sidecar, directory, plan, settings)
  sparse_output = None
  if sparse:
    sparse_output = sparse_path(path)
    _sparse_format().convert_hdf5(path, sparse_output, labelled=labelled)
  shutil.rmtree(directory)
  generated = num - resumed
  return {"path": path, "sidecar": outputs[1], "sparse": sparse_output, "num": num,
          "generated": generated, "seconds": seconds,
          "jets_per_second": generated / seconds if seconds > 0 else float("nan")}


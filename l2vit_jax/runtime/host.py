"""XLA flags, the host allocator, the platforms JAX may start, the persistent compilation cache, library
log levels and progress bars: how a process is set up and what it shows on its console.

Call the first three first thing in an entry point — before anything creates a JAX array, asks for
devices or starts a thread, because XLA reads ``XLA_FLAGS`` and JAX reads ``JAX_PLATFORMS`` once, when
the backend starts, and a thread keeps the malloc arena it first gets::

  from l2vit_jax.runtime import host
  host.configure_xla_flags()
  host.configure_allocator()
  host.configure_platforms()

Flags the user already set in ``XLA_FLAGS`` win (ours are only added when the flag is absent);
``L2VIT_NO_XLA_FLAGS=1`` disables ours altogether. Which flags earn a place here is decided by
``scripts/benchmark.py`` (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
import time

# flag -> value. Only flags that leave results unchanged (no fast-math, no reduced precision) and
# that measurably help belong here; see docs/performance.md and docs/performance_log.md for what was tried and measured.
CPU_FLAGS: dict[str, str] = {}

OPT_OUT_VARIABLE = "L2VIT_NO_XLA_FLAGS"


def _opted_out(variable: str) -> bool:
  return os.environ.get(variable, "") not in ("", "0")


def configure_xla_flags(flags: dict[str, str] | None = None) -> list[str]:
  """Adds ``flags`` (default :data:`CPU_FLAGS`) to ``XLA_FLAGS`` unless already set there.

  Returns the ``--name=value`` strings it added. Flags for backends that are not used are ignored
  by XLA, so this is safe to call on any machine. Also adds :data:`LIBTPU_FLAGS`, which only a TPU
  backend reads.
  """
  configure_libtpu_flags()
  return _add_flags("XLA_FLAGS", CPU_FLAGS if flags is None else flags)


def _add_flags(variable: str, flags: dict[str, str]) -> list[str]:
  """Appends ``--name=value`` for each flag not already named in the environment ``variable``."""
  if _opted_out(OPT_OUT_VARIABLE):
    return []
  existing = os.environ.get(variable, "")
  present = {item.split("=", 1)[0].lstrip("-") for item in existing.split()}
  added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
  if added:
    os.environ[variable] = " ".join([existing, *added]).strip()
  return added


# glibc's mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ALLOCATOR_OPT_OUT_VARIABLE = "L2VIT_NO_MALLOC_TUNING"
_allocator_tuned = False


def configure_allocator() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it to the kernel.

  XLA:CPU allocates each execution's temporaries as one block (3.7 GB for a default train step at
  batch 16). glibc serves such a block with a fresh ``mmap`` and unmaps it on free, so every step
  page-faulted all of it in again: ≈ 980,000 minor faults, about a third of the step
  (docs/performance.md). One arena (a thread's own arena cannot hold blocks over 64 MiB and would mmap
  them anyway), no mmap and no trimming let the next step reuse the same pages; the process keeps
  its peak memory, which the step needs anyway. Returns whether the settings took effect: only on
  Linux with glibc, and not when ``L2VIT_NO_MALLOC_TUNING=1``.
  """
  if _opted_out(ALLOCATOR_OPT_OUT_VARIABLE) or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
  global _allocator_tuned
  _allocator_tuned = all(mallopt(parameter, value) == 1 for parameter, value in settings)
  return _allocator_tuned


def allocator_tuned() -> bool:
  """Whether :func:`configure_allocator` took effect in this process: freed memory stays resident,
  so whatever a computation allocates ahead of running keeps its pages once it has run."""
  return _allocator_tuned


def quiet_library_logs() -> None:
  """Keeps Orbax's per-save INFO chatter out of the run log (its warnings and errors still show)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())


class _QuietLibraries(logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the run log (its warnings and errors still show)."""

  def filter(self, record) -> bool:
    # The standard library's level: absl's own constants (WARNING = -1) are verbosities, not levelnos.
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


# --- platforms ----------------------------------------------------------------------------------------

# Variables a Cloud TPU VM (or a user forcing libtpu) sets; any one of them means "this may be a TPU".
TPU_ENVIRONMENT_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_NAME",
                             "JAX_FORCE_TPU_INIT")
_GOOGLE_PCI_VENDOR_ID = "0x1ae0"  # the vendor of every Cloud TPU chip (as jax's hardware_utils checks)


def tpu_may_be_present(environ=None, root: str = "/") -> bool:
  """Whether this machine may have a TPU, judged without starting libtpu or asking the network.

  True when any of: a TPU device node (``/dev/accel*``: TPU v2–v4, v5p; ``/dev/vfio/*``: v5e and
  later), a Google PCI device (``/sys/bus/pci/devices/*/vendor`` = 0x1ae0), or a TPU VM variable
  (``TPU_ENVIRONMENT_VARIABLES``). The metadata server is not asked: off Google Cloud that request
  hangs until it times out, and every TPU VM has the device nodes anyway. False positives only cost
  the old behaviour (libtpu is tried and its warnings print); a false negative would hide a TPU, so
  every sign counts.
  """
  environ = os.environ if environ is None else environ
  if any(environ.get(name) for name in TPU_ENVIRONMENT_VARIABLES):
    return True
  if glob.glob(os.path.join(root, "dev", "accel*")) or glob.glob(os.path.join(root, "dev", "vfio", "*")):
    return True
  for vendor in glob.glob(os.path.join(root, "sys", "bus", "pci", "devices", "*", "vendor")):
    try:
      with open(vendor, encoding="ascii") as file:
        if file.read().strip() == _GOOGLE_PCI_VENDOR_ID:
          return True
    except OSError:
      continue
  return False


def _installed_plugin_names() -> set[str]:
  """Names of the PJRT plugins JAX would load (``jax_plugins`` entry points and namespace modules)."""
  names = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  for location in (spec.submodule_search_locations or []) if spec else []:
    names.update(name.split(".")[0] for name in os.listdir(location) if not name.startswith("_"))
  return names


def platforms_without_tpu(plugin_names=None, root: str = "/") -> str | None:
  """The ``JAX_PLATFORMS`` value that lets JAX start everything it would, except the TPU.

  ``"cpu"``, with ``cuda`` in front when a CUDA plugin is installed (JAX skips it quietly where no
  NVIDIA device is visible), and ``rocm`` when a ROCm plugin is installed and ``/dev/kfd`` exists (JAX
  fails loudly on a listed ROCm backend without a GPU). None when a plugin of another kind is installed:
  its platform name is not known here, so the choice stays JAX's.
  """
  plugin_names = _installed_plugin_names() if plugin_names is None else plugin_names
  platforms = []
  for name in sorted(plugin_names):
    if "cuda" in name:
      platforms.append("cuda")
    elif "rocm" in name:
      if os.path.exists(os.path.join(root, "dev", "kfd")):
        platforms.append("rocm")
    else:
      return None
  return ",".join(sorted(set(platforms), key=platforms.index) + ["cpu"])


def configure_platforms(environ=None) -> str | None:
  """Keeps JAX from starting libtpu on a machine without a TPU; returns the ``JAX_PLATFORMS`` it set.

  With libtpu installed (``jax[tpu]``, or the test requirements), JAX tries the TPU backend first on
  every machine, and off a TPU VM libtpu prints "Failed to find host bounds…", "Unable to initialize
  backend 'tpu'…" and the like on stderr before our first line. The rule: when the user has not set
  ``JAX_PLATFORMS`` (an empty value counts as set), libtpu is installed and ``tpu_may_be_present`` finds
  no sign of a TPU, ``JAX_PLATFORMS`` is set to ``platforms_without_tpu()`` (``"cpu"``, or e.g.
  ``"cuda,cpu"``). TPU VMs, machines without libtpu and explicit choices are left as they are.
  Must run before ``import jax`` starts a backend (JAX reads the variable into its config on import).
  """
  environ = os.environ if environ is None else environ
  if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None or tpu_may_be_present(environ):
    return None
  platforms = platforms_without_tpu()
  if platforms is not None:
    environ["JAX_PLATFORMS"] = platforms
  return platforms


# --- persistent compilation cache ---------------------------------------------------------------------

COMPILATION_CACHE_VARIABLE = "L2VIT_COMPILATION_CACHE"
# Compilations quicker than this are not written (jax's default is 1 s): on the CPU a tiny run
# compiles 56 programs in 8 s, and the 12 over 0.1 s take 7 of them (train and eval step, parameter
# initialisers); the rest are not worth a cache entry each. The user's
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins.
MIN_COMPILE_SECONDS = 0.1
_UNDECIDED = object()
_compilation_cache = _UNDECIDED  # the folder in use, None when off; decided once per process


def default_compilation_cache() -> str:
  """The per-user folder: ``$XDG_CACHE_HOME/l2vit_jax/xla``, i.e. ``~/.cache/l2vit_jax/xla``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "l2vit_jax", "xla")


def resolve_compilation_cache(setting: str = "auto", *, default: str | None = None) -> str | None:
  """The folder ``config.compilation_cache = setting`` means, or None for no cache.

  ``""`` (or ``"off"``/``"none"``): no cache. A path (local or ``gs://``): that folder. ``"auto"``:
  ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own variable), else ``$L2VIT_COMPILATION_CACHE`` (empty: off),
  else ``default`` (the study passes its workdir's folder), else ``default_compilation_cache()``.
  """
  setting = str(setting).strip()
  if setting.lower() in ("", "off", "none", "false"):
    return None
  if setting != "auto":
    return setting
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if COMPILATION_CACHE_VARIABLE in os.environ:
    return os.environ[COMPILATION_CACHE_VARIABLE] or None
  return default or default_compilation_cache()


def enable_compilation_cache(setting: str = "auto", *, default: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on in ``resolve_compilation_cache(setting)`` (or off).

  Decided once per process: the first call wins (``main`` decides from ``config.compilation_cache``
  before the task runs; the study's own call then keeps that choice, and only sets its workdir's folder
  when called from code that decided nothing). A cached executable is the one XLA would compile, so
  results are bit-identical with or without it. Returns the folder in use, or None.
  """
  global _compilation_cache
  if _compilation_cache is not _UNDECIDED:
    return _compilation_cache
  import jax  # pylint: disable=import-outside-toplevel
  directory = resolve_compilation_cache(setting, default=default)
  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  compile_stats.start()
  _compilation_cache = directory
  return directory


def jax_min_compile_seconds() -> float:
  import jax  # pylint: disable=import-outside-toplevel
  return float(jax.config.jax_persistent_cache_min_compile_time_secs)


class CompileStats:
  """Counts this process's XLA compilations and how many the persistent cache served, from JAX's
  monitoring events (``/jax/compilation_cache/*`` and the backend-compile duration)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._started = False
    self.compilations = 0  # backend compilations (cache reads included)
    self.seconds = 0.0  # their wall time
    self.cache_requests = 0  # compilations that looked in the cache
    self.cache_hits = 0
    self.seconds_saved = 0.0  # the hits' original compile times minus the time to read them

  def start(self) -> None:
    """Registers the listeners (once; JAX offers no way to list them)."""
    with self._lock:
      if self._started:
        return
      self._started = True
    from jax import monitoring  # pylint: disable=import-outside-toplevel
    monitoring.register_event_listener(self._on_event)
    monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_event(self, event: str, **_) -> None:
    with self._lock:
      if event == "/jax/compilation_cache/compile_requests_use_cache":
        self.cache_requests += 1
      elif event == "/jax/compilation_cache/cache_hits":
        self.cache_hits += 1

  def _on_duration(self, event: str, duration: float, **_) -> None:
    with self._lock:
      if event == "/jax/core/compile/backend_compile_duration":
        self.compilations += 1
        self.seconds += duration
      elif event == "/jax/compilation_cache/compile_time_saved_sec":
        self.seconds_saved += duration

  def summary(self) -> str | None:
    """One line for the run log, or None before the first compilation."""
    with self._lock:
      if not self.compilations:
        return None
      if _compilation_cache in (_UNDECIDED, None):
        return (f"XLA: {self.compilations} compilation(s) in {self.seconds:.1f} s (persistent "
                "compilation cache off)")
      minimum = jax_min_compile_seconds()
      return (f"XLA: {self.compilations} compilation(s) in {self.seconds:.1f} s; {self.cache_hits} read "
              f"from the persistent cache {_compilation_cache}, saving {max(self.seconds_saved, 0.0):.1f} s"
              + (f" (compilations under {minimum:g} s are not cached)" if minimum > 0 else ""))


compile_stats = CompileStats()


# libtpu flags the TPU steps depend on (compile-only TPU reports too), added to LIBTPU_INIT_ARGS.
# RngBitGenerator (the 'rbg' dropout keys used on TPU) is not partitioned by default: every chip drew
# the random bits of the whole global batch and kept its slice, 4× the traffic of its own shard on
# v5e:2x2 (scripts/hlo_accounting.py). Partitioned, each chip draws only its shard; the masks then
# depend on the number of chips (a resume on the same slice is still exact).
LIBTPU_FLAGS = {"xla_tpu_spmd_rng_bit_generator_unsafe": "true"}


def configure_libtpu_flags(flags: dict[str, str] | None = None) -> list[str]:
  """Adds ``flags`` (default :data:`LIBTPU_FLAGS`) to ``LIBTPU_INIT_ARGS`` unless already set there;
  call before JAX starts its TPU backend. Returns the ``--name=value`` strings it added."""
  return _add_flags("LIBTPU_INIT_ARGS", LIBTPU_FLAGS if flags is None else flags)


# --- progress of long passes ----------------------------------------------------------------------------

class ProgressBar:
  """A tqdm bar (count, rate, ETA) on stderr for a long pass, and one log line with its rate at the end.

  Shown only on process 0 and only when stderr is a terminal: in a log file or a pipe a bar is noise
  (carriage returns), so there the final line alone reports the pass. The bar is not left behind
  (``leave=False``): a pass that fails clears it, and no bar appears after an ``error:`` line, which
  ``main`` prints after the exception has left this context; the final line is logged only for a pass
  that completed. Use as ``with ProgressBar(total, "observables", "jet") as bar: ... bar.update(n)``.
  """

  def __init__(self, total: int, description: str, unit: str):
    import tqdm  # pylint: disable=import-outside-toplevel
    self.total, self.description, self.unit = total, description, unit
    self.done = 0
    self._main = _process_index() == 0
    self._start = time.perf_counter()
    self._bar = tqdm.tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False,
                          dynamic_ncols=True, mininterval=1.0,
                          disable=not (self._main and _is_terminal(sys.stderr)))

  def update(self, count: int) -> None:
    self.done += count
    self._bar.update(count)

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, exc_type, *_) -> None:
    self._bar.close()
    if exc_type is None and self._main:
      from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
      seconds = time.perf_counter() - self._start
      absl_logging.info("%s: %d %s(s) in %.1f s (%.1f %s/s)", self.description, self.done, self.unit,
                        seconds, self.done / max(seconds, 1e-9), self.unit)


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # replaced or closed streams
    return False


def _process_index() -> int:
  """This process's JAX index where JAX is in use, else 0 (numpy-only callers never start a backend)."""
  jax = sys.modules.get("jax")
  return jax.process_index() if jax is not None and hasattr(jax, "process_index") else 0

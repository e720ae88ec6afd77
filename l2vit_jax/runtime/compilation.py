"""XLA's persistent compilation cache, and this process's compile statistics for the run log.

A cached executable is the one XLA would compile, so results are bit-identical with the cache on or
off; the cache only saves compile time on the next run. ``enable_compilation_cache`` decides once per
process where it lives (``config.compilation_cache``); ``compile_stats`` counts the compilations and
cache hits that JAX reports, for one summary line at the end of a run.
"""

from __future__ import annotations

import os
import threading

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
        return (
          f"XLA: {self.compilations} compilation(s) in {self.seconds:.1f} s (persistent "
          "compilation cache off)"
        )
      minimum = jax_min_compile_seconds()
      return (
        f"XLA: {self.compilations} compilation(s) in {self.seconds:.1f} s; {self.cache_hits} read "
        f"from the persistent cache {_compilation_cache}, saving {max(self.seconds_saved, 0.0):.1f} s"
        + (f" (compilations under {minimum:g} s are not cached)" if minimum > 0 else "")
      )


compile_stats = CompileStats()

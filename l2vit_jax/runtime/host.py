"""XLA flags, the host allocator and library log levels, set in one place before JAX initialises its
backends.

Call both first thing in an entry point — before anything creates a JAX array, asks for devices or
starts a thread, because XLA reads ``XLA_FLAGS`` once, when the backend starts, and a thread keeps
the malloc arena it first gets::

  from l2vit_jax.runtime import host
  host.configure_xla_flags()
  host.configure_allocator()

Flags the user already set in ``XLA_FLAGS`` win (ours are only added when the flag is absent);
``L2VIT_NO_XLA_FLAGS=1`` disables ours altogether. Which flags earn a place here is decided by
``scripts/benchmark.py`` (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

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

"""How a process is set up before JAX starts: XLA and libtpu flags, the host allocator, the platforms
JAX may start.

Call these first thing in an entry point — before anything creates a JAX array, asks for devices or
starts a thread, because XLA reads ``XLA_FLAGS`` and JAX reads ``JAX_PLATFORMS`` once, when the backend
starts, and a thread keeps the malloc arena it first gets::

  from l2vit_jax.runtime import process_setup
  process_setup.configure_xla_flags()
  process_setup.configure_allocator()
  process_setup.configure_platforms()

Flags the user already set in ``XLA_FLAGS`` win (ours are only added when the flag is absent);
``L2VIT_NO_XLA_FLAGS=1`` disables ours altogether. Which flags earn a place here is decided by
``scripts/benchmark.py`` (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import sys

OPT_OUT_VARIABLE = "L2VIT_NO_XLA_FLAGS"


def _opted_out(variable: str) -> bool:
  return os.environ.get(variable, "") not in ("", "0")


def configure_xla_flags(flags: dict[str, str] | None = None) -> list[str]:
  """Adds ``flags`` (default: none) to ``XLA_FLAGS`` unless already set there, and
  :data:`LIBTPU_FLAGS` to ``LIBTPU_INIT_ARGS``, which only a TPU backend reads.

  Returns the ``--name=value`` strings it added to ``XLA_FLAGS``. No XLA:CPU flag measured by
  ``scripts/benchmark.py`` earned a default place (docs/performance.md); the argument is how the
  benchmark tries one. Flags for backends that are not used are ignored by XLA, so this is safe to
  call on any machine.
  """
  configure_libtpu_flags()
  return _add_flags("XLA_FLAGS", flags or {})


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


# --- platforms ----------------------------------------------------------------------------------------

# Variables a Cloud TPU VM (or a user forcing libtpu) sets; any one of them means "this may be a TPU".
TPU_ENVIRONMENT_VARIABLES = (
  "TPU_ACCELERATOR_TYPE",
  "TPU_WORKER_HOSTNAMES",
  "TPU_WORKER_ID",
  "TPU_NAME",
  "JAX_FORCE_TPU_INIT",
)
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


# --- libtpu --------------------------------------------------------------------------------------------

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

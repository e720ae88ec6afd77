"""XLA flags, set in one place before JAX initialises its backends.

Call :func:`configure_xla_flags` first thing in an entry point — before anything creates a JAX array
or asks for devices, because XLA reads ``XLA_FLAGS`` once, when the backend starts::

  from l2vit_jax import platform
  platform.configure_xla_flags()

Flags the user already set in ``XLA_FLAGS`` win (ours are only added when the flag is absent);
``L2VIT_NO_XLA_FLAGS=1`` disables ours altogether. Which flags earn a place here is decided by
``scripts/benchmark.py`` (README "Performance").
"""

from __future__ import annotations

import os

# flag -> value. Only flags that leave results unchanged (no fast-math, no reduced precision) and
# that measurably help belong here; see README "Performance" for what was tried and measured.
CPU_FLAGS: dict[str, str] = {}

OPT_OUT_VARIABLE = "L2VIT_NO_XLA_FLAGS"


def configure_xla_flags(flags: dict[str, str] | None = None) -> list[str]:
  """Adds ``flags`` (default :data:`CPU_FLAGS`) to ``XLA_FLAGS`` unless already set there.

  Returns the ``--name=value`` strings it added. Flags for backends that are not used are ignored
  by XLA, so this is safe to call on any machine.
  """
  if os.environ.get(OPT_OUT_VARIABLE, "") not in ("", "0"):
    return []
  flags = CPU_FLAGS if flags is None else flags
  existing = os.environ.get("XLA_FLAGS", "")
  present = {item.split("=", 1)[0].lstrip("-") for item in existing.split()}
  added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([existing, *added]).strip()
  return added

r"""Checks every checkpoint of a workdir against the digests saved with it.

  python scripts/verify_checkpoint.py runs/finetune [runs/simclr gs://bucket/run ...]

Reads each step under WORKDIR/checkpoints/ and WORKDIR/best/ (or a folder of steps given directly),
recomputes the SHA-256 of every array and compares it with the digests in the step's meta. Prints
one line per step (``ok``, ``DAMAGED: <arrays or the decoding error>``, ``UNREADABLE`` when the read
failed without a sign of damage (the storage, memory), or ``no digests`` for a checkpoint written
before digests existed) and exits with status 1 if any step is damaged, 3 if some could not be read
and none is damaged, 2 if a directory holds no checkpoint. Steps set aside as ``<step>.damaged`` are listed,
not checked.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # reading arrays needs no accelerator

import orbax.checkpoint as ocp  # pylint: disable=wrong-import-position
from absl import app, logging  # pylint: disable=wrong-import-position

from l2vit_jax import errors
from l2vit_jax.checkpoint import integrity, naming, storage
from l2vit_jax.runtime import paths

ARRAY_ITEMS = ("model", "optimizer")


def manager_dirs(directory: str) -> list[str]:
  """``checkpoints/`` and ``best/`` of a workdir, or ``directory`` itself when it holds steps."""
  found = [
    paths.join(directory, sub)
    for sub in (naming.LATEST_DIR, naming.BEST_DIR)
    if paths.is_dir(paths.join(directory, sub))
  ]
  return found or [directory]


def check_step(manager: ocp.CheckpointManager, step: int) -> tuple[bool, str]:
  """(intact, one-line verdict) for one step; intact is None when the storage failed to answer."""
  step_dir = paths.as_path(manager.directory) / str(step)
  try:
    # The items to verify: those on disk and those the digests name (a torn copy may lack a folder).
    digests = integrity.restore_verified(manager, step)["meta"].get(integrity.DIGESTS)
    named = {name.split("/")[0] for name in digests} if isinstance(digests, dict) else set()
    items = {
      name: ocp.args.StandardRestore() for name in ARRAY_ITEMS if name in named or (step_dir / name).is_dir()
    }
    restored = integrity.restore_verified(manager, step, **items)
  except errors.CheckpointDamagedError as error:
    if not error.proven:
      return None, str(error)
    return False, str(error).split(": damaged checkpoint: ", 1)[-1]
  except errors.StorageError as error:
    return None, str(error)
  if integrity.DIGESTS not in restored["meta"]:
    return True, "no digests (written before integrity checks): not verified"
  return True, f"ok ({len(restored['meta'][integrity.DIGESTS])} arrays)"


def verify(directory: str) -> tuple[int, int, int]:
  """Prints a verdict per step; returns (steps checked, steps damaged, steps the storage failed to read)."""
  checked = damaged = unreadable = 0
  for manager_dir in manager_dirs(directory):
    if not paths.is_dir(manager_dir):
      continue
    set_aside = sorted(
      p.name for p in paths.as_path(manager_dir).iterdir() if integrity.DAMAGED_SUFFIX in p.name
    )
    with storage.open_manager(manager_dir, max_to_keep=None, read_only=True) as manager:
      for step in manager.all_steps():
        intact, verdict = check_step(manager, step)
        checked += 1
        damaged += intact is False
        unreadable += intact is None
        label = "" if intact else "DAMAGED: " if intact is False else "UNREADABLE (not damage): "
        print(f"{paths.join(manager_dir, str(step))}: {label}{verdict}")
    for name in set_aside:
      print(f"{paths.join(manager_dir, name)}: set aside earlier (not checked)")
  return checked, damaged, unreadable


def main(argv):
  if len(argv) < 2:
    sys.exit("usage: verify_checkpoint.py WORKDIR [WORKDIR ...]")
  logging.set_verbosity(logging.ERROR)  # Orbax's read-only notices; the verdicts are the output
  status = 0
  for directory in argv[1:]:
    checked, damaged, unreadable = verify(directory)
    if not checked:
      print(f"error: {directory}: no checkpoint found", file=sys.stderr)
      status = max(status, 2)
    elif damaged:
      print(f"{directory}: {damaged} of {checked} checkpoint(s) damaged", file=sys.stderr)
      status = 1 if status != 2 else status
    if unreadable:  # not damage: the storage did not answer; exit 3 unless worse was found
      print(
        f"{directory}: {unreadable} of {checked} checkpoint(s) unreadable now (storage error)",
        file=sys.stderr,
      )
      status = status or 3
  sys.exit(status)


if __name__ == "__main__":
  app.run(main)

"""Per-part milliseconds of a train step and an inference forward, ours and PyTorch's, attributed to
the named scopes of ``tpu/accounting.py`` (``SCOPES``: the parts the model and the train step label
with ``jax.named_scope``), so that a profile reads in the same parts as the compiled steps' byte and
FLOP accounting.

Ours: XLA thunk durations from a ``jax.profiler`` trace; each thunk is the HLO instruction its event
names (``hlo_op``), and ``accounting.account`` of the same executable gives every executed
instruction its part and direction (an ``op_name`` under ``transpose(...)`` is the backward pass; the
most specific part in the ``op_name`` wins, so a LayerNorm inside a block is ``norm``). Loops, calls
and conditionals enclose thunks traced themselves: only the leaves count.

PyTorch: ``torch.profiler`` self CPU time. ``torch_scopes`` opens a profiler range per reference
submodule whose JAX twin runs under a named scope (``TORCH_PARTS``), and the trainer's ``loss`` and
``optimizer`` ranges; an op takes the part ``accounting.scope_of`` gives the path of ranges around it,
a backward op that of the forward op whose autograd node it runs. Times are summed over threads, so
they can exceed the wall time per step.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Callable, Iterator

import jax

from l2vit_jax.bench import ours, pytorch
from l2vit_jax.interop import torch_reference
from l2vit_jax.tpu import accounting

CATEGORIES = (*accounting.SCOPES, "other")
# Instructions whose thunks enclose others' (traced themselves): not counted.
ENCLOSING_OPCODES = ("while", "call", "conditional")
# Submodules of interop/torch_reference.py by attribute name -> the scope their JAX twins run under
# (models/l2vit.py). Submodules not named (qkv, proj, conv1, act, ...) take their parent's part, as
# the ops inside a JAX scope do.
TORCH_PARTS = {
  "patch_embed": "patch_embed",
  "pos_drop": "dropout",
  "proj_drop": "dropout",
  "drop": "dropout",
  "drop_path": "drop_path",
  "norm": "norm",
  "norm1": "norm",
  "norm_lcm": "norm",
  "norm2": "norm",
  "bn": "norm",
  "attn": "attention",
  "lcm": "lcm",
  "mlp": "mlp",
  "cls_head": "head",
  "reg_head": "head",
}
RANGE_PREFIX = "part:"  # profiler ranges torch_scopes opens


def part_key(scope: str, direction: str) -> str:
  return f"{scope}/{direction}"


def instruction_parts(hlo_text: str) -> dict[str, str | None]:
  """HLO instruction name -> 'part/direction' of every instruction the module executes; None for
  the loops, calls and conditionals whose thunks enclose others."""
  computations, _ = accounting.parse_module(hlo_text)
  parts: dict[str, str | None] = {
    instruction.name: None
    for instructions in computations.values()
    for instruction in instructions
    if instruction.opcode in ENCLOSING_OPCODES
  }
  parts.update({entry.name: part_key(entry.scope, entry.direction) for entry in accounting.account(hlo_text)})
  return parts


def trace_milliseconds(events: list[dict], parts: dict[str, str | None], steps: int) -> dict[str, float]:
  """ms per step by 'part/direction' of the XLA thunks among a trace's complete events; a thunk of
  an instruction ``parts`` does not know counts as other/forward."""
  totals: dict[str, float] = {}
  for event in events:
    op = event.get("args", {}).get("hlo_op")
    if event.get("ph") != "X" or not op or event["name"].startswith("end: "):
      continue
    key = parts.get(op, part_key("other", "forward"))
    if key is not None:
      totals[key] = totals.get(key, 0.0) + event["dur"] / 1e3 / steps
  return totals


def jax_profile(run: Callable[[int], None], compiled, steps: int, directory: str) -> dict:
  """ms per step by part of ``run(steps)``, which runs ``compiled``, from a ``jax.profiler`` trace."""
  parts = instruction_parts(compiled.as_text())
  start = time.perf_counter()
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    run(steps)
  wall = (time.perf_counter() - start) / steps
  [path] = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  return {"ms_per_step": trace_milliseconds(events, parts, steps), "wall_ms_per_step_traced": 1e3 * wall}


@contextlib.contextmanager
def torch_scopes(trainer: pytorch.TorchTrainer) -> Iterator[None]:
  """Profiler ranges 'part:NAME' around the reference's submodules named in ``TORCH_PARTS``
  (forward hooks, removed on exit) and around the trainer's loss and optimizer."""
  torch = trainer.torch
  open_ranges: dict[object, list] = {}

  def enter(part: str):
    def hook(module, _inputs):
      scope = torch.profiler.record_function(RANGE_PREFIX + part)
      scope.__enter__()
      open_ranges.setdefault(module, []).append(scope)

    return hook

  def leave(module, _inputs, _output):
    open_ranges[module].pop().__exit__(None, None, None)

  handles = []
  for name, module in trainer.model.named_modules():
    part = TORCH_PARTS.get(name.rsplit(".", 1)[-1])
    if part:
      handles += [module.register_forward_pre_hook(enter(part)), module.register_forward_hook(leave)]
  saved_scope = trainer.scope
  trainer.scope = lambda part: torch.profiler.record_function(RANGE_PREFIX + part)
  try:
    yield
  finally:
    for handle in handles:
      handle.remove()
    trainer.scope = saved_scope


def _range_path(event) -> str:
  """'outer/.../inner' of the part ranges around a torch.profiler event ('' outside every range)."""
  names = []
  while event is not None:
    if event.name.startswith(RANGE_PREFIX):
      names.append(event.name[len(RANGE_PREFIX) :])
    event = event.cpu_parent
  return "/".join(reversed(names))


def torch_milliseconds(events, steps: int) -> dict[str, float]:
  """Self CPU ms per step by 'part/direction' of torch.profiler events (``profile.events()``).

  Forward ops take the part of the ranges around them; backward ops (under an autograd
  ``evaluate_function`` node) the part of the forward op with the node's sequence number.
  """
  forward_paths = {}
  for event in events:
    if getattr(event, "sequence_nr", -1) >= 0 and not event.name.startswith("autograd::"):
      path = _range_path(event)
      if path and event.sequence_nr not in forward_paths:
        forward_paths[event.sequence_nr] = path
  totals: dict[str, float] = {}
  for event in events:
    if event.name.startswith(RANGE_PREFIX):
      continue
    node = event
    while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
      node = node.cpu_parent
    if node is None:
      key = part_key(accounting.scope_of(_range_path(event))[0], "forward")
    else:
      path = forward_paths.get(getattr(node, "sequence_nr", -1)) or _range_path(event)
      key = part_key(accounting.scope_of(path)[0], "backward")
    totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e3 / steps
  return totals


def torch_profile(run: Callable[[int], None], steps: int) -> dict:
  """ms per step by part of the reference's ``run(steps)`` (inside ``torch_scopes``)."""
  torch = torch_reference.require_torch()
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    run(steps)
  wall = (time.perf_counter() - start) / steps
  return {"ms_per_step": torch_milliseconds(profile.events(), steps), "wall_ms_per_step_traced": 1e3 * wall}


def bench_profile(args) -> dict:
  """The 'profile' section: one train step's and one inference forward's ms per part, ours beside
  PyTorch's (unless ``--no-torch``; the reference runs on the CPU)."""
  batch = ours.fake_batch(args)
  trainer = ours.JaxTrainer(args, args.dtype, batch)
  result = {"categories": list(CATEGORIES), "steps": args.steps}
  with tempfile.TemporaryDirectory(prefix="l2vit_profile_") as directory:
    result["ours"] = {
      "train": jax_profile(
        trainer.run_train, trainer.train_step, args.steps, os.path.join(directory, "train")
      ),
      "inference": jax_profile(
        trainer.run_inference, trainer.forward, args.steps, os.path.join(directory, "inference")
      ),
    }
  if not args.no_torch:
    theirs = pytorch.TorchTrainer(args, batch, args.dtype)
    with torch_scopes(theirs):
      result["torch"] = {
        "train": torch_profile(theirs.run_train, args.steps),
        "inference": torch_profile(theirs.run_inference, args.steps),
      }
  return result

"""Where a compiled step's bytes and FLOPs go: per-instruction accounting of optimized HLO, grouped by
model part.

XLA's ``cost_analysis()`` gives one total of bytes accessed and FLOPs for a whole executable. This
module reads the optimized HLO text of the same executable (``compiled.as_text()``, for any backend:
TPU compile-only, XLA:CPU, GPU) and attributes every executed instruction — a fusion, a dot, a
convolution, a copy, a collective — to the part of the model its ``metadata op_name`` names. The model
and the train step put ``jax.named_scope`` labels on their parts (``models/l2vit.py``,
``training/steps.py``): patch_embed, attention, lcm, mlp, norm, dropout, drop_path, head, loss,
optimizer, input. The innermost label wins (a LayerNorm inside a block is ``norm``), and operations
under ``transpose(...)`` are the backward pass.

Per instruction, bytes are those of its operands plus its result (what XLA's cost analysis counts for
an unfused instruction; for a fusion, XLA may count a sliced or broadcast operand by what it reads, so
the sum here can differ from XLA's). FLOPs: 2·M·N·K for dots and convolutions (from their shapes,
contracting dimensions and windows), one per element for the arithmetic inside fusions, and
transcendental functions counted apart, as XLA does. XLA's cost analysis counts the body of a loop
once, whatever its trip count; a step whose blocks run under ``lax.scan`` (``models.l2vit.scan_blocks``)
would look six times cheaper than the same step unrolled. Here every instruction counts as often as it
runs (``Entry.trips``, from the loop's ``known_trip_count`` or its counter: ``trip_count``), and
``executed_cost`` corrects XLA's totals the same way. The table keeps an ``unattributed`` row (XLA's total minus ours) so that its shares add
up to XLA's own ``bytes_accessed``, loop-corrected.

XLA's ``bytes_accessed`` counts every operand and result wherever it lives. On a TPU, memory-space
assignment places many of them in on-chip memory (VMEM), marked ``S(1)`` in their layout, and
prefetches them there with asynchronous copies and slices. Each entry therefore also counts
``on_chip_bytes``, the part of its traffic in a memory space other than 0; the rest (``hbm_bytes``) is
what the HBM roofline sees: a prefetch reads HBM once, the fusion that then reads the prefetched
operand does not.
"""

from __future__ import annotations

import dataclasses
import math
import re

# Model parts, most specific first: an operation takes the first one its op_name contains. 'blocks'
# is what is left of the scanned blocks (models.l2vit.scan_blocks) outside any part: the loop's own
# slicing of the stacked state and stacking of what the backward pass keeps.
SCOPES = (
  "dropout",
  "drop_path",
  "optimizer",
  "input",
  "norm",
  "attention",
  "lcm",
  "mlp",
  "patch_embed",
  "head",
  "blocks",
  "loss",
)
# No memory traffic of their own (aliases, bookkeeping) in XLA's cost model.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "domain",
  "add-dependency",
}
_ELEMENTWISE = {
  "add",
  "subtract",
  "multiply",
  "divide",
  "maximum",
  "minimum",
  "negate",
  "abs",
  "remainder",
  "clamp",
  "compare",
  "select",
  "power",
  "sign",
  "floor",
  "ceil",
  "round-nearest-even",
  "round-nearest-afz",
  "and",
  "or",
  "xor",
  "not",
  "shift-left",
  "shift-right-logical",
  "shift-right-arithmetic",
  "popcnt",
  "convert",
  "is-finite",
}
_TRANSCENDENTAL = {
  "exponential",
  "exponential-minus-one",
  "log",
  "log-plus-one",
  "erf",
  "tanh",
  "logistic",
  "rsqrt",
  "sqrt",
  "cbrt",
  "sine",
  "cosine",
  "tan",
  "atan2",
}

# One array: dtype, dimensions and optional layout, e.g. bf16[16,625,1024]{2,1,0:T(8,128)(2,1)S(1)};
# S(n) in a layout: memory space n.
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  result: str  # the result type, e.g. 'f32[8,625,32]{2,1,0}' or a tuple
  operands: list[str]  # names of the operand instructions
  attributes: str
  op_name: str
  operand_types: list[str] = dataclasses.field(default_factory=list)  # filled by parse_module
  literal: str = ""  # a constant's value or a parameter's number as printed, e.g. '6'

  def called(self, attribute: str) -> list[str]:
    """Computations named by ``attribute=`` (``calls``, ``body``, ``branch_computations``, ...)."""
    match = re.search(rf"\b{attribute}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attributes)
    if not match:
      return []
    return [name.lstrip("%") for name in re.findall(r"%?([\w.\-]+)", match.group(1))]


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at ``text[start]``."""
  pairs, depth = {"(": ")", "{": "}", "[": "]"}, []
  for i in range(start, len(text)):
    char = text[i]
    if char in pairs:
      depth.append(pairs[char])
    elif depth and char == depth[-1]:
      depth.pop()
      if not depth:
        return i + 1
  return len(text)


def parse_instruction(line: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match or " = " not in line:
    return None
  rest = line[match.end() :]
  end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
  result, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  opcode = rest[:paren].strip()
  close = _balanced(rest, paren)
  op_name = _OP_NAME.search(rest[close:])
  inside = rest[paren + 1 : close - 1]
  operands = re.findall(r"%([\w.\-]+)", inside)
  return Instruction(
    match.group(1),
    opcode,
    result,
    operands,
    rest[close:],
    op_name.group(1) if op_name else "",
    literal=inside.strip() if opcode in ("constant", "parameter") else "",
  )


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """Computation name → its instructions, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header and not line.startswith((" ", "HloModule")):
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    instruction = parse_instruction(line)
    if instruction is not None:
      computations[current].append(instruction)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  for instructions in computations.values():  # operands are printed by name: look their types up
    types = {instruction.name: instruction.result for instruction in instructions}
    for instruction in instructions:
      instruction.operand_types = [types.get(name, "") for name in instruction.operands]
  return computations, entry


def _array_bytes(dtype: str, dims: str) -> int:
  bits = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
  return math.prod(int(d) for d in dims.split(",") if d) * max(bits, 8) // 8


def array_sizes(type_text: str) -> list[int]:
  """Bytes of each array in a (possibly tuple) HLO type, in order."""
  return [_array_bytes(dtype, dims) for dtype, dims, _ in _ARRAY.findall(type_text)]


def shape_bytes(type_text: str) -> int:
  """Bytes of every array in a (possibly tuple) HLO type."""
  return sum(array_sizes(type_text))


def on_chip_bytes(type_text: str) -> int:
  """Bytes of the arrays of an HLO type whose layout puts them outside memory space 0 (HBM)."""
  total = 0
  for dtype, dims, layout in _ARRAY.findall(type_text):
    space = _MEMORY_SPACE.search(layout)
    if space and space.group(1) != "0":
      total += _array_bytes(dtype, dims)
  return total


def _dims(type_text: str) -> list[int]:
  match = _ARRAY.search(type_text)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _elements(type_text: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims, _ in _ARRAY.findall(type_text))


def instruction_flops(instruction: Instruction) -> tuple[float, float]:
  """(FLOPs, transcendentals) of one instruction that is not a fusion."""
  opcode = instruction.opcode
  if opcode == "dot":
    lhs = _dims(instruction.operand_types[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * _elements(instruction.result) * k, 0.0
  if opcode == "convolution":
    inputs, kernel = _dims(instruction.operand_types[0]), _dims(instruction.operand_types[1])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->", instruction.attributes)
    lhs, rhs = labels.groups() if labels else ("", "")
    # Taps per output along each window dimension that land on real (not padding or dilation-hole)
    # inputs: at most the window over the dilation, and at most the input's own extent. A batched
    # matmul written as a convolution has window = batch with lhs_dilate = batch (one tap), or a
    # window as wide as its padding over an input of extent 1 (one tap).
    window = re.search(r"window=\{([^}]*)\}", instruction.attributes)
    sizes = _window_field(window.group(1) if window else "", "size")
    dilation = _window_field(window.group(1) if window else "", "lhs_dilate")
    taps = 1
    for i, label in enumerate(rhs):
      if not label.isdigit():
        continue
      n = int(label)
      size = sizes[n] if n < len(sizes) else kernel[i]
      extent = inputs[lhs.index(label)] if label in lhs and lhs.index(label) < len(inputs) else size
      taps *= min(-(-size // (dilation[n] if n < len(dilation) else 1)), extent)
    features = math.prod(kernel[i] for i, label in enumerate(rhs) if label == "i")
    return 2.0 * _elements(instruction.result) * taps * features, 0.0
  if opcode in _ELEMENTWISE:
    return float(_elements(instruction.result)), 0.0
  if opcode in _TRANSCENDENTAL:
    return 0.0, float(_elements(instruction.result))
  if opcode in ("reduce", "reduce-window"):
    return float(sum(_elements(t) for t in instruction.operand_types[:1])), 0.0
  return 0.0, 0.0


def _window_field(window: str, field: str) -> list[int]:
  match = re.search(rf"\b{field}=([\dx]+)", window)
  return [int(n) for n in match.group(1).split("x")] if match else []


def _tuple_elements(type_text: str) -> list[str]:
  """Top-level elements of a tuple type ``((a), b, c)``; a non-tuple type is one element."""
  if not type_text.startswith("("):
    return [type_text]
  elements, depth, current = [], 0, ""
  for char in type_text[1:-1]:
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      elements.append(current.strip())
      current = ""
    else:
      current += char
  return elements + [current.strip()]


def _sliced_traffic(
  instruction: Instruction, computations: dict[str, list[Instruction]]
) -> tuple[dict[int, int], int | None]:
  """What a slice or an in-place dynamic update moves, where it moves less than its arrays.

  Returns bytes actually read per operand position (for fused operands only sliced, or the
  buffer a dynamic-update-slice writes into in place: none of it is read) and the bytes actually
  written (the update) when the result is such a buffer, else None. A scan's loop reads one
  iteration's slice of its stacked inputs and writes one slice of its stacked outputs per trip; counted
  whole, they would count the whole stack every trip.
  """
  if instruction.opcode == "dynamic-slice":
    return {0: shape_bytes(instruction.result)}, None
  if instruction.opcode == "dynamic-update-slice":
    update = shape_bytes(instruction.operand_types[1]) if len(instruction.operand_types) > 1 else 0
    return {0: 0}, update
  if instruction.opcode != "fusion":
    return {}, None
  inner = [i for called in instruction.called("calls") for i in computations.get(called, [])]
  if not inner:
    return {}, None
  by_name = {i.name: i for i in inner}
  users: dict[str, list[tuple[Instruction, int]]] = {}
  for user in inner:
    for position, operand in enumerate(user.operands):
      users.setdefault(operand, []).append((user, position))
  read: dict[int, int] = {}
  for parameter in (i for i in inner if i.opcode == "parameter" and i.literal.isdigit()):
    uses = users.get(parameter.name, [])
    if uses and all(user.opcode in ("slice", "dynamic-slice") and position == 0 for user, position in uses):
      read[int(parameter.literal)] = sum(shape_bytes(user.result) for user, _ in uses)
    elif uses and all(user.opcode == "dynamic-update-slice" and position == 0 for user, position in uses):
      read[int(parameter.literal)] = 0
  root = inner[-1]
  outputs = [by_name.get(name) for name in root.operands] if root.opcode == "tuple" else [root]
  if not any(o is not None and o.opcode == "dynamic-update-slice" for o in outputs):
    return read, None
  written = sum(
    shape_bytes(by_name[o.operands[1]].result)
    if o.opcode == "dynamic-update-slice" and o.operands[1] in by_name
    else shape_bytes(o.result)
    for o in outputs
    if o is not None
  )
  return read, written


def _traffic(instruction: Instruction, computations: dict[str, list[Instruction]]) -> tuple[int, int, int]:
  """(bytes read, bytes written, of them on chip). An asynchronous pair moves its data once, at its
  ``-start``, whose result tuple also holds the source (copy-start: (destination, source, context);
  slice-start: ((source), slice, context)); its ``-done`` only hands the destination over. Dynamic
  slices and in-place dynamic updates move their slice, not their whole arrays (``_sliced_traffic``)."""
  if instruction.opcode.endswith("-done"):
    return 0, 0, 0
  if instruction.opcode in ("copy-start", "slice-start"):
    elements = _tuple_elements(instruction.result)
    source, destination = elements[:2] if instruction.opcode == "slice-start" else elements[1::-1]
    moved = shape_bytes(destination)
    # The source's layout says where it is read from; a slice reads as much as it writes.
    return moved, moved, on_chip_bytes(destination) + (moved if on_chip_bytes(source) else 0)

  def moved_on_chip(type_text: str, moved: int) -> int:  # the on-chip share of what moved
    whole = shape_bytes(type_text)
    return on_chip_bytes(type_text) * moved // whole if whole else 0

  sliced_reads, sliced_write = _sliced_traffic(instruction, computations)
  read = on_chip = 0
  for position, operand in enumerate(instruction.operand_types):
    moved = sliced_reads.get(position, shape_bytes(operand))
    read += moved
    on_chip += moved_on_chip(operand, moved)
  written = shape_bytes(instruction.result) if sliced_write is None else sliced_write
  on_chip += moved_on_chip(instruction.result, written)
  return read, written, on_chip


def scope_of(op_name: str) -> tuple[str, str]:
  """(model part, 'forward' or 'backward') of an operation's ``op_name``."""
  tokens = set(re.split(r"[/()]", op_name))
  scope = next((s for s in SCOPES if s in tokens), "other")
  return scope, "backward" if "transpose(" in op_name else "forward"


@dataclasses.dataclass
class Entry:
  """One executed instruction's share."""

  name: str
  opcode: str
  scope: str
  direction: str
  bytes_read: int
  bytes_written: int
  on_chip_bytes: int  # of bytes_read + bytes_written, those in on-chip memory (not HBM)
  flops: float
  transcendentals: float
  trips: int
  op_name: str

  @property
  def bytes(self) -> int:
    return self.bytes_read + self.bytes_written


def _through_copies(name: str, by_name: dict[str, Instruction]) -> Instruction | None:
  instruction = by_name.get(name)
  while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
    instruction = by_name.get(instruction.operands[0])
  return instruction


def _is_constant(instruction: Instruction | None, value: int | None = None) -> bool:
  return (
    instruction is not None
    and instruction.opcode == "constant"
    and instruction.literal.isdigit()
    and (value is None or int(instruction.literal) == value)
  )


def trip_count(
  loop: Instruction, computations: dict[str, list[Instruction]], caller: list[Instruction]
) -> int:
  """How often a ``while`` (an instruction of ``caller``) runs its body: XLA's ``known_trip_count``
  where it annotated one (XLA:CPU does); else, since libtpu leaves its loops unannotated, N for the
  loop ``lax.scan`` and ``fori_loop`` lower to — a tuple element k that starts at constant 0, grows by
  constant 1 in the body and is compared ``< N`` (a constant) in the condition; 1 otherwise."""
  known = _TRIP_COUNT.search(loop.attributes)
  if known:
    return int(known.group(1))
  condition = computations.get(next(iter(loop.called("condition")), ""), [])
  body = computations.get(next(iter(loop.called("body")), ""), [])
  compares = [i for i in condition if i.opcode == "compare"]
  if len(compares) != 1 or "direction=LT" not in compares[0].attributes or not body or not loop.operands:
    return 1
  in_condition = {i.name: i for i in condition}
  counter, limit = (_through_copies(name, in_condition) for name in compares[0].operands[:2])
  index = re.search(r"\bindex=(\d+)", counter.attributes) if counter is not None else None
  if counter is None or counter.opcode != "get-tuple-element" or not index or not _is_constant(limit):
    return 1
  k = int(index.group(1))
  in_body, in_caller = {i.name: i for i in body}, {i.name: i for i in caller}
  root, start = body[-1], _through_copies(loop.operands[0], in_caller)  # HLO prints ROOT last
  if (
    root.opcode != "tuple"
    or start is None
    or start.opcode != "tuple"
    or k >= min(len(root.operands), len(start.operands))
  ):
    return 1
  step = _through_copies(root.operands[k], in_body)
  if (
    step is None
    or step.opcode != "add"
    or not any(_is_constant(_through_copies(name, in_body), 1) for name in step.operands)
    or not _is_constant(_through_copies(start.operands[k], in_caller), 0)
  ):
    return 1
  return int(limit.literal)


def executed_instructions(computations: dict[str, list[Instruction]], entry: str):
  """Yields (computation, instruction, trips) for every instruction the module executes: the entry
  computation's, and those of the loops, calls, conditionals and async wrappers it runs, each with how
  often it runs (loop trip counts multiply). Loops, calls and fused computations themselves are not
  yielded; a fusion is one instruction."""

  def walk(computation: str, trips: int, seen: tuple[str, ...]):
    instructions = computations.get(computation, [])
    for instruction in instructions:
      if instruction.opcode == "while":
        body_trips = trips * trip_count(instruction, computations, instructions)
        for called in instruction.called("body") + instruction.called("condition"):
          if called not in seen:
            yield from walk(called, body_trips, seen + (called,))
        continue
      if instruction.opcode in ("call", "conditional", "async-start"):
        for attribute in (
          "calls",
          "to_apply",
          "branch_computations",
          "true_computation",
          "false_computation",
        ):
          for called in instruction.called(attribute):
            if called not in seen:
              yield from walk(called, trips, seen + (called,))
        continue
      yield computation, instruction, trips

  yield from walk(entry, 1, (entry,))


def account(hlo_text: str) -> list[Entry]:
  """Every executed instruction of the module (loop bodies and called computations followed; fused
  computations counted through their fusion instruction) with its bytes, FLOPs and model part."""
  computations, entry = parse_module(hlo_text)
  entries: list[Entry] = []
  consumers = {name: {} for name in computations}
  for name, instructions in computations.items():
    for instruction in instructions:
      for operand in instruction.operands:
        consumers[name].setdefault(operand, []).append(instruction)

  def consumer_op_name(computation: str, name: str, depth: int = 0) -> str:
    for user in consumers[computation].get(name, []):
      if user.op_name:
        return user.op_name
      if depth < 4:  # through copy-done, get-tuple-element, bitcast, ...
        found = consumer_op_name(computation, user.name, depth + 1)
        if found:
          return found
    return ""

  def fused_flops(computation: str) -> tuple[float, float, str]:
    flops = transcendentals = 0.0
    root_op_name = ""
    for inner in computations.get(computation, []):
      if inner.opcode == "fusion":
        sub = [fused_flops(c) for c in inner.called("calls")]
        flops += sum(f for f, _, _ in sub)
        transcendentals += sum(t for _, t, _ in sub)
      else:
        f, t = instruction_flops(inner)
        flops, transcendentals = flops + f, transcendentals + t
      root_op_name = inner.op_name or root_op_name
    return flops, transcendentals, root_op_name

  for computation, instruction, trips in executed_instructions(computations, entry):
    if instruction.opcode in _FREE:
      continue
    if instruction.opcode == "fusion":
      flops, transcendentals, inner_name = 0.0, 0.0, ""
      for called in instruction.called("calls"):
        f, t, inner_name = fused_flops(called)
        flops, transcendentals = flops + f, transcendentals + t
      op_name = instruction.op_name or inner_name
    else:
      flops, transcendentals = instruction_flops(instruction)
      op_name = instruction.op_name
    if not op_name:  # XLA's own prefetches and copies: the part of the operation that uses them
      op_name = consumer_op_name(computation, instruction.name)
    scope, direction = scope_of(op_name)
    read, written, on_chip = _traffic(instruction, computations)
    entries.append(
      Entry(
        instruction.name,
        instruction.opcode,
        scope,
        direction,
        read,
        written,
        on_chip,
        flops,
        transcendentals,
        trips,
        op_name,
      )
    )

  return entries


def executed_cost(entries: list[Entry], *, xla_flops: float, xla_bytes: float) -> dict:
  """XLA's FLOPs and bytes accessed with every loop body counted as often as it runs: XLA's own
  figures (one pass over each body) plus each body instruction's further trips; equal to XLA's for a
  module without loops. ``hbm_bytes``: of those bytes, the ones in HBM (ours, every trip)."""
  return {
    "flops": xla_flops + sum(e.flops * (e.trips - 1) for e in entries),
    "bytes_accessed": xla_bytes + sum(e.bytes * (e.trips - 1) for e in entries),
    "hbm_bytes": sum((e.bytes - e.on_chip_bytes) * e.trips for e in entries),
  }


def summarise(entries: list[Entry], *, xla_bytes: float, xla_flops: float, top: int = 15) -> dict:
  """Per (part, direction): bytes read/written, FLOPs, share of XLA's bytes; plus the largest
  instructions and an ``unattributed`` remainder so that the byte shares add up to 1.

  Every figure counts an instruction as often as it runs (loop trips); ``xla_bytes`` and
  ``xla_flops`` are XLA's cost analysis as reported, corrected here with ``executed_cost``."""
  executed = executed_cost(entries, xla_flops=xla_flops, xla_bytes=xla_bytes)
  xla_bytes, xla_flops = executed["bytes_accessed"], executed["flops"]
  groups: dict[str, dict] = {}
  for entry in entries:
    key = f"{entry.scope}/{entry.direction}"
    group = groups.setdefault(
      key,
      {
        "bytes_read": 0,
        "bytes_written": 0,
        "hbm_bytes": 0,
        "flops": 0.0,
        "transcendentals": 0.0,
        "instructions": 0,
      },
    )
    group["bytes_read"] += entry.bytes_read * entry.trips
    group["bytes_written"] += entry.bytes_written * entry.trips
    group["hbm_bytes"] += (entry.bytes - entry.on_chip_bytes) * entry.trips
    group["flops"] += entry.flops * entry.trips
    group["transcendentals"] += entry.transcendentals * entry.trips
    group["instructions"] += 1
  ours = sum(g["bytes_read"] + g["bytes_written"] for g in groups.values())
  groups["unattributed"] = {
    "bytes_read": 0,
    "bytes_written": max(xla_bytes - ours, 0.0),
    "hbm_bytes": 0,
    "flops": max(xla_flops - sum(g["flops"] for g in groups.values()), 0.0),
    "transcendentals": 0.0,
    "instructions": 0,
  }
  total = max(xla_bytes, ours, 1.0)
  for group in groups.values():
    group["share_of_bytes"] = (group["bytes_read"] + group["bytes_written"]) / total
  largest = sorted(entries, key=lambda e: e.bytes * e.trips, reverse=True)[:top]
  return {
    "xla_bytes_accessed": xla_bytes,
    "xla_flops": xla_flops,
    "attributed_bytes": ours,
    "hbm_bytes": executed["hbm_bytes"],
    "attributed_flops": sum(e.flops * e.trips for e in entries),
    "by_part": dict(sorted(groups.items(), key=lambda kv: -kv[1]["share_of_bytes"])),
    "largest": [
      {
        "name": e.name,
        "opcode": e.opcode,
        "part": f"{e.scope}/{e.direction}",
        "bytes_read": e.bytes_read,
        "bytes_written": e.bytes_written,
        "flops": e.flops,
        "trips": e.trips,
        "op_name": e.op_name[-120:],
      }
      for e in largest
    ],
  }


def markdown_table(summary: dict, *, per: float = 1.0, unit: str = "MB") -> str:
  """The ``by_part`` rows as a markdown table (bytes divided by ``per``, e.g. per image)."""
  scale = {"MB": 1e6, "GB": 1e9}[unit]
  lines = [
    f"| part | bytes read ({unit}) | bytes written ({unit}) | share of XLA's bytes | "
    f"of them in HBM ({unit}) | GFLOP |",
    "|---|---|---|---|---|---|",
  ]
  for part, group in summary["by_part"].items():
    lines.append(
      f"| {part} | {group['bytes_read'] / per / scale:,.2f} | "
      f"{group['bytes_written'] / per / scale:,.2f} | {group['share_of_bytes']:.1%} | "
      f"{group['hbm_bytes'] / per / scale:,.2f} | {group['flops'] / per / 1e9:,.3f} |"
    )
  return "\n".join(lines)

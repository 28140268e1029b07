"""What a compiled XLA program runs: its operations outside fusions, read from the HLO text.

Kinds: `fusion`, a kernel XLA generated (one on a GPU; a loop nest on a CPU); `library`, a
matmul or attention kernel from a library or a custom fusion (cuBLAS/cuDNN calls, Triton
GEMMs, dots XLA did not fuse); `collective`, a cross-device transfer (counted once, at its
start); `copy`; `other`, an op XLA left outside any fusion (an extra pass over memory).
Loop bodies (`while`, the layer scan), conditional branches and calls (GPU command
buffers wrap kernels in `call`s) are followed, each counted once, not per iteration.
`bench train` reports the counts; the tests use the op names to check that RMSNorm and
RoPE run inside fusions.
"""

import collections
import dataclasses
import itertools
import re

# Instructions that launch nothing themselves: structure, control flow (what they run is
# followed), aliasing, and the ends of asynchronous pairs (counted at their start).
_FREE = frozenset(
  {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "async-start",  # its wrapped computation is followed and counted instead
    "async-update",
    "async-done",
  }
)
KINDS = ("fusion", "library", "collective", "copy", "other")
_LIBRARY = frozenset({"custom-call", "dot", "convolution"})
_COLLECTIVES = (
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "collective-broadcast",
  "send",
  "recv",
)
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%[\w.\-]+ = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NAME = r"%([\w.\-]+)"


@dataclasses.dataclass(frozen=True)
class Op:
  """One operation outside any fusion: its opcode, kind and the JAX name stack it came from."""

  opcode: str
  kind: str  # one of KINDS
  op_name: str


def _opcode(rest: str) -> str:
  """The opcode of `TYPE opcode(operands), attributes` (TYPE may be a nested tuple)."""
  end = rest.index(" ")
  if rest.startswith("("):  # the type ends where its parentheses balance
    depth = itertools.accumulate((ch == "(") - (ch == ")") for ch in rest)
    end = next(i for i, d in enumerate(depth) if d == 0) + 1
  return rest[end:].lstrip().split("(", 1)[0].strip()


def _computations(hlo_text: str) -> tuple[str, dict[str, list[str]]]:
  computations: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif current is not None and line.startswith("  "):
      computations[current].append(line.strip())
  if not entry:
    raise ValueError("no ENTRY computation: pass the text of a compiled XLA module.")
  return entry, computations


def _kind(opcode: str, line: str) -> str | None:
  """The kind of a top-level instruction, or None for one that launches nothing."""
  if opcode in _FREE or opcode.endswith(("-done", "-update")):
    return None
  if opcode == "fusion":
    return "library" if "kind=kCustom" in line else "fusion"
  if opcode in _LIBRARY:
    return "library"
  if opcode.removesuffix("-start") in _COLLECTIVES:
    return "collective"
  return "copy" if opcode in ("copy", "copy-start") else "other"


def _callees(opcode: str, line: str) -> list[str]:
  """Computations an instruction runs as separate operations (not fused into it)."""
  found = re.findall(r"(?:body|condition|true_computation|false_computation)=" + _NAME, line)
  for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
    found += re.findall(_NAME, group)
  if opcode != "fusion":  # async-start wraps its op with calls=
    found += re.findall(r"calls=" + _NAME, line)
  if opcode == "call":  # elsewhere to_apply= names a reducer, run inside its op
    found += re.findall(r"to_apply=" + _NAME, line)
  return found


def top_level_ops(hlo_text: str) -> list[Op]:
  """The operations the program runs outside fusions, from the entry computation down."""
  entry, computations = _computations(hlo_text)
  parsed = {
    name: [(_opcode(m.group(1)), line) for line in lines if (m := _INSTRUCTION.match(line))]
    for name, lines in computations.items()
  }
  ops, seen, todo = [], {entry}, [entry]
  while todo:  # breadth first over the computations the entry reaches
    for opcode, line in parsed.get(todo.pop(0), []):
      for callee in _callees(opcode, line):
        if callee not in seen:
          seen.add(callee)
          todo.append(callee)
      kind = _kind(opcode, line)
      if kind is not None:
        op_name = _OP_NAME.search(line)
        ops.append(Op(opcode, kind, op_name.group(1) if op_name else ""))
  return ops


def op_counts(hlo_text: str) -> dict[str, int]:
  """Operations outside fusions by kind (`KINDS`)."""
  counts = collections.Counter(op.kind for op in top_level_ops(hlo_text))
  return {kind: counts.get(kind, 0) for kind in KINDS}


# -- Cost of a compiled program, loop bodies multiplied out ----------------------------
#
# XLA's own cost analysis (`compiled.cost_analysis()`) counts a while body once, whatever
# its trip count (the layer scan, the decode loop), and libtpu's `optimal_seconds` adds
# -1 s for every custom call it has no model for (`ConcatBitcast`, seen in every npp_jax
# train step), so it is negative for most real programs. `program_cost` reads the
# optimised HLO instead: matmul FLOPs (dot, convolution, cuBLAS gemms), bytes each
# top-level operation reads and writes (slices of stacked layer weights and in-place
# cache updates counted at their size, not the whole buffer's), and every collective,
# each multiplied by the trip counts of the loops around it.

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4}
_BYTES |= {"s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
# Instructions that move no memory of their own (structure, control, aliasing, the end
# of an asynchronous pair).
_NO_TRAFFIC = _FREE | {"copy-done", "all-reduce-done", "all-gather-done", "send-done"}
_SLICING = frozenset({"dynamic-slice", "slice", "gather"})


@dataclasses.dataclass
class _Inst:
  name: str
  opcode: str
  shape: str  # the result type text
  operands: list[str]
  line: str


@dataclasses.dataclass
class Collective:
  """One collective of a program: kind, dtype, bytes it outputs, group size, executions."""

  kind: str
  dtypes: tuple[str, ...]
  bytes: int
  group: int
  count: int
  in_loop: bool


@dataclasses.dataclass
class ProgramCost:
  """What one execution of a compiled program does on one chip (loops multiplied out)."""

  matmul_flops: float = 0.0
  bytes_accessed: float = 0.0
  collectives: list[Collective] = dataclasses.field(default_factory=list)
  # (matmul FLOPs, bytes, executions) per top-level operation, for the roofline.
  ops: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)
  loops: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (name, trips)
  unknown_trip_counts: int = 0

  def collective_summary(self) -> dict[str, dict]:
    """{kind: {count, bytes, dtypes}} over every execution."""
    out: dict[str, dict] = {}
    for col in self.collectives:
      row = out.setdefault(col.kind, {"count": 0, "bytes": 0, "dtypes": []})
      row["count"] += col.count
      row["bytes"] += col.bytes * col.count
      row["dtypes"] = sorted(set(row["dtypes"]) | set(col.dtypes))
    return out

  def roofline_seconds(self, peak_flops: float, hbm_bytes_per_s: float, link_bytes_per_s: float):
    """(compute-or-memory seconds, communication seconds): each operation takes the
    longer of its matmul FLOPs at peak and its bytes at HBM bandwidth; each collective
    moves its ring traffic over the chip's links, not overlapped with compute."""
    work = sum(n * max(f / peak_flops, b / hbm_bytes_per_s) for f, b, n in self.ops)
    comm = sum(col.count * _ring_bytes(col) / link_bytes_per_s for col in self.collectives)
    return work, comm


def _ring_bytes(col: Collective) -> float:
  """Bytes one chip sends for a collective over `group` chips (ring algorithms)."""
  if col.group <= 1:
    return 0.0
  share = (col.group - 1) / col.group
  if col.kind == "all-reduce":
    return 2 * share * col.bytes
  if col.kind == "reduce-scatter":
    return share * col.bytes * col.group  # its output is 1/group of what it reduces
  if col.kind in ("all-gather", "all-to-all"):
    return share * col.bytes
  return float(col.bytes)  # collective-permute, send/recv, broadcast


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
  return [
    (dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(shape.split("{")[0])
  ] or [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(shape)]


def _size(shape: str) -> int:
  total = 0
  for dt, dims in _ARRAY.findall(_strip_layouts(shape)):
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    total += n * _BYTES.get(dt, 1)
  return total


def _strip_layouts(shape: str) -> str:
  return re.sub(r"\{[^{}]*\}", "", re.sub(r"\{[^{}]*\{[^{}]*\}[^{}]*\}", "", shape))


def _dims(shape: str) -> list[int]:
  found = _ARRAY.findall(_strip_layouts(shape))
  return [int(d) for d in found[0][1].split(",") if d] if found else []


def _prod(xs) -> int:
  n = 1
  for x in xs:
    n *= x
  return n


def _parse(lines: list[str]) -> list[_Inst]:
  out = []
  for line in lines:
    m = re.match(r"^(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if not m:
      continue
    rest = m.group(2)
    opcode = _opcode(rest)
    shape = rest[: rest.index(" " + opcode + "(")] if " " + opcode + "(" in rest else rest
    start = rest.find(opcode + "(") + len(opcode) + 1
    depth, end = 1, start
    while end < len(rest) and depth:
      depth += (rest[end] == "(") - (rest[end] == ")")
      end += 1
    operands = re.findall(_NAME, rest[start : end - 1])
    out.append(_Inst(m.group(1), opcode, shape, operands, line))
  return out


def _matmul_flops(inst: _Inst, shapes: dict[str, str]) -> float:
  if inst.opcode == "dot":
    lhs = _dims(shapes.get(inst.operands[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.line)
    k = _prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * _prod(_dims(inst.shape)) * k
  if inst.opcode == "convolution":
    return _convolution_flops(inst, shapes)
  if inst.opcode == "custom-call" and re.search(
    r'custom_call_target="[^"]*(gemm|matmul)', inst.line
  ):
    lhs = _dims(shapes.get(inst.operands[0], ""))
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.line)
    k = _prod(lhs[int(i.strip('"'))] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * _prod(_dims(inst.shape)) * k
  return 0.0


def _window_taps(out: int, lhs: int, w: dict, d: int) -> int:
  """Sum over the outputs of one spatial dimension of the window taps that land on input
  (TPUs write batched matmuls as convolutions whose windows see one tap per output)."""
  size, stride = w["size"][d], w["stride"][d]
  lo, _ = w["pad"][d]
  ld, rd = w["lhs_dilate"][d], w["rhs_dilate"][d]
  span = (lhs - 1) * ld + 1
  taps = 0
  for o in range(out):
    for k in range(size):
      x = o * stride + k * rd - lo
      taps += 0 <= x < span and x % ld == 0
  return taps


def _convolution_flops(inst: _Inst, shapes: dict[str, str]) -> float:
  labels = re.search(r"dim_labels=([^_]*)_([^-]*)->(\S+?)[,\s]", inst.line + " ")
  lhs = _dims(shapes.get(inst.operands[0], ""))
  rhs = _dims(shapes.get(inst.operands[1], ""))
  out = _dims(inst.shape)
  if not labels or not lhs or not rhs or not out:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = sorted(ch for ch in out_l if ch.isdigit())
  w = {"size": [1] * len(spatial), "stride": [1] * len(spatial), "pad": [(0, 0)] * len(spatial)}
  w |= {"lhs_dilate": [1] * len(spatial), "rhs_dilate": [1] * len(spatial)}
  window = re.search(r"window=\{([^}]*)\}", inst.line)
  for key, value in re.findall(r"(\w+)=(\S+)", window.group(1) if window else ""):
    parts = value.split("x")
    if key == "pad":
      w["pad"] = [tuple(int(v) for v in p.split("_")) for p in parts]
    elif key in w:
      w[key] = [int(v) for v in parts]
  taps = 1
  for d, ch in enumerate(spatial):
    taps *= _window_taps(out[out_l.index(ch)], lhs[lhs_l.index(ch)], w, d)
  per_group_in = rhs[rhs_l.index("i")]
  return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * per_group_in * taps


class _Program:
  def __init__(self, hlo_text: str):
    self.entry, computations = _computations(hlo_text)
    self.comps = {name: _parse(lines) for name, lines in computations.items()}
    self.shapes = {i.name: i.shape for insts in self.comps.values() for i in insts}
    self._flops_cache: dict[str, float] = {}
    self._users_cache: dict[str, dict] = {}

  def fused_flops(self, comp: str) -> float:
    """Matmul FLOPs inside a fused computation (and the fusions nested in it)."""
    if comp not in self._flops_cache:
      total = 0.0
      for inst in self.comps.get(comp, []):
        total += _matmul_flops(inst, self.shapes)
        for callee in re.findall(r"calls=" + _NAME, inst.line):
          total += self.fused_flops(callee)
      self._flops_cache[comp] = total
    return self._flops_cache[comp]

  def _read_bytes(self, comp: str, value: str, full: int, depth: int = 0) -> float:
    """Bytes a fused computation reads of `value` (a parameter, or a bitcast of one): the
    slices it takes when it only slices it, nothing when it only updates it in place,
    else all of it. Nested fusions are followed."""
    total = 0.0
    for user, pos in self._users(comp).get(value, []):
      if user.opcode in _SLICING and pos == 0:
        total += _size(user.shape)
      elif user.opcode == "dynamic-update-slice" and pos == 0:
        continue  # updated in place: only the update is written (counted at the root)
      elif user.opcode == "bitcast" and depth < 8:
        total += self._read_bytes(comp, user.name, full, depth + 1)
      elif user.opcode == "fusion" and depth < 8:
        callee = re.search(r"calls=" + _NAME, user.line)
        param = self._params(callee.group(1)).get(pos) if callee else None
        if param is None:
          return full
        total += self._read_bytes(callee.group(1), param, full, depth + 1)
      else:
        return full
    return min(total, full)

  def _users(self, comp: str) -> dict[str, list[tuple[_Inst, int]]]:
    if comp not in self._users_cache:
      users: dict[str, list[tuple[_Inst, int]]] = {}
      for i in self.comps.get(comp, []):
        for pos, op in enumerate(i.operands):
          users.setdefault(op, []).append((i, pos))
      self._users_cache[comp] = users
    return self._users_cache[comp]

  def _params(self, comp: str) -> dict[int, str]:
    """{parameter number: instruction name} of a computation."""
    out = {}
    for i in self.comps.get(comp, []):
      m = re.search(r"parameter\((\d+)\)", i.line) if i.opcode == "parameter" else None
      if m:
        out[int(m.group(1))] = i.name
    return out

  def fusion_bytes(self, inst: _Inst, callee: str) -> float:
    """Bytes a fusion reads and writes (see `_read_bytes`; an in-place update writes its
    update, not the buffer)."""
    total = 0.0
    for index, pname in self._params(callee).items():
      if index < len(inst.operands):
        full = _size(self.shapes.get(inst.operands[index], ""))
        total += self._read_bytes(callee, pname, full)
    body = self.comps.get(callee, [])
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.line.startswith("ROOT ")), None)
    if root is None:
      return total + _size(inst.shape)
    roots = [by_name.get(n) for n in root.operands] if root.opcode == "tuple" else [root]
    for r in roots:
      while r is not None and r.opcode == "bitcast" and r.operands:
        r = by_name.get(r.operands[0])
      if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
        total += _size(self.shapes.get(r.operands[1], ""))
      elif r is not None:
        total += _size(r.shape)
    return total

  def trip_count(self, inst: _Inst, comp: str) -> int | None:
    m = re.search(r'known_trip_count[^0-9]*"?n"?\s*:\s*"?(\d+)', inst.line)
    if m:
      return int(m.group(1))
    cond = re.search(r"condition=" + _NAME, inst.line)
    body = self.comps.get(cond.group(1), []) if cond else []
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.line.startswith("ROOT ")), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.line:
      return None
    a, b = (by_name.get(n) for n in root.operands[:2])
    if a is None or b is None or a.opcode != "get-tuple-element" or b.opcode != "constant":
      return None
    bound = re.search(r"constant\((-?\d+)\)", b.line)
    index = re.search(r"index=(\d+)", a.line)
    if not bound or not index:
      return None
    start = 0
    outer = {i.name: i for i in self.comps.get(comp, [])}
    init = outer.get(inst.operands[0]) if inst.operands else None
    if init is not None and init.opcode == "tuple" and int(index.group(1)) < len(init.operands):
      first = outer.get(init.operands[int(index.group(1))])
      value = re.search(r"constant\((-?\d+)\)", first.line) if first is not None else None
      start = int(value.group(1)) if value else 0
    step = self._loop_step(inst, int(index.group(1)))
    return max(0, -(-(int(bound.group(1)) - start) // step))

  def _loop_step(self, inst: _Inst, index: int) -> int:
    """What the body adds to the loop counter at tuple `index` each trip: 1 for a scan,
    2 for the TPU compiler's windowed einsums (a bidirectional ring unrolled by two, which
    counts `i += 2` up to the ring size)."""
    body = re.search(r"body=" + _NAME, inst.line)
    insts = self.comps.get(body.group(1), []) if body else []
    by_name = {i.name: i for i in insts}
    root = next((i for i in insts if i.line.startswith("ROOT ")), None)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
      return 1
    update = by_name.get(root.operands[index])
    if update is None or update.opcode != "add":
      return 1
    step = None
    for name in update.operands[:2]:
      operand = by_name.get(name)
      if operand is None:
        continue
      if operand.opcode == "constant":
        step = int(re.search(r"constant\((-?\d+)\)", operand.line).group(1))
      elif operand.opcode != "get-tuple-element" or f"index={index}" not in operand.line:
        return 1
    return step if step and step > 0 else 1

  def walk(self, comp: str, mult: int, in_loop: bool, cost: ProgramCost) -> None:
    """Adds to `cost` what computation `comp` does when it runs `mult` times."""
    for inst in self.comps.get(comp, []):
      op = inst.opcode
      if op == "while":
        self._loop(inst, comp, mult, cost)
      elif op == "conditional":
        self._costliest_branch(inst, mult, in_loop, cost)
      elif op in ("call", "async-start"):
        for callee in re.findall(r"(?:to_apply|calls)=" + _NAME, inst.line):
          self.walk(callee, mult, in_loop, cost)
      elif op.removesuffix("-start") in _COLLECTIVES:
        cost.collectives.append(_collective(inst, mult, in_loop))
      elif not (op in _NO_TRAFFIC or op.endswith("-done")):
        flops, nbytes = self._op_cost(inst)
        cost.matmul_flops += mult * flops
        cost.bytes_accessed += mult * nbytes
        cost.ops.append((flops, nbytes, mult))

  def _loop(self, inst: _Inst, comp: str, mult: int, cost: ProgramCost) -> None:
    """A while loop: its body counted once per trip (once if the trip count is unknown)."""
    body = re.search(r"body=" + _NAME, inst.line)
    trips = self.trip_count(inst, comp)
    if trips is None:
      cost.unknown_trip_counts += 1
      trips = 1
    cost.loops.append((inst.name, trips))
    if body:
      self.walk(body.group(1), mult * trips, True, cost)

  def _costliest_branch(self, inst: _Inst, mult: int, in_loop: bool, cost: ProgramCost):
    """A conditional: the branch with the most bytes and FLOPs (an upper bound)."""
    branches = re.findall(r"(?:true_computation|false_computation)=" + _NAME, inst.line)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", inst.line):
      branches += re.findall(_NAME, group)
    best = None
    for b in branches:
      trial = ProgramCost()
      self.walk(b, mult, in_loop, trial)
      if best is None or trial.bytes_accessed + trial.matmul_flops > (
        best.bytes_accessed + best.matmul_flops
      ):
        best = trial
    if best is not None:
      _merge(cost, best)

  def _op_cost(self, inst: _Inst) -> tuple[float, int]:
    """(matmul FLOPs, bytes read and written) of one instruction or fusion."""
    op = inst.opcode
    if op == "fusion":
      callee = re.search(r"calls=" + _NAME, inst.line)
      flops = self.fused_flops(callee.group(1)) if callee else 0.0
      nbytes = self.fusion_bytes(inst, callee.group(1)) if callee else _size(inst.shape)
      return flops, nbytes
    flops = _matmul_flops(inst, self.shapes)
    if op == "dynamic-update-slice" and len(inst.operands) > 1:
      return flops, 2 * _size(self.shapes.get(inst.operands[1], ""))
    if op in _SLICING:
      return flops, 2 * _size(inst.shape)
    return flops, _size(inst.shape) + sum(_size(self.shapes.get(o, "")) for o in inst.operands)


def _collective(inst: _Inst, mult: int, in_loop: bool) -> Collective:
  """A collective with its dtypes and the size of what it moves."""
  base = inst.opcode.removesuffix("-start")
  arrays = _ARRAY.findall(_strip_layouts(inst.shape))
  size = _size(inst.shape)
  if inst.opcode.endswith("-start") and len(arrays) > 1 and base != "all-reduce":
    # An async start's tuple holds its input, its output and (collective-permute)
    # scalar u32 context words: count the output, the last array with a shape.
    shaped = [a for a in arrays if a[1].strip()] or arrays
    size = _size(f"{shaped[-1][0]}[{shaped[-1][1]}]")
    arrays = shaped[-1:]
  dtypes = tuple(sorted({dt for dt, _ in arrays})) or ("?",)
  return Collective(base, dtypes, size, _group(inst.line), mult, in_loop)


def _merge(into: ProgramCost, other: ProgramCost) -> None:
  into.matmul_flops += other.matmul_flops
  into.bytes_accessed += other.bytes_accessed
  into.collectives += other.collectives
  into.ops += other.ops
  into.loops += other.loops
  into.unknown_trip_counts += other.unknown_trip_counts


def _group(line: str) -> int:
  """Chips per group of a collective, from `replica_groups` (mesh, iota or list form) or
  the pairs of a collective-permute."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return _prod(int(sizes.get(a, 1)) for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  if "source_target_pairs" in line:
    return 2
  return 1


def program_cost(hlo_text: str) -> ProgramCost:
  """The per-chip cost of one execution of a compiled program (see above)."""
  program = _Program(hlo_text)
  cost = ProgramCost()
  program.walk(program.entry, 1, False, cost)
  return cost

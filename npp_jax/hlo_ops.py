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
  while todo:
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

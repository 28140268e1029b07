"""What a compiled XLA program runs: its operations outside fusions, read from the HLO text.

Each fusion is one kernel on a GPU (one loop nest on a CPU); a `library` op is a cuBLAS or
cuDNN call (or a dot/convolution XLA did not fuse); anything else outside a fusion (a
`copy`, an elementwise op XLA could not merge) is extra memory traffic. Loop bodies
(`while`, the layer scan) are counted once, not per iteration. `bench train` reports the
counts; the tests use the op names to check that RMSNorm and RoPE run inside fusions.
"""

import collections
import dataclasses
import itertools
import re

# Instructions that launch nothing: structure, control flow and aliasing.
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
  }
)
_LIBRARY = frozenset({"custom-call", "dot", "convolution"})
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%[\w.\-]+ = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Op:
  """One operation outside any fusion: its opcode, kind and the JAX name stack it came from."""

  opcode: str
  kind: str  # "fusion", "library", "copy" or "other"
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


def top_level_ops(hlo_text: str) -> list[Op]:
  """The operations the program runs outside fusions (entry, loop bodies, branches)."""
  entry, computations = _computations(hlo_text)
  fused, control = set(), set()
  for lines in computations.values():
    for line in lines:
      fusion = " fusion(" in line
      for callee in re.findall(r"calls=%([\w.\-]+)", line):
        (fused if fusion else control).add(callee)
      control.update(re.findall(r"(?:body|condition)=%([\w.\-]+)", line))
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        control.update(re.findall(r"%([\w.\-]+)", group))
  ops = []
  for name in [entry, *sorted(control - fused)]:
    for line in computations.get(name, []):
      instruction = _INSTRUCTION.match(line)
      if not instruction:
        continue
      opcode = _opcode(instruction.group(1))
      if opcode in _FREE:
        continue
      if opcode == "fusion":
        kind = "fusion"
      elif opcode in _LIBRARY:
        kind = "library"
      else:
        kind = "copy" if opcode.startswith("copy") else "other"
      op_name = _OP_NAME.search(line)
      ops.append(Op(opcode, kind, op_name.group(1) if op_name else ""))
  return ops


def op_counts(hlo_text: str) -> dict[str, int]:
  """Operations outside fusions by kind: {"fusion", "library", "copy", "other"}."""
  counts = collections.Counter(op.kind for op in top_level_ops(hlo_text))
  return {kind: counts.get(kind, 0) for kind in ("fusion", "library", "copy", "other")}

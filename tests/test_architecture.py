"""The README's code map lists exactly the package's modules."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent


def _code_map_modules() -> set[str]:
  readme = (ROOT / "README.md").read_text()
  block = readme.split("## Code map", 1)[1].split("```", 2)[1]
  names, parents = set(), []
  for line in block.splitlines()[1:]:
    m = re.match(r"^( *)(\S+)", line)
    if not m or m.group(2) == "npp_jax/":
      continue
    depth = len(m.group(1)) // 2 - 1
    parents = parents[:depth]
    name = m.group(2)
    if name.endswith("/"):
      parents.append(name.rstrip("/"))
    else:
      names.add("/".join([*parents, name]))
  return names


def test_code_map_matches_the_tree():
  package = ROOT / "npp_jax"
  actual = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
  listed = _code_map_modules()
  assert len(listed) > 30  # positive control: the parser reads the map
  assert listed == actual, (
    f"README code map: missing {sorted(actual - listed)}, stale {sorted(listed - actual)}"
  )

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


def test_core_install_is_cpu_jax_and_accelerators_are_extras():
  """No TensorFlow or PyTorch in the core requirements; the TPU and CUDA runtimes are
  extras of the JAX project's own wheels, and the launchers install them."""
  import ast

  tree = ast.parse((ROOT / "setup.py").read_text())
  values = {
    t.id: ast.literal_eval(n.value)
    for n in tree.body
    if isinstance(n, ast.Assign)
    for t in n.targets
    if isinstance(t, ast.Name) and t.id in ("CORE", "EXTRAS")
  }
  core = " ".join(values["CORE"])
  assert "tensorflow" not in core and "torch" not in core and "jax[" not in core
  extras = values["EXTRAS"]
  assert extras["tpu"][0] == "jax[tpu]>=0.7.1" and set(extras["gcs"]) <= set(extras["tpu"])
  assert extras["cuda"][0].startswith("jax[cuda12]")
  assert extras["cuda13"][0].startswith("jax[cuda13]")
  assert (
    'install EXTRAS=$(printf %q "${NPP_EXTRAS:-tpu}")'
    in (ROOT / "launch" / "tpu_pod.sh").read_text()
  )
  assert 'install EXTRAS="${NPP_EXTRAS:-cuda}"' in (ROOT / "launch" / "slurm_gpu.sh").read_text()


def test_every_command_module_imports_beside_the_others():
  """Tests and notebooks import command modules as libraries, several in one process: none
  may define absl flags at import (absl refuses a flag defined twice; this broke CI when
  the study and aot tests shared a worker)."""
  import subprocess
  import sys

  commands = sorted(p.stem for p in (ROOT / "npp_jax").glob("*.py") if "def run(" in p.read_text())
  assert {"aot", "main", "study"} <= set(commands)  # positive control: the entry modules
  script = "; ".join(f"import npp_jax.{name}" for name in commands)
  script += "; from absl import flags; print(sorted(flags.FLAGS))"
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "'config'" not in out.stdout and "'topology'" not in out.stdout

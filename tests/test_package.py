"""The wheel and sdist build from a clone and pass `twine check` (ready for the index)."""

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_and_sdist_pass_twine_check(tmp_path):
  pytest.importorskip("build", reason="the `release` extra (make install) builds the package")
  # No isolation: the installed setuptools builds it, so nothing is downloaded.
  cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), ROOT]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  (wheel,) = tmp_path.glob("npp_jax-*.whl")
  (sdist,) = tmp_path.glob("npp_jax-*.tar.gz")
  res = subprocess.run(
    [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0 and res.stdout.count("PASSED") == 2, res.stdout + res.stderr
  names = zipfile.ZipFile(wheel).namelist()
  assert "npp_jax/main.py" in names and "npp_jax/jobs/train.py" in names
  assert not any(n.startswith("tests/") for n in names)
  entry_points = next(n for n in names if n.endswith("entry_points.txt"))
  assert "npp-jax = npp_jax.main:run" in zipfile.ZipFile(wheel).read(entry_points).decode()
  with tarfile.open(sdist) as tar:
    members = tar.getnames()
  assert any(m.endswith("configs/l.py") for m in members)
  assert any(m.endswith("launch/tpu_pod.sh") for m in members)

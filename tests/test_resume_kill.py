"""A training process killed with SIGKILL and restarted logs the losses of an unbroken run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .helpers import shared_once, write_random_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_file(tmp_path, data_dir):
  path = tmp_path / "kill_config.py"
  path.write_text(
    textwrap.dedent(f"""
    from tests.helpers import tiny_config

    def get_config():
      return tiny_config({str(data_dir)!r}, **{{"train.epochs": 12, "train.ckpt_every_steps": 7}})
  """)
  )
  return str(path)


def _run(config, workdir, own_cache=False, **kw):
  """`python -m npp_jax.main` on `workdir`: with the test session's compilation cache, or
  (`own_cache`) with the default one in the workdir."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  if own_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "npp_jax.main", f"--config={config}", f"--workdir={workdir}"]
  return subprocess.Popen(
    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
  )


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"], r["patch_side"]) for r in rows]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  """(config file, workdir) of one unbroken run, the reference of both interruption tests
  (trained once for the test session, whichever worker asks first)."""

  def build(root):
    # 6 steps per epoch, 72 steps, stages end at 18, 36, 72
    write_random_dataset(root / "data", n=96)
    full = _run(_config_file(root, root / "data"), root / "full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

  root = shared_once(tmp_path_factory, "unbroken-interrupted-run", build)
  return str(root / "kill_config.py"), root / "full"


@pytest.mark.slow
def test_sigkill_and_restart_is_exact(tmp_path, unbroken):
  config, full = unbroken

  victim_dir = tmp_path / "victim"
  victim = _run(config, victim_dir, own_cache=True)
  ckpts = victim_dir / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and victim.poll() is None:
    done = [int(x) for x in os.listdir(ckpts) if x.isdigit()] if ckpts.exists() else []
    if done and max(done) >= 21:  # killed somewhere in stage 2, mid-stage, while running
      break
    time.sleep(0.01)
  assert victim.poll() is None, "the run finished before it could be killed; make it longer"
  os.kill(victim.pid, signal.SIGKILL)
  victim.wait()
  killed_at = len(_losses(victim_dir))
  assert killed_at < 72

  again = _run(config, victim_dir, own_cache=True)
  out, _ = again.communicate(timeout=600)
  assert again.returncode == 0, out
  assert "resumed from step" in out
  # The restart loads the stage's step from the persistent compilation cache in the
  # workdir instead of compiling it again (and, below, computes exactly the same losses).
  assert "loaded (compilation cache) the train step" in out, out
  assert any((victim_dir / "compile_cache").iterdir())
  want, got = _losses(full), _losses(victim_dir)
  assert [s for s, _, _ in got] == list(range(1, 73))
  assert got == want, "bitwise-identical losses, step for step"


@pytest.mark.slow
def test_sigterm_checkpoints_then_stops_and_resumes_exactly(tmp_path, unbroken):
  config, full = unbroken
  victim_dir = tmp_path / "victim"
  victim = _run(config, victim_dir)
  deadline = time.time() + 600
  while time.time() < deadline and victim.poll() is None:
    rows = len(_losses(victim_dir)) if (victim_dir / "metrics.jsonl").exists() else 0
    if rows >= 20:
      break
    time.sleep(0.01)
  os.kill(victim.pid, signal.SIGTERM)
  out, _ = victim.communicate(timeout=600)
  assert victim.returncode == 0, out
  assert "stopped by SIGTERM at step" in out
  stopped_at = len(_losses(victim_dir))
  assert 20 <= stopped_at < 72
  saved = [int(x) for x in os.listdir(victim_dir / "checkpoints") if x.isdigit()]
  assert max(saved) == stopped_at, (
    "a checkpoint at the step where it stopped, not the last periodic"
  )
  again = _run(config, victim_dir)
  out, _ = again.communicate(timeout=600)
  assert again.returncode == 0, out
  assert f"resumed from step {stopped_at}" in out
  assert _losses(victim_dir) == _losses(full)

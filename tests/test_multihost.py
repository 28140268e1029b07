"""Two JAX processes on one machine (gloo): per-host input slices, checkpoints and resume,
and sampling across hosts give what one process with the same devices gives."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from .helpers import shared_once, write_random_dataset

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cluster(workdir, data, max_steps, mode, processes=2, local_devices=2):
  return _finish(_start(workdir, data, max_steps, mode, processes, local_devices))


def _start(workdir, data, max_steps, mode, processes=2, local_devices=2):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["NPP_TEST_LOCAL_DEVICES"] = str(local_devices)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        WORKER,
        str(i),
        str(processes),
        str(port),
        str(workdir),
        str(data),
        str(max_steps),
        mode,
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  return procs


def _finish(procs):
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  return [
    json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out in outs
  ]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_two_processes_train_resume_and_sample_like_one(tmp_path):
  data = tmp_path / "data"
  write_random_dataset(data, n=96)
  multi, single = tmp_path / "multi", tmp_path / "single"
  first = _cluster(multi, data, 8, "train")
  assert [r["devices"] for r in first] == [4, 4] and [r["step"] for r in first] == [8, 8]
  # The reference: one process that owns all 4 devices, same config, run straight to 12.
  (ref,) = _cluster(single, data, 12, "train", processes=1, local_devices=4)
  assert ref["devices"] == 4
  resumed = _cluster(multi, data, 12, "train")
  assert [r["resumed_from"] for r in resumed] == [8, 8]
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
  assert len(_losses(multi)) == 12

  out = _cluster(multi, data, 12, "sample")
  with np.load(out[0]["npz"]) as z:
    tokens, images = z["tokens"], z["arr_0"]
  assert tokens.shape == (12, 64)
  assert os.path.exists(out[0]["png"])
  # Each host decoded and wrote its own rows of each of the two batches of 8.
  parts = sorted(os.listdir(os.path.join(out[0]["dir"], "parts")))
  assert parts == [f"part-0000{b}-00{p}of002.npz" for b in range(2) for p in range(2)]
  for name in parts:
    with np.load(os.path.join(out[0]["dir"], "parts", name)) as z:
      assert len(z["rows"]) == 4 and len(z["images"]) == 4 or name.startswith("part-00001")
  # The assembled samples are those of one process sampling the same checkpoint alone.
  solo = tmp_path / "solo"
  shutil.copytree(multi / "checkpoints", solo / "checkpoints")
  (one,) = _cluster(solo, data, 12, "sample", processes=1, local_devices=4)
  with np.load(one["npz"]) as z:
    np.testing.assert_array_equal(z["tokens"], tokens)
    np.testing.assert_array_equal(z["arr_0"], images)


LONG_STEPS = 72  # 6 steps per epoch of 96 records, 12 epochs: stages end at 18, 36, 72


@pytest.fixture(scope="session")
def unbroken_long_run(tmp_path_factory):
  """(data, workdir) of one unbroken two-host run, the reference of both SIGTERM cases
  (computed once for the test session, whichever worker runs them)."""

  def build(root):
    write_random_dataset(root / "data", n=96)
    out = _cluster(root / "run", root / "data", LONG_STEPS, "train_long")
    assert [r["step"] for r in out] == [LONG_STEPS, LONG_STEPS]

  root = shared_once(tmp_path_factory, "unbroken-two-host-run", build)
  return root / "data", root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [(0, 1), (1,)], ids=["both-hosts", "one-host"])
def test_sigterm_stops_every_host_at_one_step_and_resumes_exactly(
  tmp_path, signalled, unbroken_long_run
):
  """SIGTERM (a preemption notice) on both hosts, or on one: JAX's preemption sync point
  stops both at the same step, one checkpoint is written there, and a rerun logs the
  losses of an unbroken run."""
  data, unbroken = unbroken_long_run
  total = LONG_STEPS

  victim = tmp_path / "victim"
  procs = _start(victim, data, total, "train_long")
  metrics = victim / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 24:
      break
    time.sleep(0.01)
  assert all(p.poll() is None for p in procs), "the run ended before the notice; lengthen it"
  for i in signalled:
    os.kill(procs[i].pid, signal.SIGTERM)
  stopped = _finish(procs)
  steps = {r["step"] for r in stopped}
  assert len(steps) == 1, stopped  # every host stopped at the same step
  (step,) = steps
  assert 24 <= step < total and all(r["stopped_by"] for r in stopped), stopped
  saved = sorted(int(d) for d in os.listdir(victim / "checkpoints") if d.isdigit())
  assert saved[-1] == step, saved

  resumed = _cluster(victim, data, total, "train_long")
  assert [r["resumed_from"] for r in resumed] == [step, step]
  assert [r["step"] for r in resumed] == [total, total]
  np.testing.assert_array_equal(_losses(victim), _losses(unbroken))


PEER_WORKER = os.path.join(os.path.dirname(__file__), "peer_failure_worker.py")


def _main_on_two_hosts(config, workdir, fail_at_read):
  """`python -m npp_jax.main` on two processes joined as a launcher joins them (the JAX_*
  variables); host 1's training-data read number `fail_at_read` fails."""
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = []
  for host in range(2):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {
      "NPP_DISTRIBUTED": "1",
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(host),
      "PYTHONPATH": root,
    }
    cmd = [sys.executable, PEER_WORKER, "1", str(fail_at_read), f"--config={config}"]
    cmd += [f"--workdir={workdir}"]
    procs.append(
      subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  return [(p, *p.communicate(timeout=600)) for p in procs]


@pytest.mark.slow
def test_one_hosts_storage_failure_stops_every_host_in_one_line(tmp_path):
  """Host 1 loses storage mid-run (its data read fails past the deadline) while host 0 goes
  on into the next step's collectives: both end within seconds, each with one line naming
  host 1's failure, exit status 75, no traceback and no abort from JAX's coordination
  service (which, without this, kills the waiting host). The rerun resumes on both."""
  import textwrap  # noqa: PLC0415

  data = tmp_path / "data"
  write_random_dataset(data, n=96)  # 6 steps per epoch, stage ends at steps 6, 12 and 24
  config = tmp_path / "config.py"
  config.write_text(
    textwrap.dedent(f"""
    from tests.helpers import tiny_config

    def get_config():
      return tiny_config({str(data)!r})
  """)
  )
  run = tmp_path / "run"
  hosts = _main_on_two_hosts(config, run, fail_at_read=10)
  ended = time.time()
  cause = "read the training data gs://bucket/codes failed after 300 s"
  for host, (p, _, err) in enumerate(hosts):
    assert p.returncode == 75, (host, err[-3000:])
    assert "Traceback" not in err and "Check failure" not in err, (host, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], (host, err[-3000:])
    assert cause in errors[0]
    want = "error: storage: " if host == 1 else "error: host 1 stopped the job: storage: "
    assert errors[0].startswith(want), errors[0]
    logs = sorted((run / "logs").glob("train-*.log"))
    (log,) = [f for f in logs if f.name.endswith("-host1.log") == (host == 1)]
    assert errors[0] in log.read_text()
  assert ended - os.path.getmtime(run / "metrics.jsonl") < 30
  assert _losses(run) and len(_losses(run)) == 9  # host 1 failed reading step 10's batch

  for host, (p, _, err) in enumerate(_main_on_two_hosts(config, run, fail_at_read=1000)):
    assert p.returncode == 0, (host, err[-3000:])  # and no abort at the watcher's exit
    assert "resumed from step 6" in err and "finished at step 24" in err, err[-3000:]

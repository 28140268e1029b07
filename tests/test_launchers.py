"""launch/tpu_pod.sh and launch/slurm_gpu.sh, run for real with stand-ins for `gcloud` and
`srun` on PATH: each records its arguments and runs the command it was given as two local
processes, which form a JAX cluster through SLURM's variables (the stand-in for the pod's
own topology discovery). Checks the launchers' quoting (a workdir with a space), their
environment (NPP_DISTRIBUTED, one process per host) and their install step (NPP_EXTRAS).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [
  "--config.model.dim=32",
  "--config.model.n_layer=1",
  "--config.model.n_head=2",
  "--config.model.scan_unroll=1",
  "--config.train.max_steps=6",
  "--config.train.ckpt_every_steps=3",
  "--config.train.log_every_steps=3",
  "--config.train.eval_every_steps=0",
]

# Runs the command two times at once, as processes 0 and 1 of a 2-host job, each with two
# CPU devices; exits with the first non-zero status.
_HOSTS = """
def run_on_two_hosts(command, log_name):
  import os, random, subprocess, sys
  job = random.randrange(1 << 20)
  procs = []
  for rank in range(2):
    env = dict(os.environ, SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID="0",
               JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               + os.environ.get("NPP_TEST_XLA_FLAGS", ""))
    out = open(os.path.join(os.environ["FAKE_LOG_DIR"], f"{log_name}-{rank}.log"), "w")
    procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
  codes = [p.wait() for p in procs]
  sys.exit(next((c for c in codes if c), 0))
"""

GCLOUD = """
import json, os, sys
with open(os.path.join(os.environ["FAKE_LOG_DIR"], "gcloud.json"), "w") as f:
  json.dump(sys.argv[1:], f)
command = sys.argv[sys.argv.index("--command") + 1]
run_on_two_hosts(["bash", "-c", command], "worker")
"""

SRUN = """
import json, os, sys
with open(os.path.join(os.environ["FAKE_LOG_DIR"], "srun.json"), "w") as f:
  json.dump(sys.argv[1:], f)
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun's own options
  args = args[1:]
run_on_two_hosts(args, "task")
"""


def _stand_ins(tmp_path):
  bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
  bin_dir.mkdir()
  logs.mkdir()
  for name, body in (("gcloud", GCLOUD), ("srun", SRUN)):
    script = bin_dir / name
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(_HOSTS) + textwrap.dedent(body))
    script.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env |= {"PATH": f"{bin_dir}:{env['PATH']}", "FAKE_LOG_DIR": str(logs), "NPP_EXTRAS": "dev"}
  # The two stand-in hosts share this checkout's .venv, where a real pod has one per
  # worker: bring it up to date once, so that their own `make install` finds it done.
  subprocess.run(["make", "-s", "install", "EXTRAS=dev"], cwd=ROOT, check=True, timeout=900)
  return env, logs


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _check_run(workdir, logs, prefix):
  out = [(logs / f"{prefix}-{r}.log").read_text() for r in range(2)]
  assert "processes: 2" in out[0] and "processes: 2" in out[1], out[0][-2000:]
  assert [r["step"] for r in _metrics(workdir) if "loss" in r][-1] == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.slow
def test_tpu_pod_launcher_through_a_gcloud_stand_in(tmp_path):
  env, logs = _stand_ins(tmp_path)
  workdir = tmp_path / "pod run"  # a space: the remote command must quote it
  cmd = ["bash", "launch/tpu_pod.sh", "my-tpu", "us-central2-b", "configs/mnist.py"]
  done = subprocess.run(
    [*cmd, str(workdir), *TRAIN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  args = json.loads((logs / "gcloud.json").read_text())
  assert args[:8] == [
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-tpu",
    "--zone",
    "us-central2-b",
    "--worker=all",
  ]
  assert "make -s install EXTRAS=dev" in args[-1] and "NPP_DISTRIBUTED=1" in args[-1]
  _check_run(workdir, logs, "worker")
  assert not (tmp_path / "pod").exists()


@pytest.mark.slow
def test_slurm_launcher_through_an_srun_stand_in(tmp_path):
  env, logs = _stand_ins(tmp_path)
  workdir = tmp_path / "slurm run"
  done = subprocess.run(
    ["bash", "launch/slurm_gpu.sh", "configs/mnist.py", str(workdir), *TRAIN],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  args = json.loads((logs / "srun.json").read_text())
  assert args[:3] == ["--ntasks-per-node=1", "env", "NPP_DISTRIBUTED=1"]
  assert f"--workdir={workdir}" in args
  _check_run(workdir, logs, "task")

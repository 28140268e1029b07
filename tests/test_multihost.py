"""Two JAX processes on one machine (gloo): per-host input slices, checkpoints and resume,
and sampling across hosts give what one process with the same devices gives."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from .helpers import write_random_dataset

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cluster(workdir, data, max_steps, mode, processes=2, local_devices=2):
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
    tokens = z["tokens"]
  assert tokens.shape == (12, 64)
  assert os.path.exists(out[0]["png"])

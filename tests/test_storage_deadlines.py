"""Bucket operations have a deadline and bounded retries; what is past it is one line."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from npp_jax.infra import storage

from .helpers import write_random_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def quick(monkeypatch):
  monkeypatch.setattr(storage, "DEADLINE_S", 3.0)
  monkeypatch.setattr(storage, "_failed", [])


def test_an_operation_that_hangs_ends_at_the_deadline(quick):
  @storage.bounded("read")
  def hangs(path):
    time.sleep(60)

  t0 = time.monotonic()
  with pytest.raises(storage.StorageError) as e:
    hangs("gs://bucket/run/metrics.jsonl")
  took = time.monotonic() - t0
  assert 2.5 < took < 4.5, took
  msg = str(e.value)
  assert msg.startswith("read gs://bucket/run/metrics.jsonl failed after 3 s") and "\n" not in msg
  # Storage is gone: the next operation fails at once instead of waiting again.
  t0 = time.monotonic()
  with pytest.raises(storage.StorageError, match="storage failed earlier"):
    hangs("gs://bucket/run/other")
  assert time.monotonic() - t0 < 0.5
  # The next job in this process (a notebook's rerun once the bucket is back) starts fresh.
  storage.set_deadline(3.0)
  assert not storage.failed()
  with pytest.raises(storage.StorageError, match="failed after 3 s"):
    hangs("gs://bucket/run/other")


def test_transient_errors_are_retried_and_request_errors_are_not(quick):
  calls = []

  @storage.bounded("write")
  def flaky(path):
    calls.append(time.monotonic())
    if len(calls) < 2:
      raise ConnectionResetError("connection reset by peer")
    return "ok"

  assert flaky("gs://bucket/x") == "ok" and len(calls) == 2
  assert 0.9 < calls[1] - calls[0] < 2.0  # backed off a second

  @storage.bounded("read")
  def missing(path):
    raise FileNotFoundError(path)

  with pytest.raises(FileNotFoundError):  # an answer, not a storage failure
    missing("gs://bucket/none")

  @storage.bounded("read")
  def down(path):
    raise ConnectionRefusedError("Cannot connect to host 127.0.0.1:1")

  with pytest.raises(storage.StorageError, match="the storage endpoint is unreachable"):
    down("gs://bucket/y")


def test_local_paths_run_as_they_are(quick, tmp_path):
  storage.write_text(str(tmp_path / "a.txt"), "x")
  assert storage.read_text(str(tmp_path / "a.txt")) == "x"
  storage.check_writable(str(tmp_path))  # nothing to check on a local disk


def test_a_full_disk_is_one_storage_error_naming_the_file(tmp_path):
  target = tmp_path / "metrics.jsonl"
  os.symlink("/dev/full", target)  # every write to it fails with ENOSPC
  with pytest.raises(storage.StorageError) as e:
    storage.append_text(str(target), "row\n")
  assert str(e.value) == f"write {target} failed: the disk is full"


def _can_mount_a_small_disk() -> str:
  """'' when `unshare -rm` may mount a tmpfs here (a user namespace), else why not."""
  try:
    probe = subprocess.run(
      ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
      capture_output=True,
      text=True,
      timeout=30,
    )
  except (FileNotFoundError, subprocess.TimeoutExpired) as e:
    return str(e)
  return "" if probe.returncode == 0 else probe.stderr.strip()


@pytest.mark.slow
def test_a_full_disk_mid_run_ends_in_one_line_and_the_rescued_state_resumes(tmp_path):
  """Training into a 200 KB disk (a tmpfs in a private mount namespace) that a checkpoint
  does not fit: exit status 75, the last line names the checkpoint folder and the full
  disk and where the state was saved instead; that copy resumes the run."""
  why = _can_mount_a_small_disk()
  if why:
    pytest.skip(f"cannot mount a small disk here: {why}")
  write_random_dataset(tmp_path / "data", n=96)
  config = tmp_path / "config.py"
  config.write_text(
    textwrap.dedent(f"""
    from tests.helpers import tiny_config

    def get_config():
      return tiny_config({str(tmp_path / "data")!r}, **{{"train.ckpt_every_steps": 4}})
  """)
  )
  wd = tmp_path / "wd"
  wd.mkdir()
  env = {**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path / "home")}
  main = f"{sys.executable} -m npp_jax.main --config={config}"
  script = f"mount -t tmpfs -o size=200k tmpfs {wd} && exec {main} --workdir={wd}"
  out = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  last = out.stderr.splitlines()[-1]
  assert out.returncode == 75, out.stderr[-3000:]
  # Libraries' tracebacks (orbax's failed background save, tensorstore's closed event
  # loop) are in the log file, not above the line.
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  saved = re.fullmatch(
    rf"error: storage: saving step (\d+) in {wd}/checkpoints failed: the disk is full; the "
    rf"state at step \1 is saved in (\S+): copy that folder to {wd}/checkpoints/\1 once it "
    r"can be written again and rerun to resume from it",
    last,
  )
  assert saved, last
  step, rescued = int(saved[1]), saved[2]
  fresh = tmp_path / "fresh"
  shutil.copytree(rescued, fresh / "checkpoints" / str(step))
  cmd = [*main.split(), f"--workdir={fresh}", "--config.train.max_steps=10"]
  again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from step {step}" in again.stderr


def test_a_failed_data_read_rescues_the_state_under_its_own_step(tmp_path, monkeypatch):
  """Storage lost while the batch of step 10 is read: the state of step 9 is rescued as
  step 9 (with its data position), and a run continued from it trains on."""
  from npp_jax.jobs import train  # noqa: PLC0415

  from .helpers import tiny_config  # noqa: PLC0415

  write_random_dataset(tmp_path / "data", n=96)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  read, count = train.Trainer.next_batch, [0]

  def next_batch(self):
    count[0] += 1
    if count[0] == 10:
      raise storage.StorageError("read the training data gs://b/codes failed after 1 s: test")
    return read(self)

  monkeypatch.setattr(train.Trainer, "next_batch", next_batch)
  c = tiny_config(tmp_path / "data")
  with pytest.raises(storage.StorageError) as e:
    train.run(c, str(tmp_path / "wd"))
  saved = re.search(r"the state at step (\d+) is saved in (\S+):", str(e.value))
  assert saved and saved[1] == "9", str(e.value)
  monkeypatch.setattr(train.Trainer, "next_batch", read)
  fresh = tmp_path / "fresh"
  shutil.copytree(saved[2], fresh / "checkpoints" / "9")
  summary = train.run(tiny_config(tmp_path / "data", **{"train.max_steps": 12}), str(fresh))
  assert summary["resumed_from"] == 9 and summary["step"] == 12

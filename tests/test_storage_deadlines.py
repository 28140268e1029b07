"""Bucket operations have a deadline and bounded retries; what is past it is one line."""

import time

import pytest

from npp_jax import storage


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

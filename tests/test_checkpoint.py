"""Resume and failure behaviour: what is refused, what falls back, what is never lost."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from npp_jax import sharding
from npp_jax.infra import checkpoint
from npp_jax.jobs import train

from .helpers import read_metrics, tiny_config, write_random_dataset


@pytest.fixture()
def data_dir(tmp_path):
  d = tmp_path / "data"
  write_random_dataset(d, n=96)
  return d


def _steps(wd):
  return sorted(int(x) for x in os.listdir(wd / "checkpoints") if x.isdigit())


def test_fingerprint_sees_every_bit_and_ignores_sharding():
  x = {"a": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(3, jnp.bfloat16), "n": jnp.int32(5)}
  base = checkpoint.fingerprint(x)
  assert base == checkpoint.fingerprint(jax.tree.map(jnp.array, x))
  bits = np.asarray(x["a"]).view(np.uint32).copy()
  bits[3, 5] ^= 1 << 7  # one flipped bit
  assert checkpoint.fingerprint({**x, "a": jnp.asarray(bits.view(np.float32))}) != base
  swapped = np.asarray(x["a"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checkpoint.fingerprint({**x, "a": jnp.asarray(swapped)}) != base
  assert checkpoint.fingerprint({**x, "b": x["b"].at[1].set(2)}) != base
  mesh = sharding.make_mesh({"data": -1})
  sharded = jax.device_put(x["a"], NamedSharding(mesh, PartitionSpec("data")))
  assert checkpoint.fingerprint({**x, "a": sharded}) == base


def test_changed_optimizer_is_refused_and_nothing_moves(data_dir, tmp_path):
  wd = tmp_path / "wd"
  train.run(tiny_config(data_dir, **{"train.max_steps": 8}), str(wd))
  assert _steps(wd) == [6, 8]
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=r"another structure[\s\S]*optim.grad_clip: checkpoint 1.0, config 0.0",
  ):
    train.run(tiny_config(data_dir, **{"optim.grad_clip": 0.0}), str(wd))
  assert _steps(wd) == [6, 8] and not (wd / "checkpoints_unreadable").exists()
  # The data iterator was not left at a wrong position: the original settings resume.
  summary = train.run(tiny_config(data_dir, **{"train.max_steps": 10}), str(wd))
  assert summary["resumed_from"] == 8 and summary["step"] == 10


def _flip_bytes(directory):
  """XORs 4 KB in the middle of every data file under `directory` (orbax's compressed
  chunks: some may be stale, so every file is hit)."""
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if name.startswith("_") or os.path.getsize(path) < 8192:
        continue
      with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(4096)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0x5A for b in chunk))


def test_flipped_bytes_are_detected_and_the_previous_checkpoint_used(data_dir, tmp_path, caplog):
  wd = tmp_path / "wd"
  train.run(tiny_config(data_dir, **{"train.max_steps": 12}), str(wd))
  _flip_bytes(wd / "checkpoints" / "12" / "state")
  with caplog.at_level(logging.WARNING):
    summary = train.run(tiny_config(data_dir, **{"train.max_steps": 14}), str(wd))
  assert summary["resumed_from"] == 6
  assert "checkpoint 12" in caplog.text and "damaged" in caplog.text
  assert any(n.startswith("12-") for n in os.listdir(wd / "checkpoints_unreadable"))
  # The rerun redid steps 7..12 and continued: its losses are an unbroken run's.
  full = tmp_path / "full"
  train.run(tiny_config(data_dir, **{"train.max_steps": 14}), str(full))
  assert [r["loss"] for r in read_metrics(wd)] == [r["loss"] for r in read_metrics(full)]


def test_a_state_that_differs_from_its_fingerprint_is_not_used(data_dir, tmp_path, caplog):
  """What a silent corruption looks like to restore: arrays that read back without error
  but are not the ones saved."""
  wd = tmp_path / "wd"
  train.run(tiny_config(data_dir, **{"train.max_steps": 12}), str(wd))
  meta = wd / "checkpoints" / "12" / "meta" / "metadata"
  saved = json.loads(meta.read_text())
  meta.write_text(json.dumps({**saved, "fingerprint": (saved["fingerprint"] + 1) % 2**32}))
  with caplog.at_level(logging.WARNING):
    summary = train.run(tiny_config(data_dir, **{"train.max_steps": 13}), str(wd))
  assert summary["resumed_from"] == 6
  assert "does not match the fingerprint saved with it" in caplog.text


def test_resume_on_another_dataset_is_refused(data_dir, tmp_path):
  wd = tmp_path / "wd"
  train.run(tiny_config(data_dir, **{"train.max_steps": 3}), str(wd))
  other = tmp_path / "other"
  write_random_dataset(other, n=192, seed=1)
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=r"num_records: checkpoint 96, now 192[\s\S]*steps_per_epoch: checkpoint 6, now 12",
  ):
    train.run(tiny_config(other), str(wd))
  assert _steps(wd) == [3]


def test_a_second_trainer_on_the_workdir_is_refused(data_dir, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import fcntl, time; f = open({!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
      "f.write('host elsewhere, pid 4242'); f.flush(); print('locked', flush=True); "
      "time.sleep(120)".format(str(wd / "train.lock")),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match=r"another trainer is running .*pid 4242"):
      train.run(tiny_config(data_dir, **{"train.max_steps": 1}), str(wd))
  finally:
    holder.kill()
    holder.wait()
  # A dead owner leaves no stale lock.
  assert train.run(tiny_config(data_dir, **{"train.max_steps": 1}), str(wd))["step"] == 1


def test_non_finite_loss_right_after_a_restore_calls_the_checkpoint_suspect(data_dir, tmp_path):
  wd = tmp_path / "wd"
  train.run(tiny_config(data_dir, **{"train.max_steps": 6}), str(wd))
  blow_up = {"optim.lr": 1e30, "train.log_every_steps": 1, "train.ckpt_every_steps": 1000}
  with pytest.raises(
    FloatingPointError, match=r"resumed from the checkpoint at step 6 only \d+ steps.*suspect"
  ):
    train.run(tiny_config(data_dir, **blow_up), str(wd))


def test_an_edited_data_position_is_refused_and_nothing_moves(data_dir, tmp_path):
  """The data iterator's position is part of what a checkpoint promises: one edited to
  another value (a step ahead, or past the dataset) is refused in one line, not used."""
  wd = tmp_path / "wd"
  train.run(tiny_config(data_dir, **{"train.max_steps": 8}), str(wd))
  position = wd / "checkpoints" / "8" / "data" / "process_0-of-1.json"
  original = position.read_text()
  assert json.loads(original) == {"next_index": 8}  # positive control: the file's layout
  for edited in (9, 10**6):
    position.write_text(json.dumps({"next_index": edited}))
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
      train.run(tiny_config(data_dir, **{"train.max_steps": 10}), str(wd))
    want = "records data position 9 on process 0, but a run at step 8 has read 8 batches"
    if edited > 9:  # past the dataset's end: grain itself refuses it
      want = "records a data position this dataset does not have"
    assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert _steps(wd) == [6, 8] and not (wd / "checkpoints_unreadable").exists()
  position.write_text(original)
  # A smaller train.max_steps than the run has done is no reason to call its checkpoints
  # damaged (it once set both aside and trained from scratch): nothing to do, nothing moved.
  summary = train.run(tiny_config(data_dir, **{"train.max_steps": 5}), str(wd))
  assert summary["resumed_from"] == 8 and summary["step"] == 8 and _steps(wd) == [6, 8]
  summary = train.run(tiny_config(data_dir, **{"train.max_steps": 10}), str(wd))
  assert summary["resumed_from"] == 8 and summary["step"] == 10

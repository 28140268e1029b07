"""`--workdir=gs://...` for real, against a local GCS emulator (gcp-storage-emulator).

train -> SIGKILL -> resume (bitwise the losses of an unbroken local run) -> sample -> eval,
everything in the bucket: checkpoints (orbax through tensorstore), metrics.jsonl,
TensorBoard (google-cloud-storage), the tokenized digits (ArrayRecord, read back through
its own GCS client), the compilation cache, samples and eval.json. Nothing may appear on
the local disk under a folder called `gs:`.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from npp_jax.infra import storage

from .helpers import shared_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "npp-test"
# The MNIST config, made small: digits as 8x8 tokens, 3 epochs of 70 steps (stages end at
# 70, 140, 210), cut at step 160, 20 steps into the token stage.
OVERRIDES = [
  "--config.model.grid=8",
  "--config.model.dim=32",
  "--config.model.n_layer=1",
  "--config.model.n_head=2",
  "--config.model.scan_unroll=1",
  "--config.train.epochs=3",
  "--config.train.max_steps=160",
  "--config.train.ckpt_every_steps=20",
  "--config.train.log_every_steps=10",
  "--config.train.eval_every_steps=70",
  "--config.train.eval_batches=1",
  "--config.sample.num_images=48",
  "--config.sample.batch_size=16",
  "--config.sample.png_per_class=2",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """gcp-storage-emulator on a loopback port, its objects on disk in `home`, so that it can
  be stopped (storage lost) and started again with what it held."""

  def __init__(self, home, port: int):
    self.home, self.port = home, port
    url = f"http://127.0.0.1:{port}"
    self.env = {
      "STORAGE_EMULATOR_HOST": url,
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      # gcsfs otherwise first asks for the bucket's layout over gRPC, which the emulator
      # does not serve (a 60 s timeout per new client).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    self.proc = None

  def start(self) -> None:
    script = os.path.join(ROOT, "tests", "gcs_emulator.py")  # the emulator, downloads fixed
    self.proc = subprocess.Popen(
      [sys.executable, script, "start", "--host=127.0.0.1", f"--port={self.port}"]
      + [f"--default-bucket={BUCKET}", "-q"],
      cwd=self.home,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline and self.proc.poll() is None:
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return
      except OSError:
        time.sleep(0.2)
    raise RuntimeError(f"the GCS emulator did not start (exit status {self.proc.poll()})")

  def stop(self) -> None:
    self.proc.kill()
    self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """A GCS emulator on a free loopback port, and the environment that points every client
  at it: gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST), tensorstore (orbax),
  google-cloud-cpp (ArrayRecord reads)."""
  emu = Emulator(tmp_path_factory.mktemp("emulator"), _free_port())
  emu.start()
  saved = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  yield emu
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  emu.stop()


def _run(workdir, cwd, emulator, *args, env=None, own_cache=False):
  """The small MNIST job on `workdir`, with the test session's compilation cache or
  (`own_cache`) the default one, in the workdir."""
  cmd = [sys.executable, "-m", "npp_jax.main", "--config=configs/mnist.py"]
  cmd += [f"--workdir={workdir}", *OVERRIDES, *args]
  emulated = emulator.env if emulator is not None else {}
  full_env = {**os.environ, **emulated, "PYTHONPATH": ROOT, **(env or {})}
  if own_cache:
    full_env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return subprocess.Popen(
    cmd, env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(proc, timeout=600) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def _losses(workdir: str) -> list[tuple]:
  rows = [json.loads(x) for x in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def unbroken_local_run(tmp_path_factory) -> str:
  """The workdir of one unbroken run of the small MNIST config on the local disk, the
  reference both bucket runs are compared with (made once for the test session)."""

  def build(root):
    (root / "cwd").mkdir()
    os.symlink(os.path.join(ROOT, "configs"), root / "cwd" / "configs")
    _finish(_run(root / "local", root / "cwd", None))

  return str(shared_once(tmp_path_factory, "unbroken-mnist-run", build) / "local")


def _no_gs_folder(*roots) -> None:
  for root in roots:
    for folder, dirs, files in os.walk(root):
      assert "gs:" not in dirs + files, f"a local folder named gs: appeared in {folder}"


@pytest.mark.slow
def test_train_kill_resume_sample_eval_in_a_bucket(emulator, tmp_path, unbroken_local_run):
  cwd = tmp_path / "cwd"  # where the jobs run: a relative `gs:` folder would land here
  cwd.mkdir()
  config_dir = os.path.join(ROOT, "configs")
  os.symlink(config_dir, cwd / "configs")
  run = f"gs://{BUCKET}/run"
  local = unbroken_local_run  # the unbroken reference, on the local disk

  victim = _run(run, cwd, emulator, own_cache=True)
  deadline = time.time() + 600
  while time.time() < deadline and victim.poll() is None:
    steps = [int(d) for d in storage.listdir(f"{run}/checkpoints") if d.isdigit()]
    if steps and max(steps) >= 80:  # into stage 2
      break
    time.sleep(0.2)
  assert victim.poll() is None, "the run finished before it could be killed; make it longer"
  victim.send_signal(signal.SIGKILL)
  victim.wait()

  out = _finish(_run(run, cwd, emulator, own_cache=True))
  assert "resumed from step" in out, out[-3000:]
  assert "loaded (compilation cache)" in out, out[-3000:]  # the cache is in the bucket too
  want = [(s, x) for s, x in _losses(str(local))]
  assert _losses(run) == want, "bitwise the losses of the unbroken run, step for step"
  assert want[-1][0] == 160

  out = _finish(_run(run, cwd, emulator, "--config.mode=sample"))
  out = _finish(_run(run, cwd, emulator, "--config.mode=eval"))
  result = json.loads(storage.read_text(f"{run}/eval.json"))
  assert 0 <= result["class_accuracy"] <= 1 and result["samples"].startswith(f"{run}/samples/")
  npz = storage.load_npz(result["samples"])
  assert npz["arr_0"].shape == (48, 8, 8, 3) and npz["arr_0"].dtype == np.uint8

  top = set(storage.listdir(run))
  assert {"checkpoints", "metrics.jsonl", "tensorboard", "data", "compile_cache"} <= top
  assert {"samples", "samples.png", "eval.json", "classifier.npz"} <= top
  assert any(n.startswith("events.") for n in storage.listdir(f"{run}/tensorboard"))
  assert storage.listdir(f"{run}/compile_cache")
  # Each run's log is in the bucket: the killed one's up to its last upload.
  logs = sorted(storage.listdir(f"{run}/logs"))
  assert [n.split("-")[0] for n in logs] == ["eval", "sample", "train", "train"], logs
  resumed = storage.read_text(f"{run}/logs/{logs[-1]}")
  assert "resumed from step" in resumed and "finished at step 160" in resumed
  _no_gs_folder(cwd, tmp_path, ROOT)


@pytest.mark.slow
def test_lost_storage_ends_the_job_in_bounded_time_and_the_rerun_resumes(
  emulator, tmp_path, unbroken_local_run
):
  """A missing bucket is refused before anything compiles; storage that goes away mid-run
  ends the job within the deadline with one line (exit status 75), the state saved on the
  local disk; with storage back, the same command resumes and logs an unbroken run's
  losses."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  os.symlink(os.path.join(ROOT, "configs"), cwd / "configs")
  deadline = 10
  flags = [f"--config.storage_deadline_s={deadline}"]
  home = {"HOME": str(tmp_path / "home")}  # where the rescued state goes

  t0 = time.time()
  proc = _run("gs://no-such-bucket/run", cwd, emulator, *flags)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75 and time.time() - t0 < 60, out[-2000:]
  assert "error: storage: cannot write to gs://no-such-bucket/run: the bucket " in out
  assert "compiled the train step" not in out and "devices:" not in out  # nothing ran

  local = unbroken_local_run  # the unbroken reference
  run = f"gs://{BUCKET}/lost"
  victim = _run(run, cwd, emulator, *flags, env=home)
  limit = time.time() + 600
  while time.time() < limit and victim.poll() is None:
    steps = [int(d) for d in storage.listdir(f"{run}/checkpoints") if d.isdigit()]
    if steps and max(steps) >= 40:
      break
    time.sleep(0.2)
  emulator.stop()
  t0 = time.time()
  try:
    out, _ = victim.communicate(timeout=300)
  finally:
    emulator.start()
  took = time.time() - t0
  assert victim.returncode == 75, out[-3000:]
  # Bounded by the deadline: alone the job ended 10 s after storage went, once 40 s on a busy
  # machine (an operation in flight may wait out its own deadline before the failing one,
  # then come the local save and the exit). Without deadlines the clients retry for minutes.
  assert took < 2 * deadline + 40, took
  # One error line, the last; no library's retry traceback above it.
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0] == out.splitlines()[-1], out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  saved = re.search(
    r"failed after \d+ s: .*the state at step (\d+) is saved in (\S+): copy", errors[0]
  )
  assert saved, errors[0]
  assert os.path.isdir(os.path.join(saved[2], "state")), saved[2]  # an orbax step folder

  out = _finish(_run(run, cwd, emulator, *flags))
  assert "resumed from step" in out, out[-3000:]
  assert _losses(run) == _losses(str(local)), "bitwise the losses of the unbroken run"


@pytest.mark.slow
def test_convert_extract_and_sample_weights_in_a_bucket(emulator, tmp_path, golden_dir):
  """Converted weights written to and read from a bucket (orbax), the sampler's weights
  identity for a bucket folder, and extraction into a bucket (ArrayRecord written locally,
  uploaded, read back through its own GCS client) equal to extraction on a local disk."""
  from PIL import Image  # noqa: PLC0415

  from npp_jax import config_lib
  from npp_jax.data import pipeline  # noqa: PLC0415
  from npp_jax.infra import torch_io
  from npp_jax.jobs import extract, sample  # noqa: PLC0415
  from npp_jax.models import gpt_torch, params_io  # noqa: PLC0415
  from npp_jax.models.gpt import GPTConfig  # noqa: PLC0415

  from .manifest_weights import generate  # noqa: PLC0415

  cfg = GPTConfig.preset("tiny", dtype="float32")
  sd = torch_io.load_torch_checkpoint(str(golden_dir / "gpt_tiny_weights.npz"))
  params = gpt_torch.params_from_torch(sd, cfg)
  bucket_weights = f"gs://{BUCKET}/converted/gpt_tiny"
  params_io.save_params(bucket_weights, params, cfg)
  back = params_io.load_params(bucket_weights, cfg)
  for a, b in zip(jax_leaves(params), jax_leaves(back), strict=True):
    np.testing.assert_array_equal(a, b)
  c = config_lib.get_config("tiny")
  c.model.dtype = "float32"
  c.sample.checkpoint = bucket_weights
  _, identity = sample.load_sampling_params(c, str(tmp_path / "wd"), cfg)
  assert identity["path"] == bucket_weights and identity["size"] > 0 and identity["mtime"] > 0

  rng = np.random.default_rng(0)
  for k, name in enumerate(["cat", "dog"]):
    (tmp_path / "images" / name).mkdir(parents=True)
    for i in range(3):
      arr = (rng.random((70, 80, 3)) * 255).astype(np.uint8)
      arr[..., k] = 255
      Image.fromarray(arr).save(tmp_path / "images" / name / f"{i}.png")
  np.savez(tmp_path / "vq.npz", **generate(golden_dir / "vq_tiny_manifest.json"))
  c.model.update(vocab_size=64, num_classes=2, grid=4)
  c.tokenizer.update(name="vq", preset="VQ-16", ch=32, z_channels=64)
  c.tokenizer.checkpoint = str(tmp_path / "vq.npz")
  c.extract.update(data_dir=str(tmp_path / "images"), image_size=64, images_per_shard=4)
  c.extract.update(batch_size=16, num_workers=2, out_dir=str(tmp_path / "codes"))
  local = extract.run(c, str(tmp_path / "wd"))
  c.extract.out_dir = f"gs://{BUCKET}/codes"
  remote = extract.run(c, str(tmp_path / "wd"))
  assert remote["dataset"] == f"gs://{BUCKET}/codes" and remote["images"] == 6
  a = pipeline.TokenSource(local["dataset"], 64, 2, 4)
  b = pipeline.TokenSource(remote["dataset"], 64, 2, 4)
  assert len(a) == len(b) == 6
  for i in range(6):
    np.testing.assert_array_equal(b[i]["codes"], a[i]["codes"])
  _no_gs_folder(tmp_path, ROOT)


def jax_leaves(tree):
  import jax  # noqa: PLC0415

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_storage_lost_while_restoring_is_a_storage_error_and_moves_no_checkpoint(
  emulator, tmp_path
):
  """A restore that fails because the bucket stopped answering ends in StorageError within
  the deadline: the checkpoints are not called damaged, and none is set aside."""
  import jax  # noqa: PLC0415

  from npp_jax.infra import checkpoint  # noqa: PLC0415
  from npp_jax.jobs import train  # noqa: PLC0415

  from .helpers import tiny_config, write_random_dataset  # noqa: PLC0415

  write_random_dataset(tmp_path / "data", n=96)
  run = f"gs://{BUCKET}/restore"
  # The short deadline is for the restores below only: training and set-up keep the
  # default, so that a busy machine (the emulator shares the cores with other tests) cannot
  # end them before storage is taken away.
  overrides = {"train.max_steps": 8, "train.ckpt_every_steps": 4}
  c = tiny_config(tmp_path / "data", **overrides)
  train.run(c, run)
  saved = storage.listdir(f"{run}/checkpoints")
  assert "8" in saved
  trainer = train.Trainer(c, run)
  ckpt = checkpoint.Checkpointer(run)  # its step list read while storage answers
  abstract = checkpoint.abstract_with_sharding(trainer.abstract_state, trainer.state_sharding)
  config, dataset = checkpoint.config_to_dict(c), train._dataset_record(trainer)
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  emulator.stop()
  try:
    for restore in (
      lambda: ckpt.restore_latest(abstract, trainer.data_iter, config, dataset),
      lambda: checkpoint.restore_weights(
        f"{run}/checkpoints", False, lambda a: jax.tree.map(lambda _: replicated, a)
      ),
    ):
      storage.set_deadline(5.0)
      t0 = time.time()
      with pytest.raises(storage.StorageError, match=r"read a checkpoint gs://\S+ failed after"):
        restore()
      assert time.time() - t0 < 5.0 + 10, time.time() - t0
  finally:
    emulator.start()
    storage.set_deadline(300.0)
  assert storage.listdir(f"{run}/checkpoints") == saved
  assert not storage.exists(f"{run}/checkpoints_unreadable")

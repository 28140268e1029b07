"""Shared test helpers: tiny configs, config files and synthetic token datasets."""

import importlib.util
import os
import pathlib
import shutil

import numpy as np

from npp_jax import config_lib
from npp_jax.data.records import DatasetInfo, write_shards


def write_random_dataset(
  directory, n=96, grid=8, vocab=64, classes=10, n_aug=1, seed=0, records_per_shard=40
):
  """Random codes with a learnable structure (the label shifts the token distribution)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  records = []
  for y in labels:
    base = (rng.integers(0, vocab // 2, (n_aug, grid * grid)) + y) % vocab
    records.append((base.astype(np.int32), int(y)))
  info = DatasetInfo(
    num_records=0, grid=grid, vocab_size=vocab, num_classes=classes, n_aug=n_aug, tokenizer="random"
  )
  return write_shards(records, str(directory), info, records_per_shard=records_per_shard)


CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def load_config_file(name: str):
  """`configs/NAME.py`'s config, loaded as `--config=configs/NAME.py` loads it."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(data_dir, **overrides):
  """A 2-layer dim-32 GPT on an 8x8 grid: compiles and steps in well under a second."""
  c = config_lib.get_config("tiny")
  c.model.update(
    dim=32,
    n_layer=2,
    n_head=2,
    vocab_size=64,
    num_classes=10,
    grid=8,
    dtype="float32",
    multiple_of=32,
    preset=config_lib.CUSTOM,
  )
  c.data.path = str(data_dir)
  c.train.update(
    epochs=4,
    global_batch_size=16,
    patch_level=3,
    epoch_rate=0.5,
    log_every_steps=1,
    ckpt_every_steps=1000,
    keep_checkpoints=3,
  )
  c.optim.update(lr=1e-3, warmup_epochs=1.0)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def convert_tiny_vq(tmp_path, golden_dir):
  """The golden vq_tiny weights through `python -m npp_jax.convert vq`; returns the directory."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from .manifest_weights import generate  # noqa: PLC0415

  np.savez(tmp_path / "vq.npz", **generate(golden_dir / "vq_tiny_manifest.json"))
  out = tmp_path / "vq"
  cmd = [
    sys.executable,
    "-m",
    "npp_jax.convert",
    "vq",
    f"--checkpoint={tmp_path / 'vq.npz'}",
    f"--out={out}",
    f"--config={CONFIGS / 'tiny.py'}",  # vocab 64: a codebook of 64 codes
    "--config.tokenizer.ch=32",
    "--config.tokenizer.z_channels=64",
  ]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  return out


def read_metrics(workdir):
  """The rows of WORKDIR/metrics.jsonl."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def shared_once(tmp_path_factory, name: str, build):
  """A folder that `build(folder)` fills once per test session, whichever xdist worker
  asks first (the others wait for it): reference runs that several tests compare with."""
  from filelock import FileLock  # noqa: PLC0415

  # The session's base folder is per worker; its parent is shared by all of them.
  root = pathlib.Path(tmp_path_factory.getbasetemp())
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
  with FileLock(str(root / f"shared-{name}.lock")):
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
      folder.mkdir()
      build(folder)
      done.touch()
  return folder

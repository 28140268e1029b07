"""`--config.mode=sample`: a PNG grid per class and an ADM-format `.npz` of N samples.

Weights come from `config.sample.checkpoint`: empty -> the newest training checkpoint of
the workdir (EMA weights when the run kept them and `sample.use_ema`), or, when the
workdir has none, `config.train.init_from`; or an orbax params directory from
`python -m npp_jax.convert`, or a `.pt`/`.npz`/`.safetensors` file.

Batches are written as `WORKDIR/samples/parts/part-XXXXX.npz` as they finish, so a
crashed job resumes without redoing them; the final `samples_N.npz` holds `arr_0`
(N, H, W, 3) uint8 and `labels`, what OpenAI's ADM evaluator reads.
"""

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from npp_jax import config_lib, params_io, sampling, sharding, tokenizers, torch_io
from npp_jax.models import gpt_torch
from npp_jax.models.gpt import GPTConfig

log = logging.getLogger(__name__)


def load_sampling_params(c: ml_collections.ConfigDict, workdir: str, cfg: GPTConfig) -> Any:
  """Params to sample from, per `config.sample.checkpoint` (see module docstring)."""
  source = c.sample.checkpoint
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not source and c.train.init_from and not _has_steps(directory):
    source = c.train.init_from  # a converted release (or a .pt file) and no training yet
  if not source:
    with ocp.CheckpointManager(directory, item_names=("state",)) as mngr:
      step = mngr.latest_step()
      if step is None:
        raise FileNotFoundError(
          f"no training checkpoint in {directory}: train first, or set "
          "--config.sample.checkpoint to converted params (or a .pt file)."
        )
      state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = state["state"]
    use_ema = c.sample.use_ema and state.get("ema") is not None
    log.info(
      "sampling from step %d of %s (%s weights)", step, directory, "EMA" if use_ema else "raw"
    )
    return state["ema"] if use_ema else state["params"]
  if os.path.isdir(source):
    return params_io.load_params(source, cfg)
  return gpt_torch.params_from_torch(torch_io.load_torch_checkpoint(source), cfg)


def _has_steps(directory: str) -> bool:
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def _labels(c: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
  """The reference draws labels uniformly at random; ours are fixed by the seed."""
  rng = np.random.default_rng([c.seed, 7])
  return rng.integers(0, num_classes, c.sample.num_images).astype(np.int32)


def _grid_png(images: np.ndarray, rows: int, path: str, scale: int) -> None:
  from PIL import Image  # noqa: PLC0415

  n, h, w, _ = images.shape
  cols = n // rows
  canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = (
      images[i]
    )
  img = Image.fromarray(canvas)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)


def _write_atomic(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def run(c: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Writes the PNG grid and the `.npz` of `sample.num_images` images; returns their paths."""
  cfg = config_lib.gpt_config(c)
  s = c.sample
  decode = tokenizers.decoder(c)
  mesh = sharding.make_mesh(c.mesh.to_dict())
  dp = sharding.data_parallel_size(mesh)
  batch = s.batch_size
  if batch % dp:
    raise ValueError(f"sample.batch_size={batch} must be a multiple of the {dp} devices.")
  params = load_sampling_params(c, workdir, cfg)
  params = jax.device_put(params, sharding.replicated(mesh))
  out_dir = os.path.join(os.path.abspath(workdir), "samples")
  parts_dir = os.path.join(out_dir, "parts")
  os.makedirs(parts_dir, exist_ok=True)
  key = jax.random.key(c.sample.seed)
  settings = dict(
    cfg_scale=s.cfg_scale,
    cfg_interval=s.cfg_interval,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    mesh=mesh,
  )
  lead = jax.process_index() == 0

  # The picture: png_per_class samples of each of the first classes, one row per class.
  classes = list(s.png_classes) or list(range(min(10, cfg.num_classes)))
  grid_labels = np.repeat(np.asarray(classes, np.int32), s.png_per_class)
  pad = (-len(grid_labels)) % dp
  padded = np.concatenate([grid_labels, np.zeros(pad, np.int32)])
  toks = sampling.generate(params, cfg, padded, jax.random.fold_in(key, 1 << 20), **settings)
  toks = np.asarray(multihost_utils.process_allgather(toks, tiled=True))[: len(grid_labels)]
  png = os.path.join(workdir, "samples.png")
  if lead:
    _grid_png(decode(toks), len(classes), png, s.png_scale)
    log.info(
      "wrote %s (%d classes x %d samples, cfg scale %s)",
      png,
      len(classes),
      s.png_per_class,
      s.cfg_scale,
    )

  result = {"png": png}
  if s.num_images <= 0:
    return result
  labels = _labels(c, cfg.num_classes)
  n_batches = -(-len(labels) // batch)
  todo = [
    b for b in range(n_batches) if not os.path.exists(os.path.join(parts_dir, f"part-{b:05d}.npz"))
  ]
  if len(todo) < n_batches:
    log.info("resuming: %d of %d batches already done", n_batches - len(todo), n_batches)
  from tqdm import tqdm  # noqa: PLC0415

  t0 = time.perf_counter()
  bar = tqdm(todo, desc="sampling", unit="batch", disable=not lead)
  for b in bar:
    chunk = labels[b * batch : (b + 1) * batch]
    full = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
    toks = sampling.generate(params, cfg, full, jax.random.fold_in(key, b), **settings)
    toks = np.asarray(multihost_utils.process_allgather(toks, tiled=True))[: len(chunk)]
    if lead:
      _write_atomic(
        os.path.join(parts_dir, f"part-{b:05d}.npz"), tokens=toks, images=decode(toks), labels=chunk
      )
    done = (bar.n + 1) * batch
    bar.set_postfix(img_per_s=f"{done / (time.perf_counter() - t0):.1f}")
  multihost_utils.sync_global_devices("samples written")
  npz = os.path.join(out_dir, f"samples_{len(labels)}.npz")
  if lead:
    parts = [np.load(os.path.join(parts_dir, f"part-{b:05d}.npz")) for b in range(n_batches)]
    images = np.concatenate([p["images"] for p in parts])
    _write_atomic(
      npz,
      arr_0=images,
      labels=np.concatenate([p["labels"] for p in parts]),
      tokens=np.concatenate([p["tokens"] for p in parts]),
    )
    log.info("wrote %s: %d images %s", npz, len(images), images.shape[1:])
  result["npz"] = npz
  return result

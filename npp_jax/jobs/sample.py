"""`--config.mode=sample`: a PNG grid per class and an ADM-format `.npz` of N samples.

Weights come from `config.sample.checkpoint`: empty -> the newest intact training
checkpoint of the workdir (EMA weights when the run kept them and `sample.use_ema`), or,
when the workdir has none, `config.train.init_from`; or an orbax params directory from
`python -m npp_jax.convert`, or a `.pt`/`.npz`/`.safetensors` file.

Everything that determines the images (the weights and their step, the sampler and its
guidance, seed, batch size, number of images, precision, tokenizer) names the output
folder WORKDIR/samples/<settings>/ and is written to its `settings.json`: another setting
writes another folder, so samples of one setting are never reused or overwritten for
another. Batches land in `parts/` as they finish (a crashed job resumes without redoing
them); the final `samples_N.npz` holds `arr_0` (N, H, W, 3) uint8 and `labels`, what
OpenAI's ADM evaluator reads. WORKDIR/samples.png is the newest grid.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from npp_jax import checkpoint, config_lib, params_io, sampling, sharding, tokenizers, torch_io
from npp_jax.models import gpt_torch
from npp_jax.models.gpt import GPTConfig, abstract_params

log = logging.getLogger(__name__)


def load_sampling_params(
  c: ml_collections.ConfigDict, workdir: str, cfg: GPTConfig
) -> tuple[Any, dict]:
  """(params, identity) per `config.sample.checkpoint` (see the module docstring).

  The identity names the weights: the training step and the state's fingerprint, or the
  file's path, size and modification time.
  """
  source = c.sample.checkpoint
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not source and c.train.init_from and not _has_steps(directory):
    source = c.train.init_from  # a converted release (or a .pt file) and no training yet
  if not source:
    step, state, meta = checkpoint.restore_newest_intact(directory)
    use_ema = c.sample.use_ema and state.get("ema") is not None
    weights = "ema" if use_ema else "raw"
    log.info("sampling from step %d of %s (%s weights)", step, directory, weights)
    params = state["ema"] if use_ema else state["params"]
    _check_shapes(params, cfg, f"the checkpoint at step {step} in {directory}")
    identity = {"name": f"step{step}-{weights}", "fingerprint": meta.get("fingerprint")}
    return params, identity
  path = os.path.abspath(source)
  stamp = os.stat(os.path.join(path, "params") if os.path.isdir(path) else path)
  identity = {"name": os.path.basename(path.rstrip("/")).split(".")[0], "path": path}
  identity |= {"size": stamp.st_size, "mtime": int(stamp.st_mtime)}
  if os.path.isdir(source):
    return params_io.load_params(source, cfg), identity
  sd = torch_io.load_torch_checkpoint(source, trust=c.trust_checkpoint)
  return gpt_torch.params_from_torch(sd, cfg), identity


def _check_shapes(params: Any, cfg: GPTConfig, what: str) -> None:
  want = jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract_params(cfg)))
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if want != got:
    raise ValueError(
      f"{what} holds a model of another shape than config.model "
      f"({config_lib.preset_of(cfg) or 'custom'}, dim {cfg.dim}, {cfg.n_layer} layers, "
      f"vocab {cfg.vocab_size}): sample with the config it was trained with."
    )


def _has_steps(directory: str) -> bool:
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def run_settings(c: ml_collections.ConfigDict, cfg: GPTConfig, weights: dict) -> dict:
  """Everything that determines the sampled images."""
  s, t = c.sample, c.tokenizer
  return {
    "weights": weights,
    "model": cfg.to_dict(),
    "sampler": {
      "cfg_scale": s.cfg_scale,
      "cfg_interval": s.cfg_interval,
      "temperature": s.temperature,
      "top_k": s.top_k,
      "top_p": s.top_p,
    },
    "seed": s.seed,
    "batch_size": s.batch_size,
    "num_images": s.num_images,
    "tokenizer": {
      "name": t.name,
      "preset": t.preset,
      "checkpoint": os.path.abspath(t.checkpoint) if t.checkpoint else "",
      "levels": t.levels,
      "ch": t.ch,
      "z_channels": t.z_channels,
      "precision": t.precision,
    },
  }


def settings_folder(settings: dict) -> str:
  """`<weights>-cfg<s>-topk<k>-topp<p>-temp<t>-seed<n>-<digest of all settings>`."""
  sm = settings["sampler"]
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
  return (
    f"{settings['weights']['name']}-cfg{sm['cfg_scale']}-topk{sm['top_k']}-topp{sm['top_p']}"
    f"-temp{sm['temperature']}-seed{settings['seed']}-{digest}"
  )


def _claim(out_dir: str, settings: dict) -> None:
  """Creates `out_dir` for `settings`, or checks that it holds samples of the same ones."""
  path = os.path.join(out_dir, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored != json.loads(json.dumps(settings)):
      raise ValueError(
        f"{out_dir} holds samples of other settings (see its settings.json); move it away "
        "rather than mixing them."
      )
    return
  os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(settings, f, indent=1)
  os.replace(path + ".tmp", path)


def _labels(c: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
  """The reference draws labels uniformly at random; ours are fixed by `sample.seed`."""
  rng = np.random.default_rng([c.sample.seed, 7])
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


def check_request(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Every bad `config.sample` value is a one-line ValueError, before anything compiles."""
  s = c.sample
  for name in ("batch_size", "png_per_class", "png_scale"):
    if s[name] < 1:
      raise ValueError(f"config.sample.{name}={s[name]} must be >= 1.")
  if s.num_images < 0:
    raise ValueError(f"config.sample.num_images={s.num_images} must be >= 0 (0: the grid only).")
  if s.batch_size % num_devices:
    raise ValueError(
      f"config.sample.batch_size={s.batch_size} must be a multiple of the {num_devices} "
      "data-parallel devices."
    )


def run(c: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Writes the PNG grid and the `.npz` of `sample.num_images` images; returns their paths."""
  cfg = config_lib.sampling_gpt_config(c)
  s = c.sample
  mesh = sharding.make_mesh(c.mesh.to_dict())
  dp = sharding.data_parallel_size(mesh)
  check_request(c, dp)
  decode = tokenizers.decoder(c)
  batch = s.batch_size
  params, weights = load_sampling_params(c, workdir, cfg)
  params = jax.tree.map(lambda x: jnp.asarray(x, cfg.storage_dtype), params)
  params = jax.device_put(params, sharding.replicated(mesh))
  settings = run_settings(c, cfg, weights)
  out_dir = os.path.join(os.path.abspath(workdir), "samples", settings_folder(settings))
  parts_dir = os.path.join(out_dir, "parts")
  lead = jax.process_index() == 0
  if lead:
    _claim(out_dir, settings)
  multihost_utils.sync_global_devices("sample folder ready")
  key = jax.random.key(s.seed)
  sampler = dict(
    cfg_scale=s.cfg_scale,
    cfg_interval=s.cfg_interval,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    mesh=mesh,
  )

  # The picture: png_per_class samples of each of the first classes, one row per class.
  classes = list(s.png_classes) or list(range(min(10, cfg.num_classes)))
  grid_labels = np.repeat(np.asarray(classes, np.int32), s.png_per_class)
  pad = (-len(grid_labels)) % dp
  padded = np.concatenate([grid_labels, np.zeros(pad, np.int32)])
  toks = sampling.generate(params, cfg, padded, jax.random.fold_in(key, 1 << 20), **sampler)
  toks = np.asarray(multihost_utils.process_allgather(toks, tiled=True))[: len(grid_labels)]
  png = os.path.join(out_dir, "samples.png")
  if lead:
    _grid_png(decode(toks), len(classes), png, s.png_scale)
    shutil.copyfile(png, os.path.join(workdir, "samples.png"))
    log.info(
      "wrote %s (%d classes x %d samples, cfg scale %s)",
      png,
      len(classes),
      s.png_per_class,
      s.cfg_scale,
    )

  result = {"png": png, "dir": out_dir}
  if s.num_images == 0:
    return result
  labels = _labels(c, cfg.num_classes)
  npz = os.path.join(out_dir, f"samples_{len(labels)}.npz")
  result["npz"] = npz
  if os.path.exists(npz):
    log.info("%s already holds these samples (settings.json): nothing to do", npz)
    return result
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
    toks = sampling.generate(params, cfg, full, jax.random.fold_in(key, b), **sampler)
    toks = np.asarray(multihost_utils.process_allgather(toks, tiled=True))[: len(chunk)]
    if lead:
      _write_atomic(
        os.path.join(parts_dir, f"part-{b:05d}.npz"), tokens=toks, images=decode(toks), labels=chunk
      )
    done = (bar.n + 1) * batch
    bar.set_postfix(img_per_s=f"{done / (time.perf_counter() - t0):.1f}")
  multihost_utils.sync_global_devices("samples written")
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
  return result

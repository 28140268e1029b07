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

On several hosts each host decodes (VQ) the rows its devices sampled and writes them to
its own part file (`part-BBBBB-PPPof{P}.npz`); process 0 assembles the `.npz` once.
"""

import hashlib
import json
import logging
import re
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from npp_jax import config_lib, sampling, sharding, tokenizers
from npp_jax.data import records
from npp_jax.infra import checkpoint, storage, torch_io
from npp_jax.models import gpt_torch, params_io
from npp_jax.models.gpt import GPTConfig, abstract_params

log = logging.getLogger(__name__)


def load_sampling_params(
  c: ml_collections.ConfigDict,
  workdir: str,
  cfg: GPTConfig,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[Any, dict]:
  """(params, identity) per `config.sample.checkpoint` (see the module docstring), laid
  out over `mesh` by its rules; from a training checkpoint only the weights are read.

  The identity names the weights: the training step and the state's fingerprint, or the
  file's path, size and modification time.
  """
  source = c.sample.checkpoint
  mesh = mesh or sampling.sampling_mesh(c.mesh.to_dict(), cfg)
  directory = storage.join(storage.absolute(workdir), "checkpoints")
  if not source and c.train.init_from and not _has_steps(directory):
    source = c.train.init_from  # a converted release (or a .pt file) and no training yet
  if not source:

    def shardings(abstract):
      _check_shapes(abstract, cfg, f"the newest checkpoint in {directory}")
      return sampling.param_sharding(cfg, mesh)

    step, params, weights, meta = checkpoint.restore_weights(directory, c.sample.use_ema, shardings)
    log.info("sampling from step %d of %s (%s weights)", step, directory, weights)
    identity = {"name": f"step{step}-{weights}", "fingerprint": meta.get("fingerprint")}
    return params, identity
  path = storage.absolute(source)
  is_dir = storage.isdir(path)
  stamped = storage.join(path, "params") if is_dir else path
  if is_dir and storage.is_remote(path):
    # A bucket "folder" has no size or time of its own: stamp orbax's commit record.
    stamped = storage.join(stamped, "_CHECKPOINT_METADATA")
  identity = {"name": storage.basename(path).split(".")[0], "path": path}
  identity |= {"size": storage.size(stamped), "mtime": int(storage.mtime(stamped))}
  if is_dir:
    return params_io.load_params(source, cfg), identity
  sd = torch_io.load_torch_checkpoint(source, trust=c.trust_checkpoint)
  return gpt_torch.params_from_torch(sd, cfg), identity


def _check_shapes(params: Any, cfg: GPTConfig, what: str) -> None:
  want = jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract_params(cfg)))
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if want != got:
    raise checkpoint.CheckpointMismatchError(
      f"{what} holds a model of another shape than config.model "
      f"({config_lib.preset_of(cfg) or 'custom'}, dim {cfg.dim}, {cfg.n_layer} layers, "
      f"vocab {cfg.vocab_size}): sample with the config it was trained with."
    )


def _has_steps(directory: str) -> bool:
  return any(d.isdigit() for d in storage.listdir(directory))


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
      "checkpoint": storage.absolute(t.checkpoint) if t.checkpoint else "",
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
  path = storage.join(out_dir, "settings.json")
  if storage.exists(path):
    stored = json.loads(storage.read_text(path))
    if stored != json.loads(json.dumps(settings)):
      raise ValueError(
        f"{out_dir} holds samples of other settings (see its settings.json); move it away "
        "rather than mixing them."
      )
    return
  storage.makedirs(storage.join(out_dir, "parts"))
  storage.write_text(path, json.dumps(settings, indent=1))


def _labels(c: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
  """The reference draws labels uniformly at random; ours are fixed by `sample.seed`."""
  rng = np.random.default_rng([c.sample.seed, 7])
  return rng.integers(0, num_classes, c.sample.num_images).astype(np.int32)


def _grid_png(images: np.ndarray, names: list[str], scale: int) -> bytes:
  """One row per class of `images` (rows of equal length), its name written to the left."""
  import io  # noqa: PLC0415

  from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

  rows = len(names)
  n, h, w, _ = images.shape
  cols = n // rows
  canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = (
      images[i]
    )
  grid = Image.fromarray(canvas)
  if scale > 1:
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
  row_h = (h + 2) * scale
  font = ImageFont.load_default(size=max(8, min(14, row_h - 2)))
  labels = [name if len(name) <= 24 else name[:23] + "…" for name in names]
  margin = 6 + max(int(font.getlength(t)) for t in labels)
  img = Image.new("RGB", (grid.width + margin, grid.height), "white")
  img.paste(grid, (margin, 0))
  draw = ImageDraw.Draw(img)
  for r, text in enumerate(labels):
    draw.text((3, 2 * scale + r * row_h + row_h // 2), text, fill="black", font=font, anchor="lm")
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def class_names(c: ml_collections.ConfigDict, num_classes: int) -> list[str]:
  """Label k's name as the dataset recorded it (`dataset.json`), else the label itself."""
  names: tuple[str, ...] = ()
  first = next((p.strip() for p in c.data.path.split(",") if p.strip()), "")
  if c.data.name != "mnist" and first:
    try:
      names = records.DatasetInfo.load(first).class_names
    except (OSError, ValueError) as e:
      log.info("no class names (%s): the grid's rows are labelled by number", e)
  if len(names) != num_classes:
    return [str(k) for k in range(num_classes)]
  return [f"{k} {name}" for k, name in enumerate(names)]


# The grid's random stream, apart from every batch's (batch b draws from stream b).
GRID_STREAM = 1 << 20


def run(c: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Writes the PNG grid and the `.npz` of `sample.num_images` images; returns their paths."""
  storage.set_deadline(c.storage_deadline_s)
  gpt = config_lib.sampling_gpt_config(c)
  mesh = sampling.sampling_mesh(c.mesh.to_dict(), gpt)
  config_lib.check_sampling(c, sharding.data_parallel_size(mesh))
  decode = tokenizers.decoder(c)  # a missing tokenizer is refused before any weights load
  params, weights = load_sampling_params(c, workdir, gpt, mesh)
  # Laid out by the mesh's rules (fsdp, tensor): a model too big for one chip is split.
  params = jax.tree.map(lambda x: x.astype(gpt.storage_dtype), params)
  params = jax.device_put(params, sampling.param_sharding(gpt, mesh))
  settings = run_settings(c, gpt, weights)
  out_dir = storage.join(storage.absolute(workdir), "samples", settings_folder(settings))
  if jax.process_index() == 0:
    _claim(out_dir, settings)
  multihost_utils.sync_global_devices("sample folder ready")
  draw = _Draw(c, gpt, mesh, params, decode)
  result = {"png": _write_grid(c, workdir, out_dir, draw), "dir": out_dir}
  if c.sample.num_images:
    result["npz"] = _write_samples(c, out_dir, draw)
  return result


class _Draw:
  """Samples batches of labels with the run's settings; each host gets the rows its own
  devices drew (their indices in the batch and their tokens)."""

  def __init__(self, c: ml_collections.ConfigDict, gpt: GPTConfig, mesh, params, decode):
    s = c.sample
    self.gpt, self.params, self.decode = gpt, params, decode
    self.dp = sharding.data_parallel_size(mesh)
    self.key = jax.random.key(s.seed)
    self.options = dict(
      cfg_scale=s.cfg_scale,
      cfg_interval=s.cfg_interval,
      temperature=s.temperature,
      top_k=s.top_k,
      top_p=s.top_p,
      mesh=mesh,
    )

  def __call__(self, labels: np.ndarray, stream: int) -> tuple[np.ndarray, np.ndarray]:
    key = jax.random.fold_in(self.key, stream)
    return sharding.local_rows(
      sampling.generate(self.params, self.gpt, labels, key, **self.options)
    )


def _write_grid(c: ml_collections.ConfigDict, workdir: str, out_dir: str, draw: _Draw) -> str:
  """The picture: png_per_class samples of each of the first classes, one row per class,
  in one batch; returns its path (also copied to WORKDIR/samples.png)."""
  s, lead = c.sample, jax.process_index() == 0
  classes = list(s.png_classes) or list(range(min(10, draw.gpt.num_classes)))
  labels = np.repeat(np.asarray(classes, np.int32), s.png_per_class)
  padded = np.concatenate([labels, np.zeros((-len(labels)) % draw.dp, np.int32)])
  if lead:
    log.info("sampling the grid: %d classes x %d images (one batch)", len(classes), s.png_per_class)
  t0 = time.perf_counter()
  rows, local = draw(padded, GRID_STREAM)
  images = _gather_rows(rows, draw.decode(local), len(padded))[: len(labels)]
  png = storage.join(out_dir, "samples.png")
  if lead:
    names = class_names(c, draw.gpt.num_classes)
    data = _grid_png(images, [names[k] for k in classes], s.png_scale)
    storage.write_bytes(png, data)
    storage.write_bytes(storage.join(storage.absolute(workdir), "samples.png"), data)
    log.info(
      "wrote %s in %.1f s (compile included; %d classes x %d samples, cfg scale %s)",
      *(png, time.perf_counter() - t0, len(classes), s.png_per_class, s.cfg_scale),
    )
  return png


def _write_samples(c: ml_collections.ConfigDict, out_dir: str, draw: _Draw) -> str:
  """`sample.num_images` samples in batches, each host writing the part its devices drew
  (a rerun does the batches still missing), assembled by host 0; returns the `.npz`."""
  labels, batch, lead = (
    _labels(c, draw.gpt.num_classes),
    c.sample.batch_size,
    jax.process_index() == 0,
  )
  npz = storage.join(out_dir, f"samples_{len(labels)}.npz")
  if storage.exists(npz):
    log.info("%s already holds these samples (settings.json): nothing to do", npz)
    return npz
  parts_dir = storage.join(out_dir, "parts")
  n_batches = -(-len(labels) // batch)
  todo = _batches_to_do(parts_dir, n_batches)
  if len(todo) < n_batches and lead:
    log.info("resuming: %d of %d batches already done", n_batches - len(todo), n_batches)
  from tqdm import tqdm  # noqa: PLC0415

  t0 = time.perf_counter()
  bar = tqdm(todo, desc="sampling", unit="batch", disable=not lead)
  for b in bar:
    chunk = labels[b * batch : (b + 1) * batch]
    rows, local = draw(np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)]), b)
    keep = rows < len(chunk)  # each host decodes and writes only the rows it drew
    rows, local = rows[keep], local[keep]
    storage.save_npz(
      storage.join(parts_dir, _part_name(b, jax.process_index(), jax.process_count())),
      rows=rows,
      tokens=local,
      images=draw.decode(local) if len(local) else np.zeros((0, 1, 1, 3), np.uint8),
      labels=chunk[rows],
    )
    bar.set_postfix(img_per_s=f"{(bar.n + 1) * batch / (time.perf_counter() - t0):.1f}")
  multihost_utils.sync_global_devices("samples written")
  if todo and lead:
    took = time.perf_counter() - t0
    n = len(todo) * batch
    log.info("sampled %d images in %.1f s (%.1f images/s)", n, took, n / took)
  if lead:
    _assemble(parts_dir, n_batches, batch, labels, npz)
  return npz


def _part_name(b: int, process: int, processes: int) -> str:
  return f"part-{b:05d}-{process:03d}of{processes:03d}.npz"


def _batches_to_do(parts_dir: str, n_batches: int) -> list[int]:
  """Batches without a complete set of part files (one per host of the run that wrote it),
  as process 0 sees them, so that every host runs the same batches."""
  mask = np.ones(n_batches, np.int32)
  if jax.process_index() == 0:
    for (b, hosts), names in _part_sets(parts_dir).items():
      if b < n_batches and len(names) == hosts:
        mask[b] = 0
  mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
  return [b for b in range(n_batches) if mask[b]]


def _part_sets(parts_dir: str) -> dict[tuple[int, int], list[str]]:
  """{(batch, host count of the run that wrote it): its part files}."""
  sets: dict[tuple[int, int], list[str]] = {}
  for name in storage.listdir(parts_dir):
    if m := re.fullmatch(r"part-(\d{5})-(\d{3})of(\d{3})\.npz", name):
      sets.setdefault((int(m[1]), int(m[3])), []).append(name)
  return {k: sorted(v) for k, v in sets.items()}


def _gather_rows(rows: np.ndarray, local: np.ndarray, n: int) -> np.ndarray:
  """Every host's (rows, values) -> the (n, ...) array on every host."""
  all_rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1)
  all_vals = np.asarray(multihost_utils.process_allgather(local))
  out = np.empty((n, *local.shape[1:]), local.dtype)
  out[all_rows] = all_vals.reshape(-1, *local.shape[1:])
  return out


def _assemble(parts_dir: str, n_batches: int, batch: int, labels: np.ndarray, npz: str) -> None:
  """The ADM `.npz` from the part files of every batch (any host count wrote them)."""
  sets = _part_sets(parts_dir)
  images, tokens = [None] * len(labels), [None] * len(labels)
  for b in range(n_batches):
    # One complete set per batch: parts an interrupted run with another host count left
    # behind are not mixed in.
    complete = (
      names for (k, hosts), names in sorted(sets.items()) if k == b and len(names) == hosts
    )
    for name in next(complete, []):
      part = storage.load_npz(storage.join(parts_dir, name))
      for r, img, tok in zip(part["rows"], part["images"], part["tokens"], strict=True):
        images[b * batch + int(r)], tokens[b * batch + int(r)] = img, tok
  missing = [i for i, x in enumerate(images) if x is None]
  if missing:
    raise RuntimeError(
      f"{len(missing)} samples are missing from {parts_dir} (first: {missing[0]})."
    )
  images = np.stack(images)
  storage.save_npz(npz, arr_0=images, labels=labels, tokens=np.stack(tokens))
  log.info("wrote %s: %d images %s", npz, len(images), images.shape[1:])

"""`--config.mode=extract`: tokenize an image dataset into the trainer's ArrayRecord shards.

Sources: an ImageFolder directory (`root/<class>/<image>`, classes sorted by name ->
labels 0..C-1; read with PIL) or tfds `imagenet2012` (the `data` extra). Every image
becomes one record holding the codes of all its variants (ten-crop, or center + mirror)
and its label. Shard k holds images [k*R, (k+1)*R) of the sorted list; each host
encodes its own shards on its local devices, each shard is written under a temporary
name and renamed when complete, so an interrupted job resumes with the shards it has.
Extraction streams: images are decoded by a pool of threads two device batches ahead,
encoded a device batch at a time and written as they are encoded, so host memory holds
at most three batches of decoded variants whatever the shard size. SIGTERM or Ctrl-C
stops after the batch being encoded, removes the partial shard and keeps the finished
ones. Unreadable images are skipped and listed in `extract_report.json`.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npp_jax import sharding, tokenizers
from npp_jax.data import image_sources, preprocess
from npp_jax.data.records import DatasetInfo, encode_record
from npp_jax.infra import preemption, storage

log = logging.getLogger(__name__)


class Encoder:
  """Encodes fixed-size batches of variants on this host's devices (batch axis split)."""

  def __init__(self, vq_cfg, vq_params, precision: str, batch: int):
    devices = jax.local_devices()
    self.batch = tokenizers.encode_batch(batch, len(devices))
    self.mesh = sharding.make_mesh({"data": -1}, devices)
    self.sharding = sharding.batch_sharding(self.mesh)
    self.tok = tokenizers.VQTokenizer(vq_cfg, vq_params, precision=precision, mesh=self.mesh)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(images), self.batch):
      chunk = images[i : i + self.batch]
      pad = self.batch - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      codes = self.tok.encode(jax.device_put(jnp.asarray(chunk), self.sharding))
      out.append(np.asarray(codes)[: self.batch - pad])
    return np.concatenate(out).reshape(len(images), -1)


def _variants(e: ml_collections.ConfigDict) -> int:
  """Variants per image: ten crops, or the center crop and its mirror."""
  return 10 if e.ten_crop else 2


def _load(item, image_size, ten_crop, crop_range):
  data, label = item
  img = preprocess.open_image(data)
  return preprocess.variants(img, image_size, ten_crop, crop_range), label


class _StopRequestedError(Exception):
  """A stop was requested between two batches of a shard."""


def _items(items, start: int, stop: int, chunk: int) -> Iterator:
  """items[start:stop] read `chunk` at a time (a tfds source reads the bytes it slices)."""
  for i in range(start, stop, chunk):
    yield from items[i : min(i + chunk, stop)]


def _decoded(items: Iterator, load: Callable, pool, window: int) -> Iterator[tuple]:
  """(item, (variants, label) or the ValueError of an unreadable image), in order, with at
  most `window` images decoding or decoded and not yet taken."""
  pending: collections.deque = collections.deque()

  def take():
    item, fut = pending.popleft()
    try:
      return item, fut.result()
    except ValueError as e:
      return item, e

  for item in items:
    pending.append((item, pool.submit(load, item)))
    if len(pending) >= window:
      yield take()
  while pending:
    yield take()


def write_shard(
  path: str,
  items: Iterator,
  encode: Callable[[np.ndarray], np.ndarray],
  load: Callable,
  pool,
  images_per_batch: int,
  on_done: Callable[[int], None],
  should_stop: Callable[[], bool] = lambda: False,
) -> dict:
  """Streams `items` into one ArrayRecord shard: decoded by `pool` (two batches ahead),
  encoded `images_per_batch` at a time, each batch's records written as it is encoded.
  Host memory holds at most three batches of decoded variants, whatever the shard's size.
  `on_done(n)` reports images finished (encoded or skipped); when `should_stop()` turns
  true after a batch, the partial file is removed and _StopRequestedError raised. Returns
  {"count", "skipped": [...]}."""
  skipped, count, batch = [], 0, []

  def flush(last: bool = False):
    nonlocal count, batch
    if batch:
      n_aug = batch[0][0].shape[0]
      codes = encode(np.concatenate([v for v, _ in batch])).reshape(len(batch), n_aug, -1)
      for (_, label), c in zip(batch, codes, strict=True):
        writer.write(encode_record(c, label))
      count += len(batch)
    on_done(len(batch))
    batch = []
    if not last and should_stop():
      raise _StopRequestedError

  # In a bucket the shard is written locally and uploaded at the end.
  with storage.local_copy_for_writing(path) as local, _record_file(local) as writer:
    for item, result in _decoded(items, load, pool, 2 * images_per_batch):
      if isinstance(result, ValueError):
        name = item[0] if isinstance(item[0], str) else f"record with label {item[1]}"
        skipped.append({"image": name, "error": str(result)})
        log.warning("skipping %s: %s", name, result)
        on_done(1)
        continue
      batch.append(result)
      if len(batch) == images_per_batch:
        flush()
    flush(last=True)
  meta = {"count": count, "skipped": skipped}
  storage.write_text(path + ".json", json.dumps(meta))  # the shard's completion mark
  return meta


@contextlib.contextmanager
def _record_file(local: str) -> Iterator[Any]:
  """An ArrayRecord writer on `local`.tmp, renamed to `local` when the block ends and
  removed when it raises: a shard file is whole or absent."""
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

  tmp = local + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  try:
    yield writer
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  writer.close()
  os.replace(tmp, local)


def _shards(n: int, per_shard: int) -> Iterator[tuple[int, int, int]]:
  for k, start in enumerate(range(0, n, per_shard)):
    yield k, start, min(start + per_shard, n)


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Extracts codes per `config.extract`; returns the dataset directory and the report."""
  storage.set_deadline(c.storage_deadline_s)
  e = c.extract
  out_dir = storage.absolute(e.out_dir or storage.join(workdir, "codes"))
  storage.makedirs(out_dir)
  vq_cfg, vq_params = tokenizers.load_vq(c)
  grid = _token_grid(c, vq_cfg)
  items, classes = _image_source(c)
  _check_settings(out_dir, _settings(c, vq_cfg, len(items), classes))
  encode = Encoder(vq_cfg, vq_params, c.tokenizer.precision, e.batch_size)
  shards = list(_shards(len(items), e.images_per_shard))
  host, hosts = jax.process_index(), jax.process_count()
  _encode_shards(c, out_dir, items, encode, [s for s in shards if s[0] % hosts == host])
  if hosts > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices("extract shards written")
  report = _finish(out_dir, shards, classes, vq_cfg, e, grid) if host == 0 else {}
  return {"dataset": out_dir, **report}


def _token_grid(c: ml_collections.ConfigDict, vq_cfg) -> int:
  """The token grid's side at extract.image_size (refused unless the tokenizer divides it;
  a warning when the model trains on another)."""
  e = c.extract
  if e.image_size % vq_cfg.downsample:
    raise ValueError(
      f"extract.image_size={e.image_size} is not a multiple of the tokenizer's "
      f"downsampling factor {vq_cfg.downsample}."
    )
  grid = e.image_size // vq_cfg.downsample
  if grid != c.model.grid:
    log.warning(
      "extracting at %d px gives a %dx%d token grid but config.model.grid is %d (%d px): train "
      "at the size you extract at (--config.model.grid=%d); the reference README extracts at "
      "384 but trains at 256.",
      *(e.image_size, grid, grid, c.model.grid, c.model.grid * vq_cfg.downsample, grid),
    )
  return grid


def _image_source(c: ml_collections.ConfigDict) -> tuple[Any, list[str]]:
  """(items with random access, class names) of extract.source."""
  e = c.extract
  if e.source == "imagefolder":
    items, classes = image_sources.image_folder(e.data_dir)
  elif e.source == "tfds":
    items = image_sources.TfdsItems(e.tfds_name, e.split, e.data_dir)
    classes = items.classes
  else:
    raise ValueError(f"extract.source={e.source!r}; use 'imagefolder' or 'tfds'.")
  if len(classes) > c.model.num_classes:
    log.warning(
      "the dataset has %d classes but config.model.num_classes is %d.",
      *(len(classes), c.model.num_classes),
    )
  return items, classes


def _encode_shards(c: ml_collections.ConfigDict, out_dir: str, items, encode, mine) -> None:
  """Writes this host's shards not yet complete; a signal stops it between two batches
  (StoppedBySignalError, the finished shards kept)."""
  e = c.extract
  todo = [s for s in mine if not storage.exists(_shard_path(out_dir, s[0]) + ".json")]
  if len(todo) < len(mine):
    log.info("resuming: %d of %d shards already written", len(mine) - len(todo), len(mine))
  from tqdm import tqdm  # noqa: PLC0415

  per_batch = max(1, encode.batch // _variants(e))  # images whose variants fill a device batch
  load = functools.partial(
    _load, image_size=e.image_size, ten_crop=e.ten_crop, crop_range=e.crop_range
  )
  lead = jax.process_index() == 0
  bar = tqdm(total=sum(b - a for _, a, b in todo), desc="encoding", unit="img", disable=not lead)
  guard = preemption.PreemptionGuard(local=True, action="finishing the batch being encoded")
  done = len(mine) - len(todo)
  stopping = lambda: guard.received is not None
  # Four deep on purpose: a stop inside any shard becomes one error naming what is kept.
  with guard, concurrent.futures.ThreadPoolExecutor(max(1, e.num_workers)) as pool:
    for k, a, b in todo:
      try:
        if stopping():  # between two shards
          raise _StopRequestedError
        batches = _items(items, a, b, per_batch)
        write_shard(
          _shard_path(out_dir, k), batches, encode, load, pool, per_batch, bar.update, stopping
        )
      except _StopRequestedError:
        bar.close()
        raise preemption.StoppedBySignalError(
          f"{guard.received}: {done} of this host's {len(mine)} shards are complete in "
          f"{out_dir} and kept, no partial {storage.basename(_shard_path(out_dir, k))} is "
          "left; run the same command again to resume",
          guard.received,
        ) from None
      done += 1
  bar.close()


SETTINGS_FILE = "extract_settings.json"


def _settings(c: ml_collections.ConfigDict, vq_cfg, num_items: int, classes) -> dict:
  """What decides the codes and their shards, as stored in SETTINGS_FILE."""
  e, t = c.extract, c.tokenizer
  tfds = e.source == "tfds"
  settings = {
    "tokenizer": {
      **dataclasses.asdict(vq_cfg),
      "checkpoint": storage.absolute(t.checkpoint),
      "precision": t.precision,
    },
    "source": e.source,
    "data_dir": e.data_dir if tfds else storage.absolute(e.data_dir),
    "tfds_name": e.tfds_name if tfds else "",
    "split": e.split if tfds else "",
    "images": num_items,
    "class_names": list(classes),
    "image_size": e.image_size,
    "ten_crop": e.ten_crop,
    "crop_range": e.crop_range,
    "images_per_shard": e.images_per_shard,
  }
  return json.loads(json.dumps(settings))  # tuples as lists, as read back


def _check_settings(out_dir: str, settings: dict) -> None:
  """Records the settings of a fresh extraction; refuses to add to one made otherwise."""
  path = storage.join(out_dir, SETTINGS_FILE)
  if storage.exists(path):
    saved = json.loads(storage.read_text(path))
    diff = [
      f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}"
      for k in sorted(set(saved) | set(settings))
      if saved.get(k) != settings.get(k)
    ]
    if diff:
      raise ValueError(
        f"{out_dir} holds codes extracted with other settings ({'; '.join(diff)}); nothing "
        "was changed: extract into a fresh folder (--config.extract.out_dir=NEW_DIR) or "
        "delete that one."
      )
    return
  if any(n.endswith(".array_record") for n in storage.listdir(out_dir)):
    raise ValueError(
      f"{out_dir} holds shards but no {SETTINGS_FILE} (an earlier npp_jax wrote it), so its "
      "settings cannot be checked; nothing was changed: extract into a fresh folder "
      "(--config.extract.out_dir=NEW_DIR) or delete that one."
    )
  storage.write_text(path, json.dumps(settings, indent=1))


def _shard_path(out_dir: str, k: int) -> str:
  return storage.join(out_dir, f"train-{k:05d}.array_record")


def _finish(out_dir, shards, classes, vq_cfg, e, grid) -> dict:
  names, sizes, skipped = [], [], []
  for k, _, _ in shards:
    meta = json.loads(storage.read_text(_shard_path(out_dir, k) + ".json"))
    names.append(storage.basename(_shard_path(out_dir, k)))
    sizes.append(meta["count"])
    skipped += meta["skipped"]
  info = DatasetInfo(
    num_records=sum(sizes),
    grid=grid,
    vocab_size=vq_cfg.codebook_size,
    num_classes=len(classes),
    n_aug=_variants(e),
    image_size=e.image_size,
    tokenizer="vq",
    shards=tuple(names),
    shard_sizes=tuple(sizes),
    class_names=tuple(classes),
  )
  report = {
    "images": sum(sizes),
    "skipped": len(skipped),
    "skipped_images": skipped,
    "classes": len(classes),
  }
  storage.write_text(storage.join(out_dir, "extract_report.json"), json.dumps(report, indent=1))
  info.save(out_dir)  # last (and atomically): a dataset.json means the dataset is whole
  log.info(
    "extracted %d images into %d shards in %s; skipped %d unreadable images (listed in "
    "extract_report.json)",
    report["images"],
    len(names),
    out_dir,
    len(skipped),
  )
  return report

"""The training input pipeline: ArrayRecord token shards -> per-host batches, with grain.

The stream is defined by index, so it is reproducible and checkpointable: global
example position p = step * global_batch + row belongs to epoch p // per_epoch and
reads record perm_epoch[p % per_epoch], where perm_epoch is a seeded permutation and
per_epoch = steps_per_epoch * global_batch (the reference's `drop_last` epochs). Each
host reads only its own contiguous rows of every global batch.
"""

from collections.abc import Sized
from typing import Any

import grain
import numpy as np

from npp_jax.data.records import DatasetInfo, decode_record
from npp_jax.infra import storage

_REBUILD = (
  "the dataset is damaged; rebuild it with `--config.mode=extract` (the embedded digits "
  "rebuild themselves)."
)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class TokenSource(grain.sources.RandomAccessDataSource):
  """Validated random access to token records: {"codes": (n_aug, seq) int32, "label": int}."""

  def __init__(self, directory: str, vocab_size: int, num_classes: int, grid: int):
    self.directory = directory
    self.info = DatasetInfo.load(directory)
    paths = [storage.join(directory, s) for s in self.info.shards]
    missing = [p for p in paths if not storage.exists(p)]
    if missing:
      raise FileNotFoundError(f"dataset {directory} lists shards that are missing: {missing[:3]}.")
    if not paths:
      raise ValueError(f"dataset {directory} has no shards.")
    self._paths = paths
    self._offsets = np.cumsum([0, *self.info.shard_sizes])
    self._src = None
    self.vocab_size, self.num_classes, self.seq = vocab_size, num_classes, grid * grid

  def _source(self):
    if self._src is None:  # opened lazily so the object pickles into grain workers
      try:
        src = grain.sources.ArrayRecordDataSource(self._paths)
        length = len(src)
      except Exception:  # noqa: BLE001 (array_record raises several kinds)
        self._check_shards()
        raise
      if length != len(self):
        self._check_shards()
      self._src = src
    return self._src

  def _check_shards(self) -> None:
    """Names the first shard that cannot be opened or holds other than its listed count."""
    for path, want in zip(self._paths, self.info.shard_sizes, strict=True):
      try:
        got = len(grain.sources.ArrayRecordDataSource([path]))
      except Exception as e:  # noqa: BLE001
        raise ValueError(
          f"shard {path} cannot be read ({type(e).__name__}: {_first_line(e)}): {_REBUILD}"
        ) from None
      if got != want:
        raise ValueError(
          f"shard {path} holds {got} records but dataset.json lists {want}: {_REBUILD}"
        )

  def __getstate__(self):
    return {**self.__dict__, "_src": None}

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def where(self, index: int) -> str:
    shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
    return f"shard {self.info.shards[shard]} record {index - self._offsets[shard]}"

  def record(self, index: int) -> tuple[np.ndarray, int]:
    """(every variant's codes (n_aug, seq), a read-only view; label) of record `index`,
    its shape and label checked."""
    index = int(index)
    try:
      codes, label = decode_record(self._source()[index])
    except Exception as e:  # noqa: BLE001 (damaged shards raise several kinds)
      raise ValueError(
        f"{self.directory}: {self.where(index)} is corrupt ({_first_line(e)}): {_REBUILD}"
      ) from None
    if codes.shape[1] != self.seq:
      raise ValueError(
        f"{self.directory}: {self.where(index)} has {codes.shape[1]} tokens per image but the "
        f"model's grid needs {self.seq}: extract the codes at the resolution you train at."
      )
    if not 0 <= label < self.num_classes:
      raise ValueError(
        f"{self.directory}: {self.where(index)} has label {label}, outside [0, "
        f"{self.num_classes}): set model.num_classes to the dataset's class count."
      )
    return codes, label

  def checked(self, index: int, codes: np.ndarray) -> np.ndarray:
    """`codes` of record `index` as int32, refused if any id is outside the vocabulary:
    only what is fed to the model is checked (one variant, not all ten)."""
    if codes.min() < 0 or codes.max() >= self.vocab_size:
      bad = int(codes[(codes < 0) | (codes >= self.vocab_size)][0])
      raise ValueError(
        f"{self.directory}: {self.where(index)} holds token id {bad}, outside the model's "
        f"vocabulary [0, {self.vocab_size}): the codes come from another tokenizer."
      )
    return codes.astype(np.int32)

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Record `index` with every variant: {"codes": (n_aug, seq) int32, "label"}."""
    codes, label = self.record(index)
    return {"codes": self.checked(index, codes), "label": np.int32(label)}


class ExtractionMix:
  """Several extractions of the same images, record i of each being image i.

  The reference trains on two extractions (crop ranges 1.1 and 1.05) and picks one per
  example with probability 0.5; `PickVariant` draws the extraction with `weights` before
  anything is read, then one of its variants, and reads that one record.
  """

  def __init__(self, sources: list[TokenSource], weights: tuple[float, ...] = ()):
    weights = tuple(float(w) for w in weights) or (1.0,) * len(sources)
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
      raise ValueError(
        f"config.data.weights={weights} must give one non-negative weight per dataset "
        f"({len(sources)} in config.data.path), not all zero."
      )
    first = sources[0]
    for other in sources[1:]:
      for key in ("num_records", "grid", "vocab_size", "num_classes"):
        if getattr(other.info, key) != getattr(first.info, key):
          raise ValueError(
            f"datasets {first.directory} and {other.directory} differ in {key} "
            f"({getattr(first.info, key)} vs {getattr(other.info, key)}): mixed extractions "
            "must hold the same images in the same order."
          )
      for i in sorted({0, len(first) // 2, len(first) - 1}):
        if other.record(i)[1] != first.record(i)[1]:
          raise ValueError(
            f"record {i} has label {first.record(i)[1]} in {first.directory} but "
            f"{other.record(i)[1]} in {other.directory}: mixed extractions must hold the "
            "same images in the same order."
          )
    self.sources = sources
    self.probs = np.asarray(weights) / sum(weights)

  def __len__(self) -> int:
    return len(self.sources[0])


class EpochStream(grain.sources.RandomAccessDataSource):
  """This host's k-th example -> the record of the global stream (see module docstring)."""

  def __init__(
    self,
    source: Sized,
    global_batch: int,
    steps_per_epoch: int,
    num_steps: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} hosts.")
    self.source = source
    self.global_batch, self.local_batch = global_batch, global_batch // process_count
    self.per_epoch = steps_per_epoch * global_batch
    if self.per_epoch > len(source):
      raise ValueError(f"an epoch of {self.per_epoch} examples exceeds the {len(source)} records.")
    self.num_steps, self.seed, self.host = num_steps, seed, process_index
    self._perm = (None, None)

  def __len__(self) -> int:
    return self.num_steps * self.local_batch

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = (epoch, rng.permutation(len(self.source)))
    return self._perm[1]

  def record_index(self, k: int) -> int:
    step, row = divmod(int(k), self.local_batch)
    position = step * self.global_batch + self.host * self.local_batch + row
    epoch, j = divmod(position, self.per_epoch)
    return int(self._permutation(epoch)[j])

  def __getitem__(self, k: int) -> int:
    """The record index of this host's k-th example (read later, by `PickVariant`)."""
    return self.record_index(k)


class PickVariant(grain.transforms.RandomMap):
  """Reads one example: draws its extraction (with several), then one augmentation
  variant (the reference's ten-crop/flip codes), and reads and checks only that."""

  def __init__(self, mix: ExtractionMix):
    self.mix = mix

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    sources = self.mix.sources
    # One extraction draws nothing, so such runs keep their exact stream.
    k = rng.choice(len(sources), p=self.mix.probs) if len(sources) > 1 else 0
    codes, label = sources[k].record(index)
    v = rng.integers(codes.shape[0]) if codes.shape[0] > 1 else 0
    return {"tokens": sources[k].checked(index, codes[v]), "label": np.int32(label)}


def train_dataset(
  directories: list[str],
  *,
  vocab_size: int,
  num_classes: int,
  grid: int,
  global_batch: int,
  steps_per_epoch: int,
  num_steps: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  weights: tuple[float, ...] = (),
) -> grain.MapDataset:
  """MapDataset whose item t is this host's batch of step t: {"tokens" (b, seq), "label" (b,)}.

  Several `directories` are extractions of the same images mixed per example with `weights`.
  """
  mix = ExtractionMix([TokenSource(d, vocab_size, num_classes, grid) for d in directories], weights)
  stream = EpochStream(
    mix, global_batch, steps_per_epoch, num_steps, seed, process_index, process_count
  )
  return (
    grain.MapDataset.source(stream)
    .random_map(PickVariant(mix), seed=seed)
    .batch(stream.local_batch, drop_remainder=True)
  )


def heldout_batches(
  directory: str,
  *,
  vocab_size: int,
  num_classes: int,
  grid: int,
  global_batch: int,
  num_batches: int,
  process_index: int = 0,
  process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """This host's rows of the first `num_batches` global batches of a held-out dataset.

  Deterministic: records in order, the first variant of each (no shuffling, no random
  crops), so every evaluation of every run sees the same examples.
  """
  source = TokenSource(directory, vocab_size, num_classes, grid)
  n = min(num_batches, len(source) // global_batch)
  if n < 1:
    raise ValueError(
      f"the held-out dataset {directory} has {len(source)} records, fewer than one batch of "
      f"{global_batch}."
    )
  local = global_batch // process_count
  out = []
  for b in range(n):
    start = b * global_batch + process_index * local
    recs = [source[i] for i in range(start, start + local)]
    out.append(
      {
        "tokens": np.stack([r["codes"][0] for r in recs]).astype(np.int32),
        "label": np.asarray([r["label"] for r in recs], np.int32),
      }
    )
  return out


def to_iterator(ds: grain.MapDataset, worker_count: int = 0, prefetch: int = 4):
  """A checkpointable iterator; with workers, batches are prepared in other processes."""
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch)
  )
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def steps_per_epoch(num_records: int, global_batch: int) -> int:
  """The reference's `int(len(dataset) / global_batch)` (drop_last)."""
  n = num_records // global_batch
  if n < 1:
    raise ValueError(
      f"global batch {global_batch} is larger than the dataset ({num_records} images): lower "
      "train.global_batch_size."
    )
  return n

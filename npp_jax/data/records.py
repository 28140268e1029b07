"""Tokenized-dataset storage: ArrayRecord shards of (codes, label) plus a `dataset.json`.

One record per image: a 16-byte header (magic, label, number of augmentation
variants, tokens per variant) followed by the int32 codes of every variant, so all
variants of an image travel together and the trainer draws one at random.
"""

import contextlib
import dataclasses
import json
import os
import struct
from collections.abc import Iterable

import numpy as np

from npp_jax.infra import storage

MAGIC = b"NPP1"
_HEADER = struct.Struct("<4siii")
INFO_FILE = "dataset.json"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer must know about a tokenized dataset, stored as `dataset.json`."""

  num_records: int
  grid: int
  vocab_size: int
  num_classes: int
  n_aug: int = 1
  image_size: int = 0  # pixels per side the codes were extracted at (0: not an image tokenizer)
  tokenizer: str = ""
  shards: tuple[str, ...] = ()
  shard_sizes: tuple[int, ...] = ()
  class_names: tuple[str, ...] = ()  # label k is class_names[k] (extracted datasets)

  def save(self, directory: str) -> None:
    storage.write_text(
      storage.join(directory, INFO_FILE), json.dumps(dataclasses.asdict(self), indent=1)
    )

  @classmethod
  def load(cls, directory: str) -> "DatasetInfo":
    path = storage.join(directory, INFO_FILE)
    if not storage.exists(path):
      raise FileNotFoundError(
        f"{path} not found: {directory!r} is not a tokenized dataset (write one with "
        "`--config.mode=extract`, or use configs/mnist.py for the embedded digits)."
      )
    try:
      raw = json.loads(storage.read_text(path))
      raw["shards"] = tuple(raw.get("shards", ()))
      raw["shard_sizes"] = tuple(raw.get("shard_sizes", ()))
      raw["class_names"] = tuple(raw.get("class_names", ()))
      return cls(**raw)
    except (ValueError, TypeError, AttributeError) as e:
      raise ValueError(
        f"{path} is malformed ({type(e).__name__}: {e}); rebuild the dataset with "
        "`--config.mode=extract` (the embedded digits rebuild themselves when it is deleted)."
      ) from None


def encode_record(codes: np.ndarray, label: int) -> bytes:
  """(n_aug, seq) or (seq,) integer codes + label -> record bytes."""
  codes = np.asarray(codes)
  if codes.ndim == 1:
    codes = codes[None]
  if codes.ndim != 2:
    raise ValueError(f"codes must be (seq,) or (n_aug, seq), got shape {codes.shape}.")
  return (
    _HEADER.pack(MAGIC, int(label), codes.shape[0], codes.shape[1]) + codes.astype("<i4").tobytes()
  )


def decode_record(data: bytes) -> tuple[np.ndarray, int]:
  """Record bytes -> (codes (n_aug, seq) little-endian int32, a read-only view of `data`,
  label). Raises ValueError if malformed."""
  if len(data) < _HEADER.size:
    raise ValueError(f"record of {len(data)} bytes is shorter than its header.")
  magic, label, n_aug, seq = _HEADER.unpack_from(data)
  if magic != MAGIC or n_aug < 1 or seq < 1 or len(data) != _HEADER.size + 4 * n_aug * seq:
    raise ValueError("record is not an npp_jax token record (bad header or length).")
  return np.frombuffer(data, "<i4", offset=_HEADER.size).reshape(n_aug, seq), label


def write_shards(
  records: Iterable[tuple[np.ndarray, int]],
  directory: str,
  info: DatasetInfo,
  records_per_shard: int = 10_000,
  prefix: str = "train",
) -> DatasetInfo:
  """Writes records to `directory/prefix-XXXXX.array_record` and the dataset.json.

  Each shard is written to a temporary name and renamed when complete (in a bucket:
  written locally and uploaded when complete), so an interrupted run never leaves a
  half-written shard under its final name.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

  storage.makedirs(directory)
  shards, sizes = [], []
  writer, count, local, final = None, 0, "", ""
  staging = contextlib.ExitStack()

  def close():
    nonlocal writer
    if writer is not None:
      writer.close()
      os.replace(local + ".tmp", local)
      staging.close()  # uploads the shard when `directory` is in a bucket
      shards.append(storage.basename(final))
      sizes.append(count)
      writer = None

  total = 0
  for codes, label in records:
    if writer is None or count == records_per_shard:
      close()
      final = storage.join(directory, f"{prefix}-{len(shards):05d}.array_record")
      local = staging.enter_context(storage.local_copy_for_writing(final))
      writer, count = ArrayRecordWriter(local + ".tmp", "group_size:1"), 0
    writer.write(encode_record(codes, label))
    count += 1
    total += 1
  close()
  info = dataclasses.replace(
    info, num_records=total, shards=tuple(shards), shard_sizes=tuple(sizes)
  )
  info.save(directory)
  return info

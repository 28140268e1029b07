"""ADM-format sample batches: `.npz` files with `arr_0` uint8 (N, H, W, 3) images.

`NpzImages` reads the images a batch at a time (50,000 samples at 256 px are 9.8 GB), and
`load_npz(path, what, keys)` only the small arrays asked for (labels, statistics).
"""

import contextlib
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from npp_jax.infra import storage


def check_images(arr: Any, what: str) -> np.ndarray:
  """An ADM image batch: uint8 (N, H, W, 3). Anything else is a clear ValueError."""
  arr = np.asarray(arr)
  if arr.dtype != np.uint8:
    raise ValueError(
      f"{what}: images must be uint8 in [0, 255] (ADM format), got {arr.dtype}; "
      "convert with np.clip(x, 0, 255).astype(np.uint8)."
    )
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise ValueError(f"{what}: images must be (N, H, W, 3) NHWC RGB, got shape {arr.shape}.")
  if len(arr) < 2:
    raise ValueError(f"{what}: need at least 2 images, got {len(arr)}.")
  return arr


def check_labels(labels: Any, n: int, num_classes: int, what: str) -> np.ndarray:
  """The requested class of each of `n` images: integers in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"{what}: `labels` must be {n} integers (one per image), got {labels.dtype} {labels.shape}."
    )
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if len(bad):
    raise ValueError(
      f"{what}: labels must be classes 0..{num_classes - 1}, got {sorted(set(bad.tolist()))[:5]}."
    )
  return labels


def load_npz(path: str, what: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` (all, or those of `keys` it has; no pickles); `what` names
  the file in errors."""
  if not storage.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist.")
  try:
    if keys is None:
      return storage.load_npz(path)
    with storage.as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
      return {k: z[k] for k in keys if k in z.files}
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{what} {path} is not a readable .npz ({e}).") from e


def npz_keys(path: str, what: str) -> list[str]:
  """The array names of an `.npz` (read from its directory, no array loaded)."""
  if not storage.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist.")
  try:
    with storage.as_path(path).open("rb") as f, zipfile.ZipFile(f) as z:
      return [n.removesuffix(".npy") for n in z.namelist()]
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{what} {path} is not a readable .npz ({e}).") from e


class NpzImages:
  """The `key` images of an `.npz`, checked as `check_images` does from the array's header
  and read `batch` images at a time: memory holds one batch, whatever the file holds."""

  def __init__(self, path: str, what: str, key: str = "arr_0"):
    self.path, self.what, self.key = path, what, key
    with self._member() as f:
      shape, fortran, dtype = _npy_header(f)
    if fortran:
      raise ValueError(f"{what}: images stored in Fortran order; save them with np.savez.")
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    # check_images on an array of this dtype and shape but at most 2 images.
    check_images(np.empty((min(shape[0], 2), *shape[1:]) if shape else (), self.dtype), what)

  def __len__(self) -> int:
    return self.shape[0]

  @contextlib.contextmanager
  def _member(self):
    if not storage.exists(self.path):
      raise FileNotFoundError(f"{self.what} {self.path} does not exist.")
    try:
      f = storage.as_path(self.path).open("rb")
      z = zipfile.ZipFile(f)
      member = z.open(f"{self.key}.npy")
    except KeyError:
      raise ValueError(f"{self.what} {self.path} has no `{self.key}` images.") from None
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{self.what} {self.path} is not a readable .npz ({e}).") from e
    try:
      yield member
    finally:
      member.close()
      z.close()
      f.close()

  def batches(self, batch: int) -> Iterator[np.ndarray]:
    """uint8 (<=batch, H, W, 3) arrays in order."""
    per_image = int(np.prod(self.shape[1:]))
    with self._member() as f:
      _npy_header(f)
      for start in range(0, len(self), batch):
        n = min(batch, len(self) - start)
        data = f.read(n * per_image)
        if len(data) != n * per_image:
          raise ValueError(f"{self.what} {self.path} is truncated at image {start}.")
        yield np.frombuffer(data, np.uint8).reshape(n, *self.shape[1:])


def latest_samples(workdir: str) -> str:
  """The newest WORKDIR/samples/<settings>/samples_*.npz that `mode=sample` wrote."""
  found = [str(p) for p in storage.as_path(workdir).glob("samples/*/samples_*.npz")]
  found = sorted(found, key=storage.mtime)
  if not found:
    raise FileNotFoundError(
      f"no samples_*.npz in {workdir}/samples: run --config.mode=sample "
      "first or set --config.eval.samples."
    )
  return found[-1]


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran order, dtype) of a `.npy` stream, leaving it at the first byte of data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)

"""ADM-format sample batches: `.npz` files with `arr_0` uint8 (N, H, W, 3) images."""

from typing import Any

import numpy as np

from npp_jax import storage


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


def load_npz(path: str, what: str) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` (no pickles); `what` names the file in errors."""
  if not storage.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist.")
  try:
    return storage.load_npz(path)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{what} {path} is not a readable .npz ({e}).") from e


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

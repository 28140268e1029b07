"""LlamaGen's image preprocessing for code extraction (PIL only, no TensorFlow or torchvision).

center_crop_arr is ADM's (box-halve while >= 2x, bicubic resize of the short side, center
crop). Training variants: ten-crop (five crops of `image_size` from a center crop of
`int(image_size * crop_range)`, then the same five of the mirrored image, in
torchvision's TenCrop order) or, without ten-crop, the center crop and its mirror.
"""

import io

import numpy as np
from PIL import Image

from npp_jax.infra import storage


def center_crop_arr(img: Image.Image, image_size: int) -> Image.Image:
  while min(*img.size) >= 2 * image_size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = image_size / min(*img.size)
  img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
  arr = np.array(img)
  y = (arr.shape[0] - image_size) // 2
  x = (arr.shape[1] - image_size) // 2
  return Image.fromarray(arr[y : y + image_size, x : x + image_size])


def five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
  """torchvision five_crop order: top-left, top-right, bottom-left, bottom-right, center."""
  h, w = arr.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return [
    arr[:size, :size],
    arr[:size, w - size :],
    arr[h - size :, :size],
    arr[h - size :, w - size :],
    arr[top : top + size, left : left + size],
  ]


def variants(img: Image.Image, image_size: int, ten_crop: bool, crop_range: float) -> np.ndarray:
  """(n_aug, image_size, image_size, 3) float32 in [-1, 1]: 10 crops or (center, mirror)."""
  img = img.convert("RGB")
  if ten_crop:
    arr = np.asarray(center_crop_arr(img, int(image_size * crop_range)))
    crops = five_crop(arr, image_size) + five_crop(arr[:, ::-1], image_size)
  else:
    arr = np.asarray(center_crop_arr(img, image_size))
    crops = [arr, arr[:, ::-1]]
  return np.stack(crops).astype(np.float32) / 127.5 - 1.0


def open_image(data: bytes | str) -> Image.Image:
  """Decodes an image from bytes or a path; raises ValueError if it is not a readable image."""
  if isinstance(data, str) and storage.is_remote(data):
    data = storage.read_bytes(data)  # a failed read raises: only bad images are skipped
  try:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    img.load()
    return img
  except Exception as e:  # noqa: BLE001 (PIL raises many kinds for broken files)
    raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from e

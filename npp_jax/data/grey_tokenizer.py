"""A tiny image tokenizer for the embedded demo: downsample, then quantize grey levels.

A 28x28 digit becomes a 16x16 grid of tokens, each one of 16 grey levels, so the
GPT sees vocabulary 16 and grid 16 and the tokens render straight back to images.
"""

import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class GreyLevelTokenizer:
  """encode: uint8 (N, H, W) -> int32 (N, grid*grid); decode: tokens -> uint8 (N, grid, grid)."""

  grid: int = 16
  levels: int = 16

  @property
  def vocab_size(self) -> int:
    return self.levels

  def encode(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
      raise ValueError(f"images must be (N, H, W) grey levels, got shape {images.shape}.")
    small = np.stack(
      [
        np.asarray(Image.fromarray(im.astype(np.uint8)).resize((self.grid, self.grid), Image.BOX))
        for im in images
      ]
    ).astype(np.float64)
    tokens = np.rint(small / 255.0 * (self.levels - 1)).astype(np.int32)
    return tokens.reshape(len(images), self.grid * self.grid)

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.min() < 0 or tokens.max() >= self.levels:
      raise ValueError(f"grey-level tokens must be in [0, {self.levels}).")
    grey = np.rint(tokens.astype(np.float64) / (self.levels - 1) * 255.0).astype(np.uint8)
    return grey.reshape(*tokens.shape[:-1], self.grid, self.grid)

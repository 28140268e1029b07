"""Turning generated tokens into images: the tokenizer a config names.

`config.tokenizer.name`: "grey" (the embedded demo's grey-level tokenizer) or "vq16"
(LlamaGen's VQ-16, whose decoder needs `config.tokenizer.checkpoint`).
"""

from collections.abc import Callable

import ml_collections
import numpy as np

from npp_jax.data.grey_tokenizer import GreyLevelTokenizer


def decoder(c: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
  """A function from (N, grid*grid) tokens to (N, H, W, 3) uint8 images."""
  name = c.tokenizer.name
  if name == "grey":
    tok = GreyLevelTokenizer(grid=c.model.grid, levels=c.tokenizer.levels)

    def decode_grey(tokens: np.ndarray) -> np.ndarray:
      grey = tok.decode(np.asarray(tokens))
      return np.repeat(grey[..., None], 3, axis=-1)

    return decode_grey
  if name == "vq16":
    raise ValueError(
      "decoding VQ-16 tokens into images needs the VQ tokenizer, which this version does not "
      "include yet; sample with tokenizer.name='grey' models, or keep the tokens."
    )
  raise ValueError(f"unknown tokenizer.name={name!r}; use 'grey' or 'vq16'.")

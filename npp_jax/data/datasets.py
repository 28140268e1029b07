"""Which token dataset a config trains on: a directory of shards, or the embedded digits."""

import os

from npp_jax.data import mnist
from npp_jax.data.grey_tokenizer import GreyLevelTokenizer


def dataset_dir(name: str, path: str, cache_dir: str, grid: int = 16, levels: int = 16) -> str:
  """The directory of token shards to read; the embedded `mnist` one is built on first use.

  Args:
    name: `config.data.name`; "mnist" selects the embedded digits.
    path: `config.data.path`, a directory written by `--config.mode=extract`.
    cache_dir: where the embedded digits are tokenized to.
    grid, levels: the grey-level tokenizer of the embedded digits.
  """
  if name == "mnist":
    return mnist.prepare(cache_dir, GreyLevelTokenizer(grid=grid, levels=levels))
  if not path:
    raise ValueError(
      "config.data.path is empty: point it at a directory of token shards written by "
      "`--config.mode=extract`, or train the embedded demo with configs/mnist.py."
    )
  return os.fspath(path)

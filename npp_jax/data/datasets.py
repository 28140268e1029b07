"""Which token dataset a config trains on: a directory of shards, or the embedded digits."""

import os

import jax
from jax.experimental import multihost_utils

from npp_jax.data import mnist
from npp_jax.data.grey_tokenizer import GreyLevelTokenizer
from npp_jax.infra import storage


def dataset_dirs(
  name: str, path: str, cache_dir: str, grid: int = 16, levels: int = 16
) -> list[str]:
  """The directories of token shards to read (`config.data.path` may name several,
  separated by commas: extractions of the same images mixed by `config.data.weights`)."""
  if name == "mnist":
    return [dataset_dir(name, path, cache_dir, grid, levels)]
  dirs = [p.strip() for p in path.split(",") if p.strip()]
  return [dataset_dir(name, d, cache_dir, grid, levels) for d in dirs or [""]]


def dataset_dir(name: str, path: str, cache_dir: str, grid: int = 16, levels: int = 16) -> str:
  """The directory of token shards to read; the embedded `mnist` one is built on first use.

  Args:
    name: `config.data.name`; "mnist" selects the embedded digits.
    path: `config.data.path`, a directory written by `--config.mode=extract`.
    cache_dir: where the embedded digits are tokenized to.
    grid, levels: the grey-level tokenizer of the embedded digits.
  """
  if name == "mnist":
    if path:
      raise ValueError(
        f"config.data.path={path!r} is set but config.data.name='mnist' trains on the embedded "
        "digits; clear one of them."
      )
    return mnist.prepare(cache_dir, GreyLevelTokenizer(grid=grid, levels=levels), "train")
  if not path:
    raise ValueError(
      "config.data.path is empty: point it at a directory of token shards written by "
      "`--config.mode=extract`, or train the embedded demo with configs/mnist.py."
    )
  return os.fspath(path)


def heldout_dir(
  name: str, eval_path: str, cache_dir: str, grid: int = 16, levels: int = 16
) -> str | None:
  """The held-out token dataset (never trained on), or None when there is none.

  The embedded digits hold out 500 (the judge's); other data names it with
  `config.data.eval_path` (e.g. the validation split through `--config.mode=extract`).
  """
  if name == "mnist":
    return mnist.prepare(cache_dir, GreyLevelTokenizer(grid=grid, levels=levels), "heldout")
  return os.fspath(eval_path) if eval_path else None


def locate(c, workdir: str) -> tuple[list[str], str | None]:
  """(training dataset dirs, held-out dir or None) of a config's `data` section; the
  embedded digits are cached in `data.cache_dir` (default WORKDIR/data)."""
  d = c.data
  args = (d.cache_dir or storage.join(workdir, "data"), c.model.grid, c.tokenizer.levels)
  if d.name == "mnist" and jax.process_count() > 1:
    # One host builds the shared cache (an upload to a bucket takes a while); the others
    # wait and then find it intact, rather than rebuilding it under each other's readers.
    if jax.process_index() == 0:
      dataset_dirs(d.name, d.path, *args)
      heldout_dir(d.name, d.eval_path, *args)
    multihost_utils.sync_global_devices("embedded digits ready")
  return dataset_dirs(d.name, d.path, *args), heldout_dir(d.name, d.eval_path, *args)

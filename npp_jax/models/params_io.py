"""Params-only checkpoints: the orbax directory `python -m npp_jax.convert` writes and jobs read.

Layout of DIR: `params/` (an orbax StandardCheckpointer tree) and `model_config.json`
(the GPTConfig fields, so a sampler can rebuild the model without being told its size).
A converted VQ tokenizer has `vq_config.json` instead.
"""

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from npp_jax.infra import storage
from npp_jax.models.gpt import abstract_params
from npp_jax.models.gpt_config import GPTConfig

CONFIG_FILE = "model_config.json"
VQ_CONFIG_FILE = "vq_config.json"


def save_params(directory: str, params: Any, cfg: Any, *, force: bool = False) -> str:
  """Writes `params` and `cfg` (GPTConfig or VQConfig) to `directory`; never overwrites
  unless `force`."""
  directory = storage.absolute(directory)
  target = storage.join(directory, "params")
  if not force:
    # A config file alone is a model too (a half-written or foreign folder): never replaced
    # without asking.
    for name in ("params", CONFIG_FILE, VQ_CONFIG_FILE):
      if storage.exists(storage.join(directory, name)):
        raise FileExistsError(
          f"{storage.join(directory, name)} already exists; pass force=True (--force) to "
          "replace what is there, or choose another output folder."
        )
  for name in ("params", CONFIG_FILE, VQ_CONFIG_FILE):  # force: what was there goes
    storage.remove(storage.join(directory, name))
  storage.makedirs(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
  name = CONFIG_FILE if isinstance(cfg, GPTConfig) else VQ_CONFIG_FILE
  storage.write_text(storage.join(directory, name), json.dumps(dataclasses.asdict(cfg), indent=1))
  return directory


def restore_tree(directory: str) -> Any:
  """The params tree stored under DIR/params (numpy arrays)."""
  target = storage.join(storage.absolute(directory), "params")
  if not storage.isdir(target):
    raise FileNotFoundError(f"no params checkpoint at {target}.")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(target)


def load_model_config(directory: str) -> GPTConfig:
  """The GPTConfig stored next to converted params."""
  path = storage.join(storage.absolute(directory), CONFIG_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {directory} is not a directory written by `python -m npp_jax.convert`."
    )
  return GPTConfig(**json.loads(storage.read_text(path)))


def load_params(directory: str, cfg: GPTConfig | None = None) -> Any:
  """Restores params written by `save_params` as numpy arrays, checked against `cfg`."""
  directory = storage.absolute(directory)
  target = storage.join(directory, "params")
  if not storage.isdir(target):
    raise FileNotFoundError(f"no params checkpoint at {target}.")
  stored = load_model_config(directory)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(target)
  if cfg is not None:
    want = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_params(cfg)))
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != got:
      raise ValueError(
        f"the params in {directory} were converted for {stored} and do not fit the requested "
        f"model {cfg}; use the model size they were converted for."
      )
  return params

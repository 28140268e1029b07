"""Turning tokens into images and back: the tokenizer a config names.

`config.tokenizer.name`: "grey" (the embedded demo's grey-level tokenizer) or "vq"
(LlamaGen's VQ-16 / VQ-8 tokenizer, `config.tokenizer.preset`; `config.tokenizer.checkpoint`
is a directory written by `python -m npp_jax.convert vq` or the `.pt` file itself).
"""

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from npp_jax import config_lib, sharding
from npp_jax.data.grey_tokenizer import GreyLevelTokenizer
from npp_jax.infra import storage, torch_io
from npp_jax.models import params_io, vqgan_torch
from npp_jax.models.vqgan import VQConfig, VQModel, abstract_params, codes_to_images_uint8


def vq_config(c: ml_collections.ConfigDict) -> VQConfig:
  """The VQConfig a converted checkpoint directory was written with, else `c.tokenizer`'s."""
  t = c.tokenizer
  path = storage.join(t.checkpoint, params_io.VQ_CONFIG_FILE) if t.checkpoint else ""
  if path and storage.exists(path):
    return VQConfig(**json.loads(storage.read_text(path)))
  return config_lib.vq_config(c)


def load_vq(c: ml_collections.ConfigDict) -> tuple[VQConfig, Any]:
  """(VQConfig, params) from `c.tokenizer.checkpoint`, checked against each other."""
  source = c.tokenizer.checkpoint
  if not source:
    raise ValueError(
      "tokenizer.checkpoint is empty: give the VQ tokenizer (vq_ds16_c2i.pt, or the directory "
      "written by `python -m npp_jax.convert vq`; where to get it: README, 'Files from outside')."
    )
  cfg = vq_config(c)
  if storage.isdir(source):
    params = params_io.restore_tree(source)
    want = jax.tree.map(lambda x: tuple(x.shape), abstract_params(cfg))
    if jax.tree.map(lambda x: tuple(x.shape), params) != want:
      raise ValueError(f"the tokenizer params in {source} do not fit {cfg}.")
  else:
    sd = torch_io.load_torch_checkpoint(source, trust=c.trust_checkpoint)
    params = vqgan_torch.params_from_torch(sd, cfg)
  if cfg.codebook_size != c.model.vocab_size:
    raise ValueError(
      f"the tokenizer's codebook has {cfg.codebook_size} codes but the GPT's vocabulary is "
      f"{c.model.vocab_size}: use the tokenizer the GPT was trained with."
    )
  return cfg, params


# Variants per device in one encoder step when `extract.batch_size` is 0: VQ-16 at 256 px
# needs 0.75 GiB of activations for 8 (the CPU backend's memory analysis; 6 GiB for 64),
# and a 1-device CPU host extracts within 2.2 GB (`bench extract`).
ENCODE_PER_DEVICE = 8


def encode_batch(batch_size: int, num_devices: int) -> int:
  """Variants per encoder step: `batch_size` rounded up to a multiple of the devices, or
  ENCODE_PER_DEVICE per device when it is 0."""
  if batch_size < 0:
    raise ValueError(
      f"extract.batch_size={batch_size} must be >= 0 (0: {ENCODE_PER_DEVICE} per device)."
    )
  if batch_size == 0:
    return ENCODE_PER_DEVICE * num_devices
  return batch_size + (-batch_size) % num_devices


def _at_precision(cfg: VQConfig, precision: str, method, **jit_kwargs):
  model = VQModel(cfg)

  def fn(p, x):
    with jax.default_matmul_precision(precision):
      return model.apply({"params": p}, x, method=method)

  return jax.jit(fn, **jit_kwargs)


def encoder(cfg: VQConfig, precision: str, mesh=None):
  """The jitted VQ encoder, images (B, H, W, 3) in [-1, 1] -> codes; on `mesh` the params
  are replicated and the images split over its data axes (extraction's layout)."""
  if mesh is None:
    return _at_precision(cfg, precision, VQModel.encode)
  shardings = (sharding.replicated(mesh), sharding.batch_sharding(mesh))
  return _at_precision(cfg, precision, VQModel.encode, in_shardings=shardings)


def lower_encoder(
  cfg: VQConfig, precision: str, mesh, batch: int, image_size: int
) -> jax.stages.Lowered:
  """The encoder for `batch` images of `image_size` px on `mesh`, from shapes alone."""
  params = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
    abstract_params(cfg),
  )
  images = jax.ShapeDtypeStruct(
    (batch, image_size, image_size, cfg.in_channels),
    jnp.float32,
    sharding=sharding.batch_sharding(mesh),
  )
  return encoder(cfg, precision, mesh).lower(params, images)


class VQTokenizer:
  """Jitted encode/decode with fixed batch shapes (one compilation per image size).

  Convolutions and matmuls run at `precision` (jax.default_matmul_precision): "float32" by
  default, so that codes are the reference's float32 extraction's on every platform (TPUs
  otherwise multiply float32 in bf16 passes).
  """

  def __init__(self, cfg: VQConfig, params: Any, precision: str = "float32", mesh=None):
    if precision not in config_lib.PRECISIONS:
      raise ValueError(f"tokenizer precision {precision!r}; use one of {config_lib.PRECISIONS}.")
    self.cfg, self.precision = cfg, precision
    self.params = jax.device_put(params, sharding.replicated(mesh) if mesh is not None else None)
    self._encode = encoder(cfg, precision, mesh)
    self._decode = _at_precision(cfg, precision, VQModel.decode_codes)

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "VQTokenizer":
    """The VQ tokenizer of `c.tokenizer` (weights from `c.tokenizer.checkpoint`)."""
    return cls(*load_vq(c), precision=c.tokenizer.precision)

  def encode(self, images: Any) -> jax.Array:
    """float images NHWC in [-1, 1] -> codes (B, h, w)."""
    return self._encode(self.params, images)

  def decode(self, codes: Any) -> jax.Array:
    """codes (B, h, w) -> float images NHWC in about [-1, 1]."""
    return self._decode(self.params, codes)


def decoder(c: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
  """A function from (N, grid*grid) tokens to (N, H, W, 3) uint8 images."""
  config_lib.check_tokenizer(c)
  if c.tokenizer.name == "grey":
    tok = GreyLevelTokenizer(grid=c.model.grid, levels=c.tokenizer.levels)

    def decode_grey(tokens: np.ndarray) -> np.ndarray:
      grey = tok.decode(np.asarray(tokens))
      return np.repeat(grey[..., None], 3, axis=-1)

    return decode_grey
  vq = VQTokenizer.from_config(c)
  g = c.model.grid

  local = jax.local_devices()
  split = jax.sharding.NamedSharding(jax.sharding.Mesh(local, ("rows",)), P("rows"))

  def decode_vq(tokens: np.ndarray) -> np.ndarray:
    codes = np.asarray(tokens, np.int32).reshape(-1, g, g)
    # Over this host's devices when the rows split evenly (each host decodes its own rows).
    codes = jax.device_put(codes, split) if len(codes) % len(local) == 0 else jnp.asarray(codes)
    return codes_to_images_uint8(vq.decode(codes))

  return decode_vq

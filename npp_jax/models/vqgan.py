"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8) in Flax Linen, NHWC.

encode(images in [-1, 1], (B, H, W, 3)) -> codes (B, H/f, W/f); decode_codes(codes) ->
images (B, H, W, 3) in about [-1, 1]. Module and parameter names mirror the reference's
state dict (`encoder.conv_blocks.0.res.1.conv1.weight` -> encoder/conv_blocks_0/res_1/
conv1/kernel), so `vqgan_torch.params_from_torch` maps names mechanically.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VQ_PRESETS: dict[str, dict[str, Any]] = {
  "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),
  "VQ-8": dict(ch_mult=(1, 2, 2, 4)),
}


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """Architecture of LlamaGen's `VQModel` (tokenizer/tokenizer_image/vq_model.py)."""

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 256
  codebook_size: int = 16384
  codebook_embed_dim: int = 8
  codebook_l2_norm: bool = True
  in_channels: int = 3
  out_channels: int = 3
  norm_groups: int = 32
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    bad = [c for c in (self.ch * m for m in self.ch_mult) if c % self.norm_groups]
    if bad:
      raise ValueError(
        f"channels {bad} are not divisible by GroupNorm's {self.norm_groups} groups."
      )

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "VQConfig":
    if name not in VQ_PRESETS:
      raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(VQ_PRESETS)}.")
    return cls(**{**VQ_PRESETS[name], **overrides})

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


def swish(x):
  return x * jax.nn.sigmoid(x)


class Conv(nn.Module):
  features: int
  kernel: int = 3
  stride: int = 1
  padding: Any = "SAME"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=self.stride,
      padding=self.padding,
      dtype=self.dtype,
      name="conv",
    )(x)


def _conv(features, kernel=3, stride=1, padding=1, dtype=jnp.float32, name=None):
  pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad, dtype=dtype, name=name)


def _norm(cfg: VQConfig, name: str):
  return nn.GroupNorm(
    num_groups=cfg.norm_groups, epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32, name=name
  )


class ResnetBlock(nn.Module):
  cfg: VQConfig
  out_ch: int

  @nn.compact
  def __call__(self, x):
    dt = jnp.dtype(self.cfg.dtype)
    h = _conv(self.out_ch, dtype=dt, name="conv1")(swish(_norm(self.cfg, "norm1")(x)))
    h = _conv(self.out_ch, dtype=dt, name="conv2")(swish(_norm(self.cfg, "norm2")(h)))
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, kernel=1, padding=0, dtype=dt, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions (1x1 convs are dense layers on C)."""

  cfg: VQConfig

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    dt = jnp.dtype(self.cfg.dtype)
    h = _norm(self.cfg, "norm")(x)
    q, k, v = (
      _conv(c, 1, padding=0, dtype=dt, name=n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v")
    )
    w = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c**-0.5)
    w = jax.nn.softmax(w, axis=-1).astype(dt)
    out = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, padding=0, dtype=dt, name="proj_out")(out)


class EncoderLevel(nn.Module):
  cfg: VQConfig
  level: int

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    out_ch = cfg.ch * cfg.ch_mult[self.level]
    last = self.level == len(cfg.ch_mult) - 1
    for j in range(cfg.num_res_blocks):
      x = ResnetBlock(cfg, out_ch, name=f"res_{j}")(x)
      if last:
        x = AttnBlock(cfg, name=f"attn_{j}")(x)
    if not last:
      # The reference pads right and bottom by one, then a stride-2 VALID 3x3 conv.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = Conv(out_ch, 3, 2, "VALID", jnp.dtype(cfg.dtype), name="downsample")(x)
    return x


class DecoderLevel(nn.Module):
  cfg: VQConfig
  index: int  # 0 = lowest resolution (the reference iterates ch_mult reversed)

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    n = len(cfg.ch_mult)
    out_ch = cfg.ch * cfg.ch_mult[n - 1 - self.index]
    for j in range(cfg.num_res_blocks + 1):
      x = ResnetBlock(cfg, out_ch, name=f"res_{j}")(x)
      if self.index == 0:
        x = AttnBlock(cfg, name=f"attn_{j}")(x)
    if self.index != n - 1:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
      x = Conv(out_ch, 3, 1, ((1, 1), (1, 1)), jnp.dtype(cfg.dtype), name="upsample")(x)
    return x


class Encoder(nn.Module):
  cfg: VQConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    h = _conv(cfg.ch, dtype=dt, name="conv_in")(x.astype(dt))
    for i in range(len(cfg.ch_mult)):
      h = EncoderLevel(cfg, i, name=f"conv_blocks_{i}")(h)
    c = h.shape[-1]
    h = ResnetBlock(cfg, c, name="mid_0")(h)
    h = AttnBlock(cfg, name="mid_1")(h)
    h = ResnetBlock(cfg, c, name="mid_2")(h)
    return _conv(cfg.z_channels, dtype=dt, name="conv_out")(swish(_norm(cfg, "norm_out")(h)))


class Decoder(nn.Module):
  cfg: VQConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    c = cfg.ch * cfg.ch_mult[-1]
    h = _conv(c, dtype=dt, name="conv_in")(z.astype(dt))
    h = ResnetBlock(cfg, c, name="mid_0")(h)
    h = AttnBlock(cfg, name="mid_1")(h)
    h = ResnetBlock(cfg, c, name="mid_2")(h)
    for i in range(len(cfg.ch_mult)):
      h = DecoderLevel(cfg, i, name=f"conv_blocks_{i}")(h)
    return _conv(cfg.out_channels, dtype=dt, name="conv_out")(swish(_norm(cfg, "norm_out")(h)))


def l2_normalize(x, eps=1e-12):
  """F.normalize: x / max(||x||, eps) over the last axis."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class VQModel(nn.Module):
  """Encoder -> quant_conv -> nearest code -> post_quant_conv -> decoder."""

  cfg: VQConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = _conv(cfg.codebook_embed_dim, 1, padding=0)
    self.post_quant_conv = _conv(cfg.z_channels, 1, padding=0)
    self.quantize = Quantizer(cfg)

  def encode_all(self, images):
    """Every intermediate of the encoder path: encoder_out, h, codes (B, h, w), z_q, margin."""
    encoder_out = self.encoder(images).astype(jnp.float32)
    h = self.quant_conv(encoder_out)
    codes, z_q, margin = self.quantize(h)
    return {"encoder_out": encoder_out, "h": h, "codes": codes, "z_q": z_q, "margin": margin}

  def encode(self, images):
    """Images NHWC in [-1, 1] -> int32 codes (B, H/f, W/f)."""
    return self.encode_all(images)["codes"]

  def decode_codes(self, codes):
    """Codes (B, h, w) -> images NHWC (float32, about [-1, 1])."""
    z_q = self.quantize.lookup(codes)
    return self.decoder(self.post_quant_conv(z_q)).astype(jnp.float32)

  def __call__(self, images):
    """The reference's forward: reconstruction of `images` through the codebook."""
    z_q = self.encode_all(images)["z_q"]
    return self.decoder(self.post_quant_conv(z_q)).astype(jnp.float32)


class Quantizer(nn.Module):
  """Nearest-neighbour codebook lookup on l2-normalised latents and codes (eval mode)."""

  cfg: VQConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
      "embedding",
      nn.initializers.uniform(2.0 / cfg.codebook_size),
      (cfg.codebook_size, cfg.codebook_embed_dim),
    )

  def codebook(self):
    e = self.embedding.astype(jnp.float32)
    return l2_normalize(e) if self.cfg.codebook_l2_norm else e

  def __call__(self, h):
    z = h.astype(jnp.float32)
    e = self.codebook()
    if self.cfg.codebook_l2_norm:
      z = l2_normalize(z)
    d = (
      jnp.sum(z * z, -1, keepdims=True)
      + jnp.sum(e * e, -1)
      - 2 * jnp.einsum("bhwc,nc->bhwn", z, e, precision=jax.lax.Precision.HIGHEST)
    )
    codes = jnp.argmin(d, axis=-1).astype(jnp.int32)
    two = -jax.lax.top_k(-d, 2)[0]
    return codes, jnp.take(e, codes, axis=0), two[..., 1] - two[..., 0]

  def lookup(self, codes):
    return jnp.take(self.codebook(), codes, axis=0)


def abstract_params(cfg: VQConfig) -> Any:
  """ShapeDtypeStructs of `VQModel(cfg)`'s params (nothing allocated)."""
  x = jax.ShapeDtypeStruct(
    (1, 2 * cfg.downsample, 2 * cfg.downsample, cfg.in_channels), jnp.float32
  )
  return jax.eval_shape(VQModel(cfg).init, jax.random.key(0), x)["params"]


def codes_to_images_uint8(images: np.ndarray) -> np.ndarray:
  """Decoder output in [-1, 1] -> uint8 (as LlamaGen saves samples: clamp, *127.5 + 128)."""
  x = np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255)
  return x.astype(np.uint8)

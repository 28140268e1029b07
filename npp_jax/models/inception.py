"""The FID InceptionV3 (pytorch-fid's port of TF's 2015-12-05 graph) in Flax Linen, NHWC.

Layer names follow `pt_inception-2015-12-05-6726825d.pth` (Conv2d_1a_3x3, Mixed_5b, ...,
each BasicConv2d = bias-free conv -> BatchNorm(eps 1e-3, running statistics) -> ReLU), so
the converter maps names mechanically. FID blocks differ from torchvision's: average
pools exclude padding, and Mixed_7c pools with max instead of average.

`InceptionV3()(x)` takes preprocessed (B, 299, 299, 3) inputs in [-1, 1] and returns
pool3 (B, 2048), the 1008-way logits with and without the fc bias, and the 17x17
`mixed_6/conv` map (Mixed_6d's 1x1 branch) whose first 7 channels ADM uses for sFID.
Preprocessing lives in `preprocess_pytorch_fid` and `preprocess_adm`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Convolutions without padding (all others pad to keep the size, (k-1)/2 per side).
_VALID = {
  "Conv2d_1a_3x3",
  "Conv2d_2a_3x3",
  "Conv2d_4a_3x3",
  "Mixed_6a.branch3x3",
  "Mixed_6a.branch3x3dbl_3",
  "Mixed_7a.branch3x3_2",
  "Mixed_7a.branch7x7x3_4",
}
_STRIDE2 = {
  "Conv2d_1a_3x3",
  "Mixed_6a.branch3x3",
  "Mixed_6a.branch3x3dbl_3",
  "Mixed_7a.branch3x3_2",
  "Mixed_7a.branch7x7x3_4",
}


class BasicConv2d(nn.Module):
  features: int
  kernel: tuple[int, int]
  where: str  # "Mixed_6a.branch3x3": decides stride and padding as in torchvision

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    stride = 2 if self.where in _STRIDE2 else 1
    pad = ((0, 0), (0, 0)) if self.where in _VALID else ((kh // 2, kh // 2), (kw // 2, kw // 2))
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=stride,
      padding=pad,
      use_bias=False,
      precision=jax.lax.Precision.HIGHEST,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return jax.nn.relu(x)


def _avg_pool_exclude_pad(x):
  """3x3 stride-1 average pool that, like TF, does not count the zero padding."""
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


def _max_pool(x, stride, pad):
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


class _Block(nn.Module):
  """Helper: `self.conv(name, features, kernel)` makes a named BasicConv2d."""

  def conv(self, name, features, kernel=(1, 1)):
    return BasicConv2d(features, kernel, f"{self.name}.{name}", name=name)


class InceptionA(_Block):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5))(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3))(self.conv("branch3x3dbl_2", 96, (3, 3))(b3))
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, (3, 3))(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3))(self.conv("branch3x3dbl_2", 96, (3, 3))(bd))
    return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(_Block):
  """Returns (block output, its 1x1 branch): Mixed_6d's is ADM's sFID map `mixed_6/conv`."""

  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_3", 192, (7, 1))(self.conv("branch7x7_2", c7, (1, 7))(b7))
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7))(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(_Block):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, (3, 3))(self.conv("branch3x3_1", 192)(x))
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3))(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(_Block):
  max_pool: bool  # FIDInceptionE_2 (Mixed_7c) pools with max

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate(
      [self.conv("branch3x3_2a", 384, (1, 3))(b3), self.conv("branch3x3_2b", 384, (3, 1))(b3)],
      axis=-1,
    )
    bd = self.conv("branch3x3dbl_2", 384, (3, 3))(self.conv("branch3x3dbl_1", 448)(x))
    bd = jnp.concatenate(
      [
        self.conv("branch3x3dbl_3a", 384, (1, 3))(bd),
        self.conv("branch3x3dbl_3b", 384, (3, 1))(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_exclude_pad(x)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID network; input (B, 299, 299, 3) in [-1, 1] (see the preprocess functions)."""

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = BasicConv2d(32, (3, 3), "Conv2d_1a_3x3", name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), "Conv2d_2a_3x3", name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), "Conv2d_2b_3x3", name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2, 0)
    x = BasicConv2d(80, (1, 1), "Conv2d_3b_1x1", name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), "Conv2d_4a_3x3", name="Conv2d_4a_3x3")(x)
    x = _max_pool(x, 2, 0)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    pool3 = x.mean(axis=(1, 2))
    fc = nn.Dense(1008, precision=jax.lax.Precision.HIGHEST, name="fc")
    logits = fc(pool3)
    kernel = fc.variables["params"]["kernel"]
    nobias = jnp.dot(pool3, kernel, precision=jax.lax.Precision.HIGHEST)
    b = mixed_6_conv.shape[0]
    return {
      "pool3": pool3,
      "logits": logits,
      "logits_nobias": nobias,
      "mixed_6_conv": mixed_6_conv,
      "sfid_spatial": mixed_6_conv[..., :7].reshape(b, -1),
    }


def resize_bilinear_half_pixel(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """F.interpolate(mode='bilinear', align_corners=False, antialias=False), NHWC."""
  return _resize(x, size, half_pixel=True)


def resize_bilinear_tf1(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """TF1 ResizeBilinear (align_corners=False, no half-pixel centres): src = dst * in / out."""
  return _resize(x, size, half_pixel=False)


def _axis_weights(n_in: int, n_out: int, half_pixel: bool):
  dst = np.arange(n_out, dtype=np.float64)
  scale = n_in / n_out
  src = (dst + 0.5) * scale - 0.5 if half_pixel else dst * scale
  src = np.clip(src, 0, None)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m


def _resize(x, size, half_pixel):
  h, w = x.shape[1:3]
  mh = jnp.asarray(_axis_weights(h, size, half_pixel))
  mw = jnp.asarray(_axis_weights(w, size, half_pixel))
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


def preprocess_pytorch_fid(images_uint8: jnp.ndarray) -> jnp.ndarray:
  """pytorch-fid: x/255, half-pixel bilinear resize to 299, then 2x - 1. NHWC uint8 in."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return 2.0 * resize_bilinear_half_pixel(x, 299) - 1.0


def preprocess_adm(images_uint8: jnp.ndarray) -> jnp.ndarray:
  """ADM's TF graph: TF1 bilinear resize of [0, 255] to 299, then (x - 128) / 128."""
  x = resize_bilinear_tf1(images_uint8.astype(jnp.float32), 299)
  return (x - 128.0) / 128.0


def abstract_variables() -> dict:
  """ShapeDtypeStructs of `InceptionV3()`'s params and batch statistics (nothing allocated)."""
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)

"""The LlamaGen class-conditional GPT in Flax Linen, with NPP patch inputs and a KV cache.

Layers are stacked with `nn.scan` (one compiled block whatever the depth), so every
per-layer parameter has a leading "layers" axis. The residual stream stays float32 (or
`cfg.residual_dtype`); matmuls run in `cfg.dtype` (bf16 by default) as under PyTorch
autocast in the reference.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from npp_jax import npp
from npp_jax.models.gpt_config import PRESETS, GPTConfig, find_multiple

__all__ = [
  "GPT",
  "GPTConfig",
  "PRESETS",
  "find_multiple",
  "init_cache",
  "matmul_weights_in_compute_dtype",
  "validate_inputs",
]

Array = jnp.ndarray


def _param(module: nn.Module, name: str, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_inputs(cfg: GPTConfig, tokens: Any, labels: Any, allow_null_class: bool) -> None:
  """Checks shapes and id ranges of concrete inputs; a clear ValueError names the bad value."""
  if tokens is not None and _is_concrete(tokens):
    t = np.asarray(tokens)
    if t.ndim != 2:
      raise ValueError(f"tokens must be (batch, tokens), got shape {t.shape}.")
    if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
      bad = t[(t < 0) | (t >= cfg.vocab_size)][0]
      raise ValueError(
        f"token id {int(bad)} is outside the vocabulary [0, {cfg.vocab_size}): the codes do not "
        f"come from this model's tokenizer (vocab_size={cfg.vocab_size})."
      )
  if labels is not None and _is_concrete(labels):
    y = np.asarray(labels)
    if y.ndim != 1:
      raise ValueError(f"labels must be (batch,), got shape {y.shape}.")
    top = cfg.num_classes + (1 if allow_null_class and cfg.has_null_class else 0)
    if y.size and (y.min() < 0 or y.max() >= top):
      bad = int(y[(y < 0) | (y >= top)][0])
      hint = (
        f" ({cfg.num_classes} is the null class, accepted only for guidance)"
        if bad == cfg.num_classes and cfg.has_null_class
        else ""
      )
      raise ValueError(f"class label {bad} is outside [0, {top}){hint}.")
  if tokens is not None and labels is not None and np.shape(tokens)[0] != np.shape(labels)[0]:
    raise ValueError(
      f"tokens have batch {np.shape(tokens)[0]} but labels have {np.shape(labels)[0]}."
    )


def batch_sharded(x: Array) -> Array:
  """Keeps an activation split over the batch axis (the `batch` logical rule) when the
  caller traces under sharding.activation_sharding; a no-op otherwise."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def weight_matmul(spec: str, x: Array, w: Array, cfg: GPTConfig) -> Array:
  """`einsum(spec, x, w)` in the compute dtype, `w` a weight cast where it is used.

  With `cfg.grad_dtype` wider than the compute dtype (float32 under bf16, the default),
  the weight's gradient is summed over the batch into `grad_dtype` (a bf16 matmul with a
  float32 result) and returned in the weight's dtype, never rounded to bf16: on a mesh
  the partial sums of the chips are then reduced in float32, as the reference's DDP
  reduces float32 gradients. Otherwise plain autodiff (weights cast once per step by
  `matmul_weights_in_compute_dtype`, gradients reduced in the compute dtype).
  """
  dt = cfg.compute_dtype
  if jnp.dtype(cfg.grad_dtype) == dt or w.dtype == dt:
    return jnp.einsum(spec, x.astype(dt), w.astype(dt))
  return _matmul_wide_weight_grad(spec, jnp.dtype(cfg.grad_dtype), x.astype(dt), w, dt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 4))
def _matmul_wide_weight_grad(spec, grad_dtype, x, w, dt):
  return jnp.einsum(spec, x, w.astype(dt))


def _wide_fwd(spec, grad_dtype, x, w, dt):
  w_c = w.astype(dt)
  return jnp.einsum(spec, x, w_c), (x, w_c, jnp.zeros((), w.dtype))


def _wide_bwd(spec, grad_dtype, dt, residuals, g):
  x, w_c, like = residuals
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, w_c)
  dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=grad_dtype)
  return dx.astype(x.dtype), dw.astype(like.dtype)


_matmul_wide_weight_grad.defvjp(_wide_fwd, _wide_bwd)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, rounded to the input dtype, times the weight."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = _param(
      self, "weight", nn.initializers.ones, (self.cfg.dim,), ("norm",), self.cfg.storage_dtype
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed.astype(x.dtype).astype(jnp.float32) * w.astype(jnp.float32)).astype(
      self.cfg.compute_dtype
    )


def apply_rope(x: Array, rope: Array) -> Array:
  """Rotates adjacent pairs (x[2i], x[2i+1]); x (B, T, H, D), rope (T, D/2, 2). Float32 math."""
  with jax.named_scope("rope"):  # names its ops in the HLO (see hlo_ops and its test)
    return _rotate_pairs(x, rope)


def _rotate_pairs(x: Array, rope: Array) -> Array:
  b, t, h, d = x.shape
  xs = x.astype(jnp.float32).reshape(b, t, h, d // 2, 2)
  cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
  out = jnp.stack(
    [xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], axis=-1
  )
  return out.reshape(b, t, h, d).astype(x.dtype)


def causal_attention(q: Array, k: Array, v: Array, mask: Array | None, backend: str) -> Array:
  """Causal softmax attention through `jax.nn.dot_product_attention`.

  q (B, T, H, D); k, v (B, S, KV, D) with KV dividing H (grouped-query attention without
  copying K/V). Scores and softmax are float32 whatever the input dtype. `mask` None means
  training (query i sees keys 0..i); a KV-cache step passes its (1, 1, T, S) mask instead.
  `backend` "cudnn" runs NVIDIA's fused flash kernel; "xla" is portable.
  """
  if backend == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
      f"model.attention='cudnn' needs an NVIDIA GPU but JAX runs on {jax.default_backend()}; "
      "use --config.model.attention=xla."
    )
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=backend)
  if backend == "cudnn" and q.shape[1] == 1:
    # One new query at the end of the filled cache sees exactly the first `n` keys: cuDNN's
    # padding mask says so without a materialised mask.
    n = jnp.sum(mask[0, 0, 0], dtype=jnp.int32)
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"
    )
  # Several queries in the cache: cuDNN's causal mask starts at key 0, not at the cache
  # index, so XLA's kernel takes the explicit mask.
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _attention_with_dropout(q: Array, k: Array, v: Array, rate: float, rng: Array) -> Array:
  """Training attention with dropout on the probabilities (as the reference's
  `attn_dropout_p`), which `jax.nn.dot_product_attention` does not offer; float32 softmax."""
  b, t, nh, hd = q.shape
  nkv = k.shape[2]
  qg = q.reshape(b, t, nkv, nh // nkv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  causal = jnp.tril(jnp.ones((t, k.shape[1]), bool))
  scores = jnp.where(causal, scores / np.sqrt(hd), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
  return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v).reshape(b, t, nh, hd)


class Attention(nn.Module):
  """Multi-head (or grouped-query) causal self-attention with 2D RoPE and an optional KV cache."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, rope, deterministic, cache=None, cache_index=None, layer=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    init = nn.initializers.normal(0.02)
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    wq = _param(
      self, "wq", init, (cfg.dim, nh, hd), ("embed", "heads", "head_dim"), cfg.storage_dtype
    )
    wk = _param(
      self, "wk", init, (cfg.dim, nkv, hd), ("embed", "kv_heads", "head_dim"), cfg.storage_dtype
    )
    wv = _param(
      self, "wv", init, (cfg.dim, nkv, hd), ("embed", "kv_heads", "head_dim"), cfg.storage_dtype
    )
    wo = _param(
      self, "wo", init, (nh, hd, cfg.dim), ("heads", "head_dim", "embed"), cfg.storage_dtype
    )
    x = x.astype(dt)
    q = apply_rope(weight_matmul("btd,dhk->bthk", x, wq, cfg), rope)
    k = apply_rope(weight_matmul("btd,dhk->bthk", x, wk, cfg), rope)
    v = weight_matmul("btd,dhk->bthk", x, wv, cfg)

    t = x.shape[1]
    if cache is None:
      keys, values, mask, new_cache = k, v, None, None
    else:
      # The cache of all layers is one loop-carried buffer: writing this layer's new
      # entries in place (instead of stacking per-layer outputs) keeps decoding from
      # copying the whole cache at every token.
      at = (layer, 0, cache_index, 0, 0)
      new_cache = {
        "k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at),
        "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at),
      }
      keys = jax.lax.dynamic_index_in_dim(new_cache["k"], layer, 0, keepdims=False).astype(dt)
      values = jax.lax.dynamic_index_in_dim(new_cache["v"], layer, 0, keepdims=False).astype(dt)
      # Query i sits at cache_index + i and sees the cache up to there.
      q_pos = cache_index + jnp.arange(t)
      mask = (jnp.arange(keys.shape[1])[None, :] <= q_pos[:, None])[None, None]
    if cfg.attn_dropout_p > 0 and not deterministic:
      out = _attention_with_dropout(q, keys, values, cfg.attn_dropout_p, self.make_rng("dropout"))
    else:
      out = causal_attention(q, keys, values, mask, cfg.attention)
    out = weight_matmul("bthk,hkd->btd", out, wo, cfg)
    out = nn.Dropout(cfg.resid_dropout_p)(out, deterministic=deterministic)
    return out, new_cache


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x), then FFN dropout."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, deterministic):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    init = nn.initializers.normal(0.02)
    w1 = _param(self, "w1", init, (cfg.dim, cfg.ffn_hidden), ("embed", "mlp"), cfg.storage_dtype)
    w3 = _param(self, "w3", init, (cfg.dim, cfg.ffn_hidden), ("embed", "mlp"), cfg.storage_dtype)
    w2 = _param(self, "w2", init, (cfg.ffn_hidden, cfg.dim), ("mlp", "embed"), cfg.storage_dtype)
    x = x.astype(dt)
    h = jax.nn.silu(weight_matmul("btd,df->btf", x, w1, cfg)) * weight_matmul(
      "btd,df->btf", x, w3, cfg
    )
    out = weight_matmul("btf,fd->btd", h, w2, cfg)
    return nn.Dropout(cfg.ffn_dropout_p)(out, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm transformer block with stochastic depth; the scan body (carry = residual)."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, carry, drop_rate, layer, rope, cache_index, deterministic):
    cfg = self.cfg
    x, cache = carry
    attn, new_cache = Attention(cfg, name="attention")(
      RMSNorm(cfg, name="attention_norm")(x), rope, deterministic, cache, cache_index, layer
    )
    h = x + self._drop_path(attn, drop_rate, deterministic)
    ffn = FeedForward(cfg, name="feed_forward")(RMSNorm(cfg, name="ffn_norm")(h), deterministic)
    out = batch_sharded(h + self._drop_path(ffn, drop_rate, deterministic))
    return (out, new_cache), None

  def _drop_path(self, x, rate, deterministic):
    if deterministic or self.cfg.drop_path_rate == 0:
      return x.astype(self.cfg.residual)
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
    return jnp.where(mask, x.astype(self.cfg.residual) / keep, 0.0).astype(self.cfg.residual)


def _remat(cls, policy: str):
  if policy == "none":
    return cls
  pol = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  # `deterministic` (argument 6, counting self) stays a Python bool: dropout branches on it.
  return nn.remat(cls, policy=pol, prevent_cse=False, static_argnums=(6,))


# The parameters that only ever enter matmuls, which the modules cast to `cfg.dtype` at use.
# Embeddings and RMSNorm weights are read in float32 (as under autocast in the reference).
MATMUL_WEIGHTS = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"})


def matmul_weights_in_compute_dtype(params: Any, cfg: GPTConfig) -> Any:
  """`params` with the matmul weights cast to `cfg.dtype` once, for a whole step.

  The modules cast each weight where it is used; a step that casts first gives the same
  numbers bit for bit, but casts once per train step (not again in rematerialisation or
  per micro-batch) and once per generated batch (not at every token step of the decode
  loop). The cost: a `cfg.dtype` copy of those weights lives through the step.
  """

  def cast(path, x):
    # The last dict key names the parameter (a boxed leaf adds a `.value` attribute).
    name = next((k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), None)
    return x.astype(cfg.compute_dtype) if name in MATMUL_WEIGHTS else x

  return jax.tree_util.tree_map_with_path(cast, params)


def init_cache(cfg: GPTConfig, batch: int, max_len: int | None = None, dtype=None) -> dict:
  """Zeroed KV cache for all layers: {"k", "v"} of (n_layer, B, max_len, kv_heads, head_dim).

  `max_len` defaults to the class token plus all image tokens.
  """
  max_len = max_len or cfg.cls_token_num + cfg.seq_len
  shape = (cfg.n_layer, batch, max_len, cfg.kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class GPT(nn.Module):
  """LlamaGen class-conditional transformer.

  Training / scoring: `apply({"params": p}, tokens, labels, patch_side=s)` returns
  logits (B, (grid/s)^2, vocab) for input `[class] + patches[:-1]`, each patch the mean
  of the token embeddings of an s x s block; position i predicts patch i.

  Decoding: `apply(..., method=GPT.decode)` with an explicit cache from `init_cache`.
  """

  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    init = nn.initializers.normal(0.02)
    self.tok_embeddings = _param(
      self, "tok_embeddings", init, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg.storage_dtype
    )
    self.cls_embedding = _param(
      self,
      "cls_embedding",
      init,
      (cfg.class_rows, cfg.dim),
      ("classes", "embed"),
      cfg.storage_dtype,
    )
    self.norm = RMSNorm(cfg)
    self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
    self.layers = nn.scan(
      _remat(Block, cfg.remat),
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
      length=cfg.n_layer,
      unroll=min(cfg.scan_unroll, cfg.n_layer),
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)
    self.output = _param(
      self,
      "output",
      nn.initializers.zeros,
      (cfg.dim, cfg.vocab_size),
      ("embed", "vocab"),
      cfg.storage_dtype,
    )

  def _trunk(self, h, rope, deterministic, cache=None, cache_index=None):
    cfg = self.cfg
    h = batch_sharded(self.tok_dropout(h, deterministic=deterministic).astype(cfg.residual))
    rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.n_layer)
    layer_ids = jnp.arange(cfg.n_layer)
    (h, new_cache), _ = self.layers((h, cache), rates, layer_ids, rope, cache_index, deterministic)
    h = self.norm(h)
    logits = weight_matmul("btd,dv->btv", h, self.output, cfg)
    return batch_sharded(logits.astype(jnp.float32)), new_cache

  def _class_embed(self, labels, deterministic):
    cfg = self.cfg
    if not deterministic and cfg.class_dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < cfg.class_dropout_prob
      labels = jnp.where(drop, cfg.num_classes, labels)
    return jnp.take(self.cls_embedding, labels, axis=0)[:, None, :]

  def __call__(
    self,
    tokens,
    labels,
    *,
    patch_side: int = 1,
    deterministic: bool = True,
    allow_null_class: bool = False,
  ):
    cfg = self.cfg
    npp.check_patch_side(cfg.grid, patch_side)
    validate_inputs(cfg, tokens, labels, allow_null_class)
    if tokens.shape[1] != cfg.seq_len:
      raise ValueError(
        f"tokens have {tokens.shape[1]} positions; this model expects grid*grid = {cfg.seq_len}."
      )
    emb = jnp.take(self.tok_embeddings, tokens, axis=0).astype(jnp.float32)
    patches = npp.patch_average(emb, cfg.grid, patch_side)
    h = jnp.concatenate([self._class_embed(labels, deterministic), patches[:, :-1]], axis=1)
    rope = jnp.asarray(
      npp.rope_2d(cfg.grid // patch_side, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
    )[: h.shape[1]]
    logits, _ = self._trunk(h, rope, deterministic)
    return logits

  def decode(self, tokens, labels, cache, cache_index, *, allow_null_class: bool = True):
    """Runs `[class]` (when `labels` is given: prefill) or `tokens` through the KV cache.

    Args:
      tokens: (B, T) ids at positions cache_index.. (ignored when labels is given).
      labels: (B,) class ids, or None for a token step.
      cache: from `init_cache`.
      cache_index: position of the first input in the sequence [class, tok_0, ...].
      allow_null_class: accept the null class (guidance) in `labels`.

    Returns:
      (logits (B, T, vocab) float32, new cache).
    """
    cfg = self.cfg
    if labels is not None:
      validate_inputs(cfg, None, labels, allow_null_class)
      h = self._class_embed(labels, True)
    else:
      validate_inputs(cfg, tokens, None, allow_null_class)
      h = jnp.take(self.tok_embeddings, tokens, axis=0)
    table = jnp.asarray(npp.rope_2d(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num))
    rope = jax.lax.dynamic_slice_in_dim(table, cache_index, h.shape[1], axis=0)
    return self._trunk(h, rope, True, cache, cache_index)


@functools.cache
def abstract_params(cfg: GPTConfig):
  """Boxed ShapeDtypeStructs of `GPT(cfg)`'s params (with logical axis names); no allocation."""
  model = GPT(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens, labels)["params"]


def param_count(cfg: GPTConfig) -> int:
  """Number of parameters of `GPT(cfg)`, from shapes only (nothing is allocated)."""
  leaves = jax.tree.leaves(nn.unbox(abstract_params(cfg)))
  return int(sum(np.prod(x.shape) for x in leaves))

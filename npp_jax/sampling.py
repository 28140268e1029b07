"""Class-conditional generation: prefill the class token, then a KV-cache `lax.fori_loop`.

Classifier-free guidance runs the conditional rows and the null-class rows as one batch,
combines `u + s * (c - u)`, samples once and feeds the same token to both halves, as
LlamaGen's `generate()` does (guidance only when `cfg_scale > 1`; after decode step
`cfg_interval` the conditional logits are used alone). The guided batch interleaves the
rows (cond 0, null 0, cond 1, null 1, ...), so that when the batch is split over chips
each chip holds both halves of its rows: nothing crosses chips inside the decode loop
(the reference concatenates the halves, which on a mesh puts them on different chips).

`param_sharding(cfg, mesh)` lays the weights out by the mesh's rules (fsdp and tensor
axes), so a model too big for one chip samples over several; `lower` compiles the
sampler from shapes alone (what `python -m npp_jax.aot` checks).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from npp_jax import sharding
from npp_jax.accelerators import hardware
from npp_jax.models.gpt import (
  GPT,
  GPTConfig,
  abstract_params,
  init_cache,
  matmul_weights_in_compute_dtype,
)


def filter_logits(logits: jnp.ndarray, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
  """HF/LlamaGen `top_k_top_p_filtering`: removed entries become -inf.

  top-k keeps the k largest (ties with the k-th kept); top-p keeps the smallest prefix
  of the descending-sorted distribution whose mass exceeds p (always at least one).
  """
  neg_inf = jnp.array(-jnp.inf, logits.dtype)
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cum > top_p
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    inverse = jnp.argsort(order, axis=-1)
    logits = jnp.where(jnp.take_along_axis(remove, inverse, axis=-1), neg_inf, logits)
  return logits


def sample_token(
  key: jax.Array, logits: jnp.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jnp.ndarray:
  """One token per row from (B, V) logits (float32), after temperature and filtering."""
  logits = logits.astype(jnp.float32) / max(temperature, 1e-5)
  if top_k > 0 or top_p < 1.0:
    logits = filter_logits(logits, top_k, top_p)
  if top_k == 1:  # greedy: exact argmax, no randomness
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def guide(logits: jnp.ndarray, cfg_scale: float, use_guidance: Any = True) -> jnp.ndarray:
  """(2B, V) logits of interleaved rows (cond 0, null 0, cond 1, ...) -> (B, V):
  u + s * (c - u), or c alone when not guiding."""
  pairs = logits.reshape(logits.shape[0] // 2, 2, logits.shape[-1])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  guided = uncond + (cond - uncond) * cfg_scale
  return jnp.where(use_guidance, guided, cond)


def validate_request(
  model_config: GPTConfig,
  labels: Any,
  *,
  cfg_scale: float,
  cfg_interval: int,
  temperature: float,
  top_k: int,
  top_p: float,
  mesh: Mesh | None = None,
) -> None:
  """Every bad sampling argument is a ValueError naming the value, before compiling."""
  y = np.asarray(labels)
  if y.ndim != 1 or y.size == 0:
    raise ValueError(f"labels must be a non-empty (batch,) array, got shape {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}.")
  if y.min() < 0 or y.max() >= model_config.num_classes:
    bad = int(y[(y < 0) | (y >= model_config.num_classes)][0])
    raise ValueError(f"class label {bad} is outside [0, {model_config.num_classes}).")
  if not cfg_scale >= 0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (1.0 disables guidance).")
  if cfg_scale > 1.0 and not model_config.has_null_class:
    raise ValueError(
      f"cfg_scale={cfg_scale} needs the null-class embedding, but this model has "
      "class_dropout_prob=0 (no null row); sample with cfg_scale=1."
    )
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0.")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1.0 disables it).")
  if not 0 <= top_k <= model_config.vocab_size:
    raise ValueError(
      f"top_k={top_k} must be in [0, vocab_size={model_config.vocab_size}] (0 disables it)."
    )
  if cfg_interval < -1:
    raise ValueError(f"cfg_interval={cfg_interval} must be >= -1 (-1: guide every step).")
  if mesh is not None:
    n = sharding.data_parallel_size(mesh)
    if y.size % n:
      raise ValueError(
        f"a batch of {y.size} labels does not divide over the {n} data-parallel devices; "
        f"use a multiple of {n}."
      )


@functools.partial(
  jax.jit,
  static_argnames=("model_config", "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p"),
)
def _generate(
  params,
  labels,
  key,
  *,
  model_config: GPTConfig,
  cfg_scale: float,
  cfg_interval: int,
  temperature: float,
  top_k: int,
  top_p: float,
):
  model = GPT(model_config)
  # Cast before the loop: otherwise every token step casts every weight again.
  params = matmul_weights_in_compute_dtype(params, model_config)
  guided = cfg_scale > 1.0
  b, n = labels.shape[0], model_config.seq_len
  # Interleaved (cond, null) pairs: row 2i is label i, row 2i + 1 its null class.
  cond = (
    jnp.stack([labels, jnp.full_like(labels, model_config.num_classes)], axis=1).reshape(-1)
    if guided
    else labels
  )
  cache = init_cache(model_config, cond.shape[0], model_config.cls_token_num + n)
  pick = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)

  logits, cache = model.apply({"params": params}, None, cond, cache, 0, method=GPT.decode)
  logits = logits[:, -1]
  first = pick(jax.random.fold_in(key, 0), guide(logits, cfg_scale) if guided else logits)
  tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first)

  def body(i, carry):
    tokens, last, cache = carry
    x = jnp.repeat(last, 2) if guided else last
    logits, cache = model.apply({"params": params}, x[:, None], None, cache, i, method=GPT.decode)
    logits = logits[:, -1]
    if guided:
      # Decode step j = i - 1 guides unless cfg_interval > -1 and j > cfg_interval.
      on = (cfg_interval <= -1) | (i - 1 <= cfg_interval)
      logits = guide(logits, cfg_scale, on)
    tok = pick(jax.random.fold_in(key, i), logits)
    return tokens.at[:, i].set(tok), tok, cache

  tokens, _, _ = jax.lax.fori_loop(1, n, body, (tokens, first, cache))
  return tokens


def sampling_mesh(spec: dict, model_config: GPTConfig, devices=None) -> Mesh:
  """The mesh to sample on: data-parallel over as many devices as the weights allow.

  The weights and their compute-dtype copy are split over the fewest `tensor` devices
  (heads, MLP and vocabulary; within one host) that bring them to at most half a chip, and
  the rows over the rest: the decode loop then all-reduces activations within a tensor
  group, where FSDP would all-gather every layer at every token step (GPT-3B on v5e:4x4:
  an estimated 1.8 s per batch of 128 against 18 s). Devices of unknown memory (CPUs), or
  a model no split brings to half a chip, use `spec`, the config's mesh."""
  devices = list(devices if devices is not None else jax.devices())
  memory = hardware.memory_bytes(devices[0])
  if memory is None:
    return sharding.make_mesh(spec, devices)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract_params(model_config))))
  weights = n * (model_config.storage_dtype.itemsize + model_config.compute_dtype.itemsize)
  per_host = sum(d.process_index == devices[0].process_index for d in devices)
  for t in range(1, per_host + 1):
    if per_host % t or len(devices) % t or not _splits_over(model_config, t):
      continue
    if weights / t <= memory / 2:
      return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": t}, devices)
  return sharding.make_mesh(spec, devices)


def _splits_over(cfg: GPTConfig, t: int) -> bool:
  """Whether the axes the `tensor` mesh axis splits divide evenly by `t`."""
  sizes = (cfg.n_head, cfg.kv_heads, cfg.ffn_hidden, cfg.vocab_size)
  return all(size % t == 0 for size in sizes)


def param_sharding(model_config: GPTConfig, mesh: Mesh) -> Any:
  """NamedShardings of the GPT params by the mesh's logical rules (fsdp, tensor)."""
  return sharding.logical_sharding(abstract_params(model_config), mesh)


def sampler_settings(
  *, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0
) -> dict[str, Any]:
  """The static sampler settings `_generate` is compiled for, normalised."""
  return dict(
    cfg_scale=float(cfg_scale),
    cfg_interval=int(cfg_interval),
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
  )


def lower(model_config: GPTConfig, mesh: Mesh, batch: int, **settings) -> jax.stages.Lowered:
  """The sampler for `batch` labels on `mesh`, traced from shapes alone (params laid out
  by `param_sharding`, in `model_config.param_dtype`)."""
  shardings = param_sharding(model_config, mesh)
  params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nn.unbox(abstract_params(model_config)),
    shardings,
  )
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  with sharding.activation_sharding(mesh):
    return _generate.lower(
      params, labels, key, model_config=model_config, **sampler_settings(**settings)
    )


def generate(
  params: Any,
  model_config: GPTConfig,
  labels: Any,
  rng: jax.Array,
  *,
  cfg_scale: float = 1.0,
  cfg_interval: int = -1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  mesh: Mesh | None = None,
) -> jax.Array:
  """Samples `grid*grid` image tokens per label.

  Args:
    params: GPT params (float32 or bf16 arrays; sharded or not).
    model_config: the model config.
    labels: (B,) class ids in [0, num_classes).
    rng: a PRNG key; the same key, labels and settings give the same tokens.
    cfg_scale: guidance scale; > 1 runs the null-class rows alongside.
    cfg_interval: stop guiding after this decode step (-1: guide throughout).
    temperature, top_k, top_p: sampling filters (top_k 0 and top_p 1.0 are off; top_k=1
      is greedy decoding).
    mesh: when given, the batch is split over its data x fsdp axes.

  Returns:
    (B, grid*grid) int32 tokens. Compiled once per batch shape and settings.
  """
  validate_request(
    model_config,
    labels,
    cfg_scale=cfg_scale,
    cfg_interval=cfg_interval,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    mesh=mesh,
  )
  labels = jnp.asarray(np.asarray(labels, np.int32))
  if mesh is not None:
    labels = jax.device_put(labels, sharding.batch_sharding(mesh))
  settings = sampler_settings(
    cfg_scale=cfg_scale,
    cfg_interval=cfg_interval,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  if mesh is None:
    return _generate(params, labels, rng, model_config=model_config, **settings)
  with sharding.activation_sharding(mesh):  # rows stay split over the data axes
    return _generate(params, labels, rng, model_config=model_config, **settings)

"""Train state, optimizer and the NPP train step (a pure function; `train.py` compiles it)."""

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from npp_jax import npp
from npp_jax.models.gpt import GPT, GPTConfig, matmul_weights_in_compute_dtype


class TrainState(flax.struct.PyTreeNode):
  """Everything a step updates. `ema` is None when EMA is off."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any = None


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: those of rank >= 2 in the reference.

  Per-layer parameters are stacked on a leading "layers" axis, so their reference rank
  is one less than their array rank (RMSNorm weights stay undecayed).
  """

  def rank_ok(path, x):
    stacked = any(getattr(k, "key", None) == "layers" for k in path)
    return x.ndim - int(stacked) >= 2

  return jax.tree_util.tree_map_with_path(rank_ok, params)


def make_optimizer(optim: Any, schedule: Callable) -> optax.GradientTransformation:
  """AdamW (decay on >= 2-D params only) after global-norm clipping, as in the reference."""
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(
    optax.adamw(
      schedule,
      b1=optim.beta1,
      b2=optim.beta2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)


def init_state(
  cfg: GPTConfig, tx: optax.GradientTransformation, key: jax.Array, ema: bool
) -> TrainState:
  """Fresh train state with boxed (logically partitioned) params; see `train.py` for sharding."""
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  params = GPT(cfg).init(key, tokens, labels)["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema=jax.tree.map(lambda x: x, params) if ema else None,
  )


def loss_fn(params, cfg: GPTConfig, tokens, labels, rng, patch_side: int):
  """Patch cross-entropy of one (micro-)batch; `params` as `matmul_weights_in_compute_dtype`
  gives them (the modules' own casts are then no-ops)."""
  logits = GPT(cfg).apply(
    {"params": params},
    tokens,
    labels,
    patch_side=patch_side,
    deterministic=False,
    rngs={"dropout": rng},
  )
  return npp.patch_cross_entropy(logits, tokens, cfg.grid, patch_side)


def ntp_loss(params: Any, batch: dict[str, jax.Array], cfg: GPTConfig) -> jax.Array:
  """Next-token loss (patch side 1, no dropout) of a batch: comparable across NPP stages."""
  params = matmul_weights_in_compute_dtype(params, cfg)
  logits = GPT(cfg).apply({"params": params}, batch["tokens"], batch["label"], patch_side=1)
  return npp.patch_cross_entropy(logits, batch["tokens"], cfg.grid, 1)


def _accumulated(grad_fn: Callable, tokens, labels, rng, k: int, params) -> tuple[Any, Any]:
  """Mean loss and gradient over k micro-batches (rows j*k + i form micro-batch i, so
  every device keeps its own rows), summed in a scan in the parameters' dtype."""
  b = tokens.shape[0]
  micro_tokens = jnp.swapaxes(tokens.reshape(b // k, k, -1), 0, 1)
  micro_labels = jnp.swapaxes(labels.reshape(b // k, k), 0, 1)

  def body(carry, xs):
    loss_sum, grad_sum = carry
    i, t, y = xs
    loss, grads = grad_fn(t, y, jax.random.fold_in(rng, i))
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), _ = jax.lax.scan(
    body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(k), micro_tokens, micro_labels)
  )
  return loss / k, jax.tree.map(lambda g: g / k, grads)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  cfg: GPTConfig,
  tx: optax.GradientTransformation,
  schedule: Callable,
  root_key: jax.Array,
  patch_side: int,
  grad_accum_steps: int = 1,
  ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch {"tokens" (B, grid*grid), "label" (B,)}.

  With `grad_accum_steps` = k the batch is split into k micro-batches (rows j*k + i
  form micro-batch i, which keeps every device's rows local) whose mean gradient is
  applied once: the same update as one step on B, with 1/k of the activation memory.
  """
  rng = jax.random.fold_in(root_key, state.step)
  # With gradients in the compute dtype (`model.grad_dtype=bfloat16`) the matmul weights
  # are cast once per step, not per use, per micro-batch or again when a block is
  # rematerialised; each micro-batch's gradient is cast back to the parameters' dtype
  # before it is summed (the same numbers as casting at every use), but the chips' partial
  # sums are reduced in bf16. By default (float32) each matmul casts its float32 weight
  # where it is used and sums the weight's gradient in float32 (`gpt.weight_matmul`).
  compute_params = (
    matmul_weights_in_compute_dtype(state.params, cfg)
    if jnp.dtype(cfg.grad_dtype) == cfg.compute_dtype
    else state.params
  )

  def grad_fn(t, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(compute_params, cfg, t, y, key, patch_side)
    return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

  tokens, labels = batch["tokens"], batch["label"]
  if grad_accum_steps == 1:
    loss, grads = grad_fn(tokens, labels, rng)
  else:
    loss, grads = _accumulated(grad_fn, tokens, labels, rng, grad_accum_steps, state.params)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    ema = jax.tree.map(lambda e, p: e * ema_decay + (1.0 - ema_decay) * p, ema, params)
  metrics = {"loss": loss, "grad_norm": _global_norm(grads), "lr": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def unboxed(tree: Any) -> Any:
  return nn.unbox(tree)


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

"""Matmul weights cast to bf16 once per train step (with bf16 gradients) and once per
sampled batch: the same numbers as casting at every use, and no weight casts left inside
the decode loop. With float32 gradients (the default) the weight gradients are summed in
float32 and never rounded to bf16."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

from npp_jax import sampling, train_step
from npp_jax.models.gpt import GPT, GPTConfig, init_cache, matmul_weights_in_compute_dtype

CFG = GPTConfig.preset("tiny", dtype="bfloat16", drop_path_rate=0.1, grad_dtype="bfloat16")


@pytest.fixture(scope="module")
def params():
  tokens = jnp.zeros((1, CFG.seq_len), jnp.int32)
  init = GPT(CFG).init(jax.random.key(0), tokens, jnp.zeros((1,), jnp.int32))["params"]
  # Non-zero output head (its init is zeros) so every weight's gradient is non-trivial.
  init["output"] = init["output"].replace_boxed(
    jax.random.normal(jax.random.key(1), init["output"].value.shape) * 0.02
  )
  return nn.unbox(init)


def test_only_matmul_weights_change_dtype(params):
  cast = matmul_weights_in_compute_dtype(params, CFG)
  dtypes = {jax.tree_util.keystr(k): x.dtype for k, x in jax.tree_util.tree_leaves_with_path(cast)}
  bf16 = sorted(k for k, d in dtypes.items() if d == jnp.bfloat16)
  assert bf16 == sorted(
    [f"['layers']['attention']['{w}']" for w in ("wq", "wk", "wv", "wo")]
    + [f"['layers']['feed_forward']['{w}']" for w in ("w1", "w2", "w3")]
    + ["['output']"]
  )
  # Boxed params (with logical axis names) are handled too.
  boxed = GPT(CFG).init(jax.random.key(0), *_inputs())["params"]
  boxed = matmul_weights_in_compute_dtype(boxed, CFG)
  assert boxed["output"].value.dtype == jnp.bfloat16
  assert boxed["tok_embeddings"].value.dtype == jnp.float32


def _inputs(batch=1):
  tokens = jax.random.randint(jax.random.key(2), (batch, CFG.seq_len), 0, CFG.vocab_size)
  return tokens, jnp.arange(batch, dtype=jnp.int32) % CFG.num_classes


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_equals_casting_at_every_use(params, accum, monkeypatch):
  """The step is bit-identical to the same step with the cast-once taken out (float32
  params straight into the model, each weight cast where it is used), with gradient
  accumulation too."""
  tokens, labels = _inputs(batch=4)
  tx = optax.adamw(1e-3, weight_decay=0.05)

  def run():
    state = train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
    )
    step = functools.partial(
      train_step.train_step,
      cfg=CFG,
      tx=tx,
      schedule=lambda s: 1e-3,
      root_key=jax.random.key(3),
      patch_side=2,
      grad_accum_steps=accum,
    )
    return jax.jit(step)(state, {"tokens": tokens, "label": labels})

  once_state, once_metrics = run()
  with monkeypatch.context() as m:
    m.setattr(train_step, "matmul_weights_in_compute_dtype", lambda p, cfg: p)
    per_use_state, per_use_metrics = run()
  for name in ("loss", "grad_norm"):
    assert float(once_metrics[name]) == float(per_use_metrics[name]), name
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(once_state.params),
    jax.tree.leaves(per_use_state.params),
    strict=True,
  ):
    assert a.dtype == jnp.float32, path
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(once_state.params["output"] - params["output"]).max()) > 0


def _grads(params, cfg, tokens, labels):
  def loss(p):
    p = matmul_weights_in_compute_dtype(p, cfg) if cfg.grad_dtype == cfg.dtype else p
    return train_step.loss_fn(p, cfg, tokens, labels, jax.random.key(3), 2)

  return jax.jit(jax.value_and_grad(loss))(params)


def test_float32_weight_gradients(params):
  """`grad_dtype=float32`: the same loss as bf16 gradients (the forward is unchanged), and
  float32 weight gradients that bf16 ones equal up to bf16 rounding."""
  tokens, labels = _inputs(batch=4)
  wide = dataclasses.replace(CFG, grad_dtype="float32")
  loss16, g16 = _grads(params, CFG, tokens, labels)
  loss32, g32 = _grads(params, wide, tokens, labels)
  assert float(loss16) == float(loss32)
  differ = 0
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16), strict=True
  ):
    assert a.dtype == b.dtype == jnp.float32
    a, b = np.asarray(a), np.asarray(b)
    # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of it (the
    # bf16 path also rounds the activations' gradients, hence the looser bound).
    np.testing.assert_allclose(b, a, rtol=2**-5, atol=1e-4 * np.abs(a).max(), err_msg=str(path))
    differ += int(np.any(a != b))
  assert differ >= 8  # every matmul weight's gradient comes out of the float32 path


def test_decode_logits_equal_casting_at_every_use(params):
  _, labels = _inputs(batch=3)
  model = GPT(CFG)

  def prefill(p):
    cache = init_cache(CFG, labels.shape[0])
    return model.apply({"params": p}, None, labels, cache, 0, method=GPT.decode)[0]

  per_use = jax.jit(prefill)(params)
  once = jax.jit(prefill)(matmul_weights_in_compute_dtype(params, CFG))
  np.testing.assert_array_equal(per_use, once)


def _converts_to_bf16(jaxpr, shapes, depth=0, found=None):
  """(loop depth, shape) of every float32 -> bf16 cast of a parameter-shaped value."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if (
      eqn.primitive.name == "convert_element_type"
      and eqn.params["new_dtype"] == jnp.bfloat16
      and eqn.invars[0].aval.dtype == jnp.float32
      and eqn.invars[0].aval.shape in shapes
    ):
      found.append((depth, eqn.invars[0].aval.shape))
    inner = depth + (eqn.primitive.name in ("while", "scan"))
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else [value]:
        if isinstance(sub, jax_core.ClosedJaxpr):
          _converts_to_bf16(sub.jaxpr, shapes, inner, found)
        elif isinstance(sub, jax_core.Jaxpr):
          _converts_to_bf16(sub, shapes, inner, found)
  return found


def test_sampling_casts_each_weight_once_outside_the_decode_loop(params):
  """Casting at use put every weight's cast inside the token loop (so every token step
  re-read the float32 weights); now the eight matmul weights are cast once, before it."""
  shapes = {x.shape for x in jax.tree.leaves(params)}
  shapes |= {x.shape[1:] for x in jax.tree.leaves(params["layers"])}  # one layer's slice
  generate = functools.partial(
    sampling._generate,
    labels=jnp.arange(4, dtype=jnp.int32),
    key=jax.random.key(1),
    model_config=CFG,
    cfg_scale=2.0,
    cfg_interval=-1,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
  )
  casts = _converts_to_bf16(jax.make_jaxpr(generate)(params).jaxpr, shapes)
  cast = matmul_weights_in_compute_dtype(params, CFG)
  once = [
    (0, x.shape)  # loop depth 0: before the decode loop
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(cast), strict=True)
    if y.dtype != x.dtype
  ]
  assert len(once) == 8 and sorted(casts) == sorted(once), casts


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_loss_and_gradients(params, remat):
  """Rematerialised blocks (model.remat) train: the same loss and (up to float error)
  the same gradients as stored activations, with dropout and stochastic depth on."""
  tokens, labels = _inputs(batch=4)
  loss0, g0 = _grads(params, CFG, tokens, labels)
  loss1, g1 = _grads(params, dataclasses.replace(CFG, remat=remat), tokens, labels)
  assert float(loss1) == pytest.approx(float(loss0), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-6)

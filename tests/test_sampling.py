"""Sampling: golden greedy parity, filters vs NumPy, distribution (chi-square), guidance, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from npp_jax import sampling, sharding
from npp_jax.infra import torch_io
from npp_jax.models import gpt, gpt_torch
from npp_jax.models.gpt import GPT, GPTConfig

TINY = GPTConfig.preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def params(golden_dir):
  sd = torch_io.load_torch_checkpoint(str(golden_dir / "gpt_tiny_weights.npz"))
  return jax.tree.map(jnp.asarray, gpt_torch.params_from_torch(sd, TINY))


@pytest.mark.parametrize("scale,key", [(1.0, "greedy_tokens_cfg1"), (2.0, "greedy_tokens_cfg2")])
def test_greedy_tokens_match_golden(params, gpt_io, scale, key):
  tokens = sampling.generate(
    params, TINY, gpt_io["cond"], jax.random.key(0), cfg_scale=scale, top_k=1
  )
  np.testing.assert_array_equal(np.asarray(tokens), gpt_io[key])


def python_reference(params, cfg, labels, scale, cfg_interval):
  """LlamaGen's generate() step by step in Python (greedy), via the model's decode method."""
  model = GPT(cfg)
  labels = np.asarray(labels)
  guided = scale > 1.0
  cond = np.concatenate([labels, np.full_like(labels, cfg.num_classes)]) if guided else labels
  cache = gpt.init_cache(cfg, len(cond))
  logits, cache = model.apply(
    {"params": params}, None, jnp.asarray(cond), cache, 0, method=GPT.decode
  )

  def combine(lg, flag):
    lg = np.asarray(lg[:, -1])
    if not guided:
      return lg
    c, u = np.split(lg, 2)
    return u + (c - u) * scale if flag else c

  step = jax.jit(lambda c, x, i: model.apply({"params": params}, x, None, c, i, method=GPT.decode))
  tok = combine(logits, True).argmax(-1)
  out = [tok]
  flag = True
  for i in range(cfg.seq_len - 1):
    if cfg_interval > -1 and i > cfg_interval:
      flag = False
    x = np.concatenate([tok, tok]) if guided else tok
    logits, cache = step(cache, jnp.asarray(x[:, None]), i + 1)
    tok = combine(logits, flag).argmax(-1)
    out.append(tok)
  return np.stack(out, axis=1)


@pytest.mark.parametrize("interval", [-1, 0, 5])
def test_cfg_interval_matches_python_reference(params, gpt_io, interval):
  want = python_reference(params, TINY, gpt_io["cond"], 3.0, interval)
  got = sampling.generate(
    params, TINY, gpt_io["cond"], jax.random.key(0), cfg_scale=3.0, cfg_interval=interval, top_k=1
  )
  np.testing.assert_array_equal(np.asarray(got), want)


def np_filter(logits, top_k, top_p):
  out = logits.astype(np.float64).copy()
  for row in out:
    if top_k > 0:
      kth = np.sort(row)[::-1][top_k - 1]
      row[row < kth] = -np.inf
    if top_p < 1.0:
      order = np.argsort(-row, kind="stable")
      p = np.exp(row[order] - row[order].max())
      p /= p.sum()
      cum = np.cumsum(p)
      remove = np.concatenate([[False], cum[:-1] > top_p])
      row[order[remove]] = -np.inf
  return out


@pytest.mark.parametrize(
  "top_k,top_p", [(0, 1.0), (5, 1.0), (1, 1.0), (0, 0.9), (0, 0.3), (10, 0.8), (64, 0.5)]
)
def test_filters_match_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).standard_normal((6, 64)).astype(np.float32) * 3
  got = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
  want = np_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  kept = ~np.isinf(want)
  np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
  assert kept.sum(axis=1).min() >= 1


def _chi_square(counts, probs):
  expected = probs * counts.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 1.0), (1.3, 0, 0.8)])
def test_sampled_frequencies_follow_the_model(params, temperature, top_k, top_p):
  """4,000 samples of the first two tokens against the model's (filtered) distributions.
  The model draws 2x2-token images: 4 tokens a row, not 64, and the first two as before."""
  cfg = dataclasses.replace(TINY, grid=2)
  n = 4000
  labels = np.full(n, 3)
  tokens = np.asarray(
    sampling.generate(
      params, cfg, labels, jax.random.key(7), temperature=temperature, top_k=top_k, top_p=top_p
    )
  )
  model = GPT(cfg)
  cache = gpt.init_cache(cfg, 1)
  first, cache = model.apply({"params": params}, None, jnp.array([3]), cache, 0, method=GPT.decode)

  def dist(lg):
    lg = sampling.filter_logits(lg.astype(jnp.float32) / temperature, top_k, top_p)
    return np.asarray(jax.nn.softmax(lg, axis=-1), np.float64)[0]

  p1 = dist(first[:, -1])
  assert _chi_square(np.bincount(tokens[:, 0], minlength=64), p1) > 1e-3
  # The second token given the most frequent first token.
  t0 = int(np.bincount(tokens[:, 0]).argmax())
  rows = tokens[tokens[:, 0] == t0]
  second, _ = model.apply({"params": params}, jnp.array([[t0]]), None, cache, 1, method=GPT.decode)
  assert len(rows) > 300
  assert _chi_square(np.bincount(rows[:, 1], minlength=64), dist(second[:, -1])) > 1e-3
  if top_k:
    assert len(np.unique(tokens[:, 0])) <= top_k


@pytest.mark.parametrize(
  "spec", [{"data": 4, "fsdp": 2, "tensor": 1}, {"data": 2, "fsdp": 1, "tensor": 4}]
)
def test_sharded_generation_equals_single_device(params, gpt_io, spec):
  """FSDP, and tensor parallelism (heads, MLP and vocabulary split over 4 devices, as
  `sampling_mesh` lays out models too large for one chip), sample what one device does."""
  mesh = sharding.make_mesh(spec)
  labels = np.array([5, 3, 9, 0, 1, 2, 7, 8])
  one = sampling.generate(params, TINY, labels, jax.random.key(1), cfg_scale=2.0)
  laid_out = jax.device_put(params, sampling.param_sharding(TINY, mesh))
  if spec["tensor"] > 1:
    assert tuple(laid_out["output"].sharding.spec) == ("fsdp", "tensor")
  many = sampling.generate(laid_out, TINY, labels, jax.random.key(1), cfg_scale=2.0, mesh=mesh)
  assert len(many.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(one), np.asarray(many))
  assert not np.array_equal(
    np.asarray(one), sampling.generate(params, TINY, labels, jax.random.key(2), cfg_scale=2.0)
  )


def test_bad_requests(params):
  gen = lambda labels=(1, 2), **kw: sampling.generate(
    params, TINY, np.array(labels), jax.random.key(0), **kw
  )
  with pytest.raises(ValueError, match=r"class label 10 is outside \[0, 10\)"):
    gen((1, 10))
  with pytest.raises(ValueError, match=r"class label -1"):
    gen((-1, 2))
  with pytest.raises(ValueError, match="cfg_scale=-1.0 must be >= 0"):
    gen(cfg_scale=-1.0)
  with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
    gen(top_p=0.0)
  with pytest.raises(ValueError, match=r"top_p=1.5"):
    gen(top_p=1.5)
  with pytest.raises(ValueError, match=r"top_k=65 must be in \[0, vocab_size=64\]"):
    gen(top_k=65)
  with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
    gen(temperature=0.0)
  mesh = sharding.make_mesh({"data": -1})
  with pytest.raises(ValueError, match="batch of 3 labels does not divide over the 8"):
    gen((1, 2, 3), mesh=mesh)
  no_null = dataclasses.replace(TINY, class_dropout_prob=0.0)
  with pytest.raises(ValueError, match="needs the null-class embedding"):
    sampling.generate(params, no_null, np.array([1]), jax.random.key(0), cfg_scale=2.0)

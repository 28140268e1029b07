"""npp.py: patch ops against a NumPy reference, RoPE and lr schedule against the golden files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import npp


def np_patch_average(x, grid, s):
  b, _, d = x.shape
  g = grid // s
  out = np.zeros((b, g * g, d), np.float64)
  for pi in range(g):
    for pj in range(g):
      rows = [(pi * s + a) * grid + pj * s + c for a in range(s) for c in range(s)]
      out[:, pi * g + pj] = x[:, rows].mean(axis=1)
  return out


def np_patch_ce(logits, tokens, grid, s):
  b, n, v = logits.shape
  g = grid // s
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  total, count = 0.0, 0
  for i in range(b):
    for pi in range(g):
      for pj in range(g):
        for a in range(s):
          for c in range(s):
            tok = tokens[i, (pi * s + a) * grid + pj * s + c]
            total -= logp[i, pi * g + pj, tok]
            count += 1
  return total / count


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_patch_average_matches_numpy(s):
  x = np.random.default_rng(s).standard_normal((3, 256, 5)).astype(np.float32)
  got = np.asarray(jax.jit(npp.patch_average, static_argnums=(1, 2))(jnp.asarray(x), 16, s))
  np.testing.assert_allclose(
    got, np_patch_average(x.astype(np.float64), 16, s), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_patch_cross_entropy_matches_numpy(s):
  rng = np.random.default_rng(10 + s)
  n = (16 // s) ** 2
  logits = (3 * rng.standard_normal((2, n, 11))).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 256))
  fn = jax.jit(npp.patch_cross_entropy, static_argnums=(2, 3))
  got = float(fn(jnp.asarray(logits), jnp.asarray(tokens), 16, s))
  np.testing.assert_allclose(got, np_patch_ce(logits.astype(np.float64), tokens, 16, s), rtol=1e-6)


def test_patch_cross_entropy_is_plain_ce_at_side_1():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 64, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, (2, 64))
  import optax

  want = optax.softmax_cross_entropy_with_integer_labels(
    jnp.asarray(logits), jnp.asarray(tokens)
  ).mean()
  got = npp.patch_cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), 8, 1)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_patch_order_is_raster_over_patch_grid():
  # Token value = its (row, col) so we can read which block each patch averaged.
  grid, s = 4, 2
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  x = np.stack([rows, cols], -1).reshape(1, grid * grid, 2).astype(np.float32)
  got = np.asarray(npp.patch_average(jnp.asarray(x), grid, s))[0]
  np.testing.assert_allclose(got, [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]])


@pytest.mark.parametrize("g", [2, 4, 8])
def test_rope_table_matches_golden(gpt_io, g):
  got = npp.rope_2d(g, 16, 10000, 1)
  want = gpt_io[f"rope_grid{g}"]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert not got[0].any(), "the class position must be all zeros"


def test_lr_schedule_matches_golden(gpt_io):
  sched = npp.npp_lr_schedule(
    1e-4, 1e-5, steps_per_epoch=5, stage_end_epochs=[3, 6, 12], warmup_epochs=1, decay_ratio=0.2
  )
  want = gpt_io["lr_schedule"]
  t = np.arange(len(want))
  np.testing.assert_allclose(sched.numpy(t), want, rtol=0, atol=1e-12)
  # The optax (float32, jit) path gives the same schedule to float32 precision.
  got32 = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(t)))
  np.testing.assert_allclose(got32, want, rtol=1e-6, atol=1e-12)


def test_stage_schedule():
  assert npp.patch_sides(1) == [1]
  assert npp.patch_sides(2) == [2, 1]
  assert npp.patch_sides(3) == [4, 2, 1]
  assert npp.patch_sides(4) == [8, 4, 2, 1]
  assert npp.stage_boundaries(300, 3, 0.5) == [75, 150, 300]
  assert npp.stage_boundaries(300, 1, 0.5) == [300]
  assert npp.stage_boundaries(12, 3, 0.5) == [3, 6, 12]
  assert [npp.stage_of_step(t, 5, [3, 6, 12]) for t in (0, 14, 15, 29, 30, 59)] == [
    0,
    0,
    1,
    1,
    2,
    2,
  ]


def test_bad_schedule_arguments():
  with pytest.raises(ValueError, match="patch_level"):
    npp.patch_sides(5)
  with pytest.raises(ValueError, match="epoch_rate"):
    npp.stage_boundaries(300, 3, 1.5)
  with pytest.raises(ValueError, match="no epochs"):
    npp.stage_boundaries(2, 4, 0.5)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    npp.npp_lr_schedule(1e-4, 1e-5, 0, [1])


def test_patch_side_must_divide_grid():
  x = jnp.zeros((1, 256, 4))
  with pytest.raises(ValueError, match="patch_side=3 does not divide the token grid 16x16"):
    npp.patch_average(x, 16, 3)
  with pytest.raises(ValueError, match="patch_side=3"):
    npp.patch_cross_entropy(jnp.zeros((1, 25, 4)), jnp.zeros((1, 256), jnp.int32), 16, 3)

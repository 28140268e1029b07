"""Next Patch Prediction: patch grouping, patch cross-entropy, RoPE, stage and lr schedules.

Pure functions only: no model, no data. Everything here is jit-able (the schedule
helpers take Python numbers and return Python values or an optax schedule).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_patch_side(grid: int, patch_side: int) -> None:
  """Raises ValueError unless `patch_side` is a positive divisor of `grid`."""
  if not isinstance(patch_side, (int, np.integer)) or patch_side < 1:
    raise ValueError(f"patch_side must be a positive int, got {patch_side!r}.")
  if grid % patch_side:
    raise ValueError(
      f"patch_side={patch_side} does not divide the token grid {grid}x{grid}; "
      f"use a divisor of {grid} (e.g. one of {[d for d in (1, 2, 4, 8, 16) if grid % d == 0]})."
    )


def patchify(x: jnp.ndarray, grid: int, patch_side: int) -> jnp.ndarray:
  """Groups a raster sequence into s x s patches.

  Args:
    x: (B, grid*grid, ...) values in raster order.
    grid: tokens per image side.
    patch_side: s.

  Returns:
    (B, (grid/s)^2, s*s, ...): patches in raster order over the (grid/s)^2 patch
    grid; inside a patch, raster order.
  """
  check_patch_side(grid, patch_side)
  b, n = x.shape[:2]
  if n != grid * grid:
    raise ValueError(f"expected {grid * grid} = {grid}x{grid} positions, got {n}.")
  g, s = grid // patch_side, patch_side
  rest = x.shape[2:]
  x = x.reshape(b, g, s, g, s, *rest)
  x = jnp.swapaxes(x, 2, 3)  # (B, g, g, s, s, ...)
  return x.reshape(b, g * g, s * s, *rest)


def patch_average(x: jnp.ndarray, grid: int, patch_side: int) -> jnp.ndarray:
  """Averages each non-overlapping s x s block of token embeddings.

  Args:
    x: (B, grid*grid, D) token embeddings in raster order.
    grid: tokens per image side.
    patch_side: s; 1 returns `x` unchanged.

  Returns:
    (B, (grid/s)^2, D) patch embeddings, raster order over the patch grid.
  """
  if patch_side == 1:
    check_patch_side(grid, patch_side)
    return x
  return patchify(x, grid, patch_side).mean(axis=2)


def patch_cross_entropy(
  logits: jnp.ndarray, tokens: jnp.ndarray, grid: int, patch_side: int
) -> jnp.ndarray:
  """The NPP loss: mean over tokens of -log p_patch(token), p_patch from that patch's logits.

  Args:
    logits: (B, (grid/s)^2, V); position i scores patch i.
    tokens: (B, grid*grid) int token ids in raster order.
    grid: tokens per image side.
    patch_side: s; 1 gives plain next-token cross-entropy.

  Returns:
    Scalar float32 loss, averaged over the s*s tokens of each patch, all patches and
    the batch (all patches hold the same number of tokens, so this is the mean over
    every token of the batch).
  """
  targets = patchify(tokens, grid, patch_side)  # (B, n, s*s)
  if logits.shape[:2] != targets.shape[:2]:
    raise ValueError(
      f"logits {logits.shape} do not fit {targets.shape[1]} patches of side {patch_side} "
      f"on a {grid}x{grid} grid."
    )
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets.astype(jnp.int32), axis=-1)
  return -picked.mean()


def rope_2d(grid: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> np.ndarray:
  """LlamaGen's 2D rotary table (`precompute_freqs_cis_2d`).

  The head dimension is split in halves: the first half rotates with the row index,
  the second with the column index. The first `cls_token_num` rows are all zeros
  (cos = sin = 0): the reference multiplies the class token's query and key to zero.

  Returns:
    float32 array (cls_token_num + grid*grid, head_dim // 2, 2) of (cos, sin), for
    rotation of adjacent pairs (x[2i], x[2i+1]).
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}.")
  half = head_dim // 2
  freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float64) / half))
  t = np.arange(grid, dtype=np.float64)
  f = np.outer(t, freqs)  # (grid, half // 2)
  rows = np.broadcast_to(f[:, None, :], (grid, grid, f.shape[1]))
  cols = np.broadcast_to(f[None, :, :], (grid, grid, f.shape[1]))
  ang = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, half)
  table = np.stack([np.cos(ang), np.sin(ang)], axis=-1)
  cls = np.zeros((cls_token_num, half, 2))
  return np.concatenate([cls, table]).astype(np.float32)


def patch_sides(patch_level: int) -> list[int]:
  """Patch sides of the coarse-to-fine schedule: L=3 -> [4, 2, 1]."""
  if patch_level not in (1, 2, 3, 4):
    raise ValueError(f"patch_level must be 1, 2, 3 or 4, got {patch_level!r}.")
  return [2 ** (patch_level - 1 - k) for k in range(patch_level)]


def stage_boundaries(epochs: int, patch_level: int, epoch_rate: float) -> list[int]:
  """End epoch of each stage: int(E * rate ** (L-1-k)); E=300, L=3, rate .5 -> [75, 150, 300]."""
  if not 0.0 < epoch_rate <= 1.0:
    raise ValueError(f"epoch_rate must be in (0, 1], got {epoch_rate!r}.")
  ends = [
    int(epochs * epoch_rate ** (patch_level - 1 - k)) for k in range(len(patch_sides(patch_level)))
  ]
  if any(b <= a for a, b in zip([0] + ends[:-1], ends, strict=True)):
    raise ValueError(
      f"epochs={epochs} with patch_level={patch_level} and epoch_rate={epoch_rate} gives "
      f"stage ends {ends}: some stage has no epochs. Train longer or raise epoch_rate."
    )
  return ends


def _stage_lr(
  xp, t, num_steps: int, base_lr: float, end_lr: float, warmup_steps: int, decay_ratio: float
):
  """One stage of the reference scheduler in array module `xp` (numpy or jax.numpy)."""
  decay_steps = int(num_steps * decay_ratio)
  decay_start = num_steps - decay_steps
  warm = base_lr * t / max(warmup_steps, 1)
  decay = base_lr - (base_lr - end_lr) * (t - decay_start) / max(decay_steps, 1)
  lr = xp.where(t < warmup_steps, warm, base_lr)
  if decay_steps > 0:
    lr = xp.where(t >= decay_start, decay, lr)
  return lr


class NPPLRSchedule:
  """Per-stage learning rate of the reference `--scheduler`, as a function of the global step.

  Each stage (ending at `stage_end_epochs[k]`) restarts a linear warmup of
  int(warmup_epochs * steps_per_epoch) steps from 0, holds `base_lr`, then decays
  linearly over its last int(stage_steps * decay_ratio) steps from `base_lr` towards
  `end_lr`. Past the last stage it holds the last stage's formula.

  Calling it with a jax value gives a jit-able optax schedule (float32); `numpy(step)`
  evaluates the same formula in float64 on the host.
  """

  def __init__(
    self,
    base_lr: float,
    end_lr: float,
    steps_per_epoch: int,
    stage_end_epochs: Sequence[int],
    warmup_epochs: float = 1.0,
    decay_ratio: float = 0.2,
  ):
    if steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
    if not 0.0 <= decay_ratio <= 1.0:
      raise ValueError(f"decay_ratio must be in [0, 1], got {decay_ratio}.")
    self.base_lr, self.end_lr, self.decay_ratio = float(base_lr), float(end_lr), float(decay_ratio)
    self.warmup_steps = int(warmup_epochs * steps_per_epoch)
    self.bounds = [0] + [int(e) * steps_per_epoch for e in stage_end_epochs]

  def _eval(self, xp, step):
    lr = xp.zeros_like(step * 1.0)
    for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True):
      last = b == self.bounds[-1]
      inside = (step >= a) if last else (step >= a) & (step < b)
      stage = _stage_lr(
        xp, step - a, b - a, self.base_lr, self.end_lr, self.warmup_steps, self.decay_ratio
      )
      lr = xp.where(inside, stage, lr)
    return lr

  def __call__(self, step) -> jnp.ndarray:
    return self._eval(jnp, jnp.asarray(step))

  def numpy(self, step) -> np.ndarray:
    return self._eval(np, np.asarray(step, dtype=np.float64))


def npp_lr_schedule(
  base_lr: float,
  end_lr: float,
  steps_per_epoch: int,
  stage_end_epochs: Sequence[int],
  warmup_epochs: float = 1.0,
  decay_ratio: float = 0.2,
) -> NPPLRSchedule:
  """The per-stage schedule as an optax-compatible callable (see `NPPLRSchedule`)."""
  return NPPLRSchedule(
    base_lr, end_lr, steps_per_epoch, stage_end_epochs, warmup_epochs, decay_ratio
  )


def stage_of_step(step: int, steps_per_epoch: int, stage_end_epochs: Sequence[int]) -> int:
  """Index of the stage that global step `step` belongs to (the last one past the end)."""
  for k, end in enumerate(stage_end_epochs):
    if step < end * steps_per_epoch:
      return k
  return len(stage_end_epochs) - 1

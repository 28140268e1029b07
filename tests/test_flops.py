"""FLOP accounting against a hand count, and the held-out loss against a direct computation."""

import jax
import numpy as np
import pytest

from npp_jax.jobs import train
from npp_jax.models import gpt_flops
from npp_jax.models.gpt import GPT, GPTConfig

from .helpers import read_metrics, tiny_config, write_random_dataset

TINY = GPTConfig.preset("tiny", dtype="float32")  # dim 64, 2 layers, 4 heads, vocab 64, 8x8


def test_train_step_flops_match_a_hand_count():
  # Per token and layer: qkv 64*(4+4+4)*16 + wo 4*16*64 + FFN 3*64*256 = 65,536 weights;
  # two layers plus the 64x64 head: 135,168 multiply-adds, 2 FLOPs each.
  assert gpt_flops.matmul_params_per_token(TINY) == 135_168
  # Attention per layer: scores and values, 2 * 2 * T^2 * 4 heads * 16 dims = 256 T^2.
  for side, seq, want in (
    (1, 64, 3 * 2 * (2 * 64 * 135_168 + 2 * 256 * 64**2)),
    (2, 16, 3 * 2 * (2 * 16 * 135_168 + 2 * 256 * 16**2)),
    (4, 4, 3 * 2 * (2 * 4 * 135_168 + 2 * 256 * 4**2)),
  ):
    assert gpt_flops.train_seq_len(TINY, side) == seq
    assert gpt_flops.train_step_flops(TINY, side, batch=2) == want
  assert gpt_flops.train_step_flops(TINY, 1, 2) == 116_391_936
  # One decoding step against the whole 65-entry cache.
  assert gpt_flops.decode_step_flops(TINY, batch=1) == 2 * 135_168 + 2 * 256 * 65


def test_heldout_loss_flops_and_seconds_in_the_metrics(tmp_path):
  data, held = tmp_path / "data", tmp_path / "held"
  write_random_dataset(data, n=96)
  write_random_dataset(held, n=40, seed=7)
  settings = {
    "train.max_steps": 8,
    "train.eval_every_steps": 4,
    "train.eval_batches": 2,
    "train.log_every_steps": 3,
    "data.eval_path": str(held),
  }
  summary = train.run(tiny_config(data, **settings), str(tmp_path / "wd"))
  cfg = summary["cfg"]
  rows = {r["step"]: r for r in read_metrics(tmp_path / "wd")}
  assert sorted(rows) == [3, 4, 6, 8]  # log steps 3, 6, 8 (the end); eval steps 4, 8
  assert "eval/ntp_loss" in rows[4] and "loss" not in rows[4] and "loss" in rows[3]
  plan = summary["plan"]
  flops = [gpt_flops.train_step_flops(cfg, s, 16) for s in (4, 2, 1)]
  assert rows[8]["train_flops"] == 6 * flops[0] + 2 * flops[1] == plan.flops_until(8)
  seconds = [rows[s]["train_seconds"] for s in sorted(rows)]
  assert all(b > a > 0 for a, b in zip(seconds, seconds[1:], strict=False))
  # The held-out loss is the plain next-token loss of the first 2 x 16 held-out records.
  from npp_jax.data import pipeline

  src = pipeline.TokenSource(str(held), 64, 10, 8)
  tokens = np.stack([src[i]["codes"][0] for i in range(32)])
  labels = np.array([src[i]["label"] for i in range(32)])
  params = jax.device_get(summary["state"].params)
  logits = np.asarray(GPT(cfg).apply({"params": params}, tokens, labels), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, tokens[..., None], -1).mean()
  assert rows[8]["eval/ntp_loss"] == pytest.approx(want, rel=1e-5)
  # A resumed run carries the training time on.
  train.run(tiny_config(data, **{**settings, "train.max_steps": 10}), str(tmp_path / "wd"))
  rows = {r["step"]: r for r in read_metrics(tmp_path / "wd")}
  assert rows[10]["train_seconds"] > rows[8]["train_seconds"]

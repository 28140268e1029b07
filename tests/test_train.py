"""The trainer: sharding, one compile per stage, stage schedule, accumulation, checkpoints."""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from npp_jax import config_lib, sharding, train_step
from npp_jax.infra import torch_io
from npp_jax.jobs import train
from npp_jax.models import gpt_torch, params_io
from npp_jax.models.gpt import GPTConfig

from .helpers import tiny_config, write_random_dataset


@pytest.fixture()
def data_dir(tmp_path):
  d = tmp_path / "data"
  write_random_dataset(d, n=96)
  return d


class CompileCounter:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


_COUNTER = CompileCounter()


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("data,fsdp,tensor", [(4, 2, 1), (2, 2, 2)])
def test_sharded_step_equals_unsharded(data_dir, tmp_path, data, fsdp, tensor):
  """One step on a data x FSDP mesh, and on one that also splits heads, MLP and vocabulary
  over `tensor`, equals the step on one device."""
  c = tiny_config(data_dir)
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  trainer = train.Trainer(c, str(tmp_path / "wd"))
  assert dict(trainer.mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
  state = trainer.fresh_state()
  emb = state.params["tok_embeddings"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert len(emb.addressable_shards) == 8
  assert emb.addressable_shards[0].data.shape == (64 // tensor, 32 // fsdp)
  wq = state.params["layers"]["attention"]["wq"]  # (layers, dim, heads, head_dim)
  assert wq.addressable_shards[0].data.shape[2] == 2 // tensor
  batch = trainer.global_batch(next(trainer.data_iter))
  assert len({str(s.index) for s in batch["tokens"].addressable_shards}) == data * fsdp
  host_state, host_batch = jax.device_get(state), jax.device_get(batch)

  ref = jax.jit(
    functools.partial(
      train_step.train_step,
      cfg=trainer.cfg,
      tx=trainer.tx,
      schedule=trainer.schedule,
      root_key=trainer.root_key,
      patch_side=2,
    )
  )
  want_state, want_m = ref(host_state, host_batch)
  # The trainer traces under the activation rules: the residual stream and the logits are
  # constrained to the batch split (data x fsdp); without the rules they are not.
  with sharding.activation_sharding(trainer.mesh):
    text = ref.lower(state, batch).as_text()
  assert text.count("sharding_constraint") >= 4 and '[{"data", "fsdp"}, {}, {}]' in text
  assert "sharding_constraint" not in ref.lower(state, batch).as_text()
  got_state, got_m = trainer.step(2, state, batch)
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    jax.device_get(got_state.params),
    jax.device_get(want_state.params),
  )


def test_one_compile_per_stage_and_stage_switches(data_dir, tmp_path, caplog):
  c = tiny_config(data_dir)  # 96 records / batch 16 = 6 steps per epoch; stages end at 1, 2, 4
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING, logger="jax"):
      summary = train.run(c, str(tmp_path / "a"))
      c2 = tiny_config(data_dir, **{"train.epochs": 8})
      summary2 = train.run(c2, str(tmp_path / "b"))
  finally:
    jax.config.update("jax_log_compiles", False)
  step_compiles = [
    r for r in caplog.records if "Finished XLA compilation of jit(train_step)" in r.getMessage()
  ]
  assert len(step_compiles) == 6, "3 stages x 2 runs: one compilation per stage, none per step"
  assert [e["patch_side"] for e in summary["compile_log"]] == [4, 2, 1]
  assert [e["patch_side"] for e in summary2["compile_log"]] == [4, 2, 1]
  assert summary["step"] == 24 and summary2["step"] == 48
  rows = read_metrics(tmp_path / "a")
  assert [r["step"] for r in rows] == list(range(1, 25))
  sides = [r["patch_side"] for r in rows]
  assert sides == [4] * 6 + [2] * 6 + [1] * 12
  lrs = [r["lr"] for r in rows]
  assert lrs[0] == 0.0 and lrs[6] == 0.0 and lrs[12] == 0.0, "warmup restarts every stage"
  assert np.isfinite([r["loss"] for r in rows]).all()
  for key in ("grad_norm", "steps_per_sec", "images_per_sec", "tokens_per_sec", "eta_sec"):
    assert key in rows[-1]
  assert os.listdir(tmp_path / "a" / "tensorboard")
  ckpts = sorted(int(x) for x in os.listdir(tmp_path / "a" / "checkpoints") if x.isdigit())
  assert ckpts == [6, 12, 24], "a checkpoint at each stage boundary"


def test_grad_accumulation_matches_one_big_step(data_dir, tmp_path):
  c = tiny_config(data_dir)
  c.model.update(
    token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0
  )
  c.mesh.update(data=1, fsdp=1, tensor=1)
  cfg = config_lib.gpt_config(c)
  sched = lambda t: 1.0
  tx = optax.sgd(1.0)  # linear in the gradient, so parameter updates compare gradients
  state = jax.jit(lambda k: train_step.unboxed(train_step.init_state(cfg, tx, k, ema=False)))(
    jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  batch = {
    "tokens": jnp.asarray(rng.integers(0, 64, (16, 64)), jnp.int32),
    "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
  }
  run = lambda k: jax.jit(
    functools.partial(
      train_step.train_step,
      cfg=cfg,
      tx=tx,
      schedule=sched,
      root_key=jax.random.key(1),
      patch_side=2,
      grad_accum_steps=k,
    )
  )(state, batch)
  one, m1 = run(1)
  four, m4 = run(4)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  upd = lambda new: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, state.params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
    upd(four.params),
    upd(one.params),
  )


def test_weight_decay_mask_follows_reference_rank():
  cfg = GPTConfig.preset("tiny", dim=32, n_head=2, dtype="float32")
  tx = train_step.make_optimizer(config_lib.get_config("tiny").optim, lambda t: 1e-3)
  params = train_step.unboxed(train_step.init_state(cfg, tx, jax.random.key(0), ema=False).params)
  mask = train_step.decay_mask(params)
  assert mask["tok_embeddings"] and mask["layers"]["attention"]["wq"]
  assert not mask["layers"]["attention_norm"]["weight"] and not mask["norm"]["weight"]


def _tree_close(got, want, rtol=1e-6, atol=1e-8):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


def test_ema_follows_its_recurrence():
  """ema_t = d * ema_(t-1) + (1 - d) * params_t, from ema_0 = params_0; d = 0.9 so that an
  inverted decay (0.1), a missing update or ema = params all fail."""
  cfg = GPTConfig.preset("tiny", dim=32, n_head=2, dtype="float32")
  tx = train_step.make_optimizer(config_lib.get_config("tiny").optim, lambda t: 1e-2)
  state = train_step.unboxed(train_step.init_state(cfg, tx, jax.random.key(0), ema=True))
  rng = np.random.default_rng(0)
  batch = {
    "tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (4, cfg.seq_len)), jnp.int32),
    "label": jnp.asarray(rng.integers(0, cfg.num_classes, 4), jnp.int32),
  }
  step = jax.jit(
    functools.partial(
      train_step.train_step,
      cfg=cfg,
      tx=tx,
      schedule=lambda t: 1e-2,
      root_key=jax.random.key(1),
      patch_side=2,
      ema_decay=0.9,
    )
  )
  want = state.params
  for _ in range(3):
    state, _ = step(state, batch)
    want = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, want, state.params)
    _tree_close(state.ema, want)
  lag = jax.tree.map(lambda e, p: float(np.abs(e - p).max()), state.ema, state.params)
  assert max(jax.tree.leaves(lag)) > 1e-3, "the EMA must lag the params"


def test_trainer_keeps_ema_of_the_params(data_dir, tmp_path):
  # No warmup: the first step moves the params (at lr 0 any EMA rule would pass).
  c = tiny_config(
    data_dir, **{"train.ema_decay": 0.9, "train.max_steps": 1, "optim.warmup_epochs": 0.0}
  )
  first = train.Trainer(c, str(tmp_path / "fresh")).fresh_state().params
  state = train.run(c, str(tmp_path / "wd"))["state"]
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), first, state.params)
  assert max(jax.tree.leaves(moved)) > 1e-4
  _tree_close(state.ema, jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, first, state.params))


def test_bad_configs_are_rejected_before_compiling(data_dir, tmp_path):
  cases = [
    ({"train.global_batch_size": 12}, "global_batch_size=12 is not divisible by the 8"),
    ({"model.grid": 6}, "needs patch side 4, which does not divide the 6x6 token grid"),
    ({"train.grad_accum_steps": 3}, "grad_accum_steps=3 must divide the per-device batch 2"),
    ({"mesh.data": 3}, "has 3 devices but 8 are available"),
    ({"mesh.fsdp": 3}, "cannot be filled from 8 devices"),
    ({"model.vocab_size": 32}, "the dataset has vocab_size=64 but config.model.vocab_size=32"),
    ({"train.patch_level": 5}, "patch_level must be 1, 2, 3 or 4"),
    ({"model.n_head": 3}, "dim=32 is not divisible by n_head=3"),
    ({"optim.lr": -1e-3}, r"optim.lr=-0.001 must be > 0"),
    ({"train.keep_checkpoints": 0}, "keep_checkpoints=0 must be >= 1"),
    ({"train.ckpt_every_steps": 0}, "ckpt_every_steps=0 must be >= 1"),
    ({"train.log_every_steps": -1}, "log_every_steps=-1 must be >= 1"),
    ({"model.dtype": "float16"}, "float16 would train without loss scaling"),
    ({"tokenizer.name": "bogus"}, r"tokenizer.name='bogus'; use one of"),
    (
      {"tokenizer.name": "grey", "tokenizer.levels": 16},
      "levels=16 but config.model.vocab_size=64",
    ),
    ({"tokenizer.preset": "VQ-32"}, r"tokenizer.preset='VQ-32'; use one of"),
  ]
  _COUNTER.count, _COUNTER.active = 0, True
  try:
    for overrides, message in cases:
      with pytest.raises(ValueError, match=message):
        train.Trainer(tiny_config(data_dir, **overrides), str(tmp_path / "wd"))
    assert _COUNTER.count == 0, "a bad config compiled something before failing"
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0))  # positive control: the counter sees compiles
    assert _COUNTER.count > 0
  finally:
    _COUNTER.active = False
  with pytest.raises(ValueError, match="unknown model preset 'XS'"):
    config_lib.get_config("XS")
  with pytest.raises(ValueError, match="config.data.path is empty"):
    train.Trainer(tiny_config(""), str(tmp_path / "wd"))


def test_drop_path_turns_residual_and_ffn_dropout_off(data_dir, tmp_path, caplog):
  """As the reference's train_c2i.py: dropout_p = 0 when drop_path_rate > 0."""
  with caplog.at_level(logging.INFO):
    cfg = train.Trainer(tiny_config(data_dir, **{"model.drop_path_rate": 0.1}), str(tmp_path)).cfg
  assert (cfg.resid_dropout_p, cfg.ffn_dropout_p, cfg.drop_path_rate) == (0.0, 0.0, 0.1)
  assert cfg.token_dropout_p == 0.1 and "dropout are off" in caplog.text
  cfg = train.Trainer(tiny_config(data_dir), str(tmp_path / "b")).cfg
  assert (cfg.resid_dropout_p, cfg.ffn_dropout_p) == (0.1, 0.1)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path):
  c = tiny_config(
    data_dir,
    **{
      "optim.lr": 1e30,
      "optim.grad_clip": 0.0,
      "train.ckpt_every_steps": 1,
      "train.log_every_steps": 1000,
      "optim.warmup_epochs": 0.0,
    },
  )
  wd = tmp_path / "wd"
  with pytest.raises(
    FloatingPointError,
    match=r"loss became nan at step (\d+) .*the last checkpoint is step",
  ):
    train.run(c, str(wd))
  steps = [int(x) for x in os.listdir(wd / "checkpoints") if x.isdigit()]
  assert steps, "the good checkpoints are kept"


def test_resume_refuses_a_different_model(data_dir, tmp_path):
  wd = str(tmp_path / "wd")
  train.run(tiny_config(data_dir, **{"train.max_steps": 2}), wd)
  with pytest.raises(ValueError, match=r"model.dim: checkpoint 32, config 64[\s\S]*new --workdir"):
    train.run(tiny_config(data_dir, **{"model.dim": 64}), wd)


def test_corrupt_newest_checkpoint_falls_back(data_dir, tmp_path, caplog):
  wd = tmp_path / "wd"
  c = tiny_config(data_dir, **{"train.max_steps": 12})
  train.run(c, str(wd))
  newest = wd / "checkpoints" / "12" / "state"
  for root, _, files in os.walk(newest):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with caplog.at_level(logging.WARNING):
    summary = train.run(tiny_config(data_dir), str(wd))
  assert summary["resumed_from"] == 6
  assert "checkpoint 12" in caplog.text
  assert summary["step"] == 24


def test_resume_continues_mid_stage(data_dir, tmp_path):
  """A run stopped at step 9 (mid stage 2) and resumed logs the losses of an unbroken run."""
  full = tmp_path / "full"
  train.run(tiny_config(data_dir), str(full))
  part = tmp_path / "part"
  train.run(tiny_config(data_dir, **{"train.max_steps": 9}), str(part))
  summary = train.run(tiny_config(data_dir), str(part))
  assert summary["resumed_from"] == 9
  a, b = read_metrics(full), read_metrics(part)
  assert [r["step"] for r in b] == list(range(1, 25))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_init_from_converted_params(tmp_path, golden_dir):
  data = tmp_path / "data"
  write_random_dataset(data, n=96)
  cfg = GPTConfig.preset("tiny", dtype="float32")
  sd = torch_io.load_torch_checkpoint(str(golden_dir / "gpt_tiny_weights.npz"))
  params_io.save_params(str(tmp_path / "conv"), gpt_torch.params_from_torch(sd, cfg), cfg)
  c = tiny_config(data)
  c.model.update(dim=64, n_head=4, multiple_of=256)
  c.train.init_from = str(tmp_path / "conv")
  trainer = train.Trainer(c, str(tmp_path / "wd"))
  state = trainer.fresh_state()
  np.testing.assert_array_equal(
    np.asarray(state.params["tok_embeddings"]), sd["tok_embeddings.weight"]
  )
  c.model.update(dim=32, n_head=2, multiple_of=32)
  with pytest.raises(ValueError, match="do not fit the requested model"):
    train.Trainer(c, str(tmp_path / "wd2")).fresh_state()


def test_plan_matches_reference_arithmetic():
  c = config_lib.get_config("B")
  info = dataclasses.make_dataclass("I", ["num_records", "grid", "vocab_size", "num_classes"])(
    1_281_167, 16, 16384, 1000
  )
  plan = train.plan_run(c, 8, info)
  assert plan.steps_per_epoch == 1_281_167 // 256
  assert plan.stage_end_epochs == (75, 150, 300) and plan.patch_sides == (4, 2, 1)
  assert plan.total_steps == 300 * plan.steps_per_epoch


def test_throughput_rates(monkeypatch):
  from npp_jax.infra import metric_writer

  clock = iter([0.0, 10.0, 20.0])
  monkeypatch.setattr(metric_writer.time, "perf_counter", lambda: next(clock))
  t = metric_writer.Throughput(0)
  fast = t.update(100, 8, 80, flops=1e6)  # 10 steps/s
  t.exclude(5.0)  # five of the next ten seconds went to evaluation
  slow = t.update(110, 8, 80, flops=2e6)
  assert fast["steps_per_sec"] == 10 and fast["images_per_sec"] == 80
  assert fast["flops_per_sec"] == 1e5 and slow["steps_per_sec"] == 2
  assert metric_writer.format_duration(3725) == "1h02m05s"
  assert metric_writer.format_duration(float("nan")) == "?"


def test_tensorboard_events_are_written_without_loading_pytorch(tmp_path):
  """tensorboardX imports PyTorch when it can (seconds per training job): the metric writer
  keeps it out, and PyTorch still imports afterwards for whoever needs it."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from .conftest import require_torch  # noqa: PLC0415

  require_torch()  # only then is there a PyTorch to keep out
  script = f"""
import sys
from npp_jax.infra import metric_writer
w = metric_writer.MetricWriter({str(tmp_path)!r}, enabled=True)
w.write(1, {{"loss": 1.5}})
w.close()
assert "torch" not in sys.modules, "tensorboardX loaded PyTorch"
import torch
print("ok", torch.__version__)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
  assert [n for n in os.listdir(tmp_path / "tensorboard") if n.startswith("events.")]


def test_eta_counts_the_expensive_stages_still_to_come():
  """Stages of 100 steps costing 1, 4 and 16 units per step: during the cheap first stage
  the ETA must count the later stages' FLOPs, not extrapolate the first stage's speed."""
  from npp_jax.infra import metric_writer

  eta = metric_writer.StageEta((100, 200, 300), (1.0, 4.0, 16.0))
  assert np.isnan(eta.seconds_left(0, 300))
  eta.observe(0, 10.0)  # 10 units/s: 10 steps/s in stage 0
  assert eta.seconds_left(50, 300) == pytest.approx((50 * 1 + 100 * 4 + 100 * 16) / 10)
  eta.observe(1, 20.0)  # stage 1 turns out faster per unit: refined for what is left
  assert eta.seconds_left(150, 300) == pytest.approx(50 * 4 / 20 + 100 * 16 / 20)
  assert eta.seconds_left(150, 180) == pytest.approx(30 * 4 / 20)  # train.max_steps
  assert eta.seconds_left(300, 300) == 0


def test_parameter_overview_comes_from_shapes_alone(caplog):
  """The overview is built from abstract shapes: nothing is copied to the host, and it
  works where a host holds only some shards."""
  from npp_jax.models import gpt

  abstract = train_step.unboxed(gpt.abstract_params(gpt.GPTConfig.preset("B")))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  with caplog.at_level(logging.INFO, logger="npp_jax.jobs.train"):
    train._log_overview(abstract)
  text = caplog.text
  assert "layers/attention/wq" in text and "(12, 768, 12, 64)" in text
  assert "Total: 110,888,448" in text or "Total: 110888448" in text


def test_profile_steps_writes_a_trace_of_those_steps(data_dir, tmp_path, caplog, capsys):
  c = tiny_config(data_dir, **{"train.max_steps": 5, "train.profile_steps": (2, 4)})
  c.train.progress_bar = True
  wd = tmp_path / "wd"
  with caplog.at_level(logging.INFO):
    train.run(c, str(wd))
  bar = capsys.readouterr().err
  assert "training: 100%" in bar and "5/5" in bar and "loss=" in bar, bar[-500:]
  traces = list((wd / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert "profiling steps 3-4 into" in caplog.text
  c.train.profile_steps = (4, 4)
  with pytest.raises(ValueError, match=r"profile_steps=\(4, 4\): use \(start, end\)"):
    train.run(c, str(tmp_path / "bad"))

"""`--config.mode=train`: the NPP trainer (mesh, sharded state, one compiled step per stage,
checkpoints with exact resume, metrics)."""

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from npp_jax import (
  checkpoint,
  compile_cache,
  config_lib,
  hardware,
  metric_writer,
  npp,
  params_io,
  preemption,
  profiling,
  sharding,
  storage,
  train_step,
)
from npp_jax.data import datasets, pipeline
from npp_jax.data.records import DatasetInfo
from npp_jax.models import gpt_flops
from npp_jax.models.gpt import GPTConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The step-level schedule of a run, derived from the config and the dataset size."""

  steps_per_epoch: int
  patch_sides: tuple[int, ...]
  stage_end_epochs: tuple[int, ...]
  total_steps: int
  stage_step_flops: tuple[int, ...] = ()  # FLOPs of one step of each stage

  @property
  def stage_end_steps(self) -> tuple[int, ...]:
    return tuple(e * self.steps_per_epoch for e in self.stage_end_epochs)

  def stage(self, step: int) -> int:
    return npp.stage_of_step(step, self.steps_per_epoch, self.stage_end_epochs)

  def flops_until(self, step: int) -> int:
    """Training FLOPs of steps [0, step)."""
    total, start = 0, 0
    for end, flops in zip(self.stage_end_steps, self.stage_step_flops, strict=True):
      total += max(0, min(step, end) - start) * flops
      start = end
    return total


def plan_run(c: ml_collections.ConfigDict, num_devices: int, info: DatasetInfo | None) -> Plan:
  """The run's step schedule; checks the config against the devices and the dataset first.

  Every problem is a ValueError naming the value and the fix, before anything compiles.
  With `info=None` (no dataset yet) steps are counted per epoch of one step.
  """
  config_lib.check_mode(c)
  config_lib.check_training(c)
  cfg = config_lib.gpt_config(c)
  mesh_shape = sharding.mesh_shape(c.mesh.to_dict(), num_devices)
  dp = mesh_shape[0] * mesh_shape[1]
  gb, k = c.train.global_batch_size, c.train.grad_accum_steps
  if gb < 1 or gb % dp:
    raise ValueError(
      f"train.global_batch_size={gb} is not divisible by the {dp} data-parallel devices "
      f"(mesh data x fsdp = {mesh_shape[0]} x {mesh_shape[1]}); use a multiple of {dp}."
    )
  if k < 1 or (gb // dp) % k:
    raise ValueError(
      f"train.grad_accum_steps={k} must divide the per-device batch {gb // dp} "
      f"(global {gb} over {dp} devices)."
    )
  sides = npp.patch_sides(c.train.patch_level)
  for s in sides:
    if cfg.grid % s:
      raise ValueError(
        f"train.patch_level={c.train.patch_level} needs patch side {s}, which does not divide "
        f"the {cfg.grid}x{cfg.grid} token grid; lower train.patch_level."
      )
  ends = npp.stage_boundaries(c.train.epochs, c.train.patch_level, c.train.epoch_rate)
  if not 0.0 <= c.train.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay={c.train.ema_decay} must be in [0, 1).")
  step_flops = tuple(gpt_flops.train_step_flops(cfg, s, gb) for s in sides)
  if info is None:
    return Plan(1, tuple(sides), tuple(ends), ends[-1], step_flops)
  for key, want in (
    ("grid", cfg.grid),
    ("vocab_size", cfg.vocab_size),
    ("num_classes", cfg.num_classes),
  ):
    if getattr(info, key) != want:
      raise ValueError(
        f"the dataset has {key}={getattr(info, key)} but config.model.{key}={want}: set "
        f"--config.model.{key}={getattr(info, key)} or use codes from the matching tokenizer."
      )
  spe = pipeline.steps_per_epoch(info.num_records, gb)
  return Plan(spe, tuple(sides), tuple(ends), ends[-1] * spe, step_flops)


def _log_compile(patch_side: int, seconds: float, compiled: Any, cached: bool) -> dict:
  entry = {"patch_side": patch_side, "compile_sec": round(seconds, 3), "cache_hit": cached}
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      entry["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
      entry["argument_bytes"] = int(getattr(mem, "argument_size_in_bytes", 0))
  except Exception:  # noqa: BLE001 (not every backend reports memory)
    pass
  log.info(
    "%s the train step for patch side %d in %.1fs (%s)",
    "loaded (compilation cache)" if cached else "compiled",
    patch_side,
    seconds,
    {k: v for k, v in entry.items() if k.endswith("bytes")},
  )
  return entry


class Trainer:
  """Owns the mesh, the sharded state and the compiled step of each stage."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: str):
    self.c, self.workdir = c, storage.absolute(workdir)
    self.cfg: GPTConfig = config_lib.train_gpt_config(c)
    self.data_dirs, self.heldout_dir = datasets.locate(c, self.workdir)
    data_dirs = self.data_dirs
    self.info = DatasetInfo.load(data_dirs[0])
    self.plan = plan_run(c, jax.device_count(), self.info)
    if c.train.max_steps > 0:
      self.plan = dataclasses.replace(
        self.plan, total_steps=min(self.plan.total_steps, c.train.max_steps)
      )
    self.mesh = sharding.make_mesh(c.mesh.to_dict())
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.schedule = npp.npp_lr_schedule(
      c.optim.lr,
      c.optim.end_lr,
      self.plan.steps_per_epoch,
      self.plan.stage_end_epochs,
      c.optim.warmup_epochs,
      c.optim.decay_ratio,
    )
    self.tx = train_step.make_optimizer(c.optim, self.schedule)
    self.root_key = jax.random.key(c.seed)
    self.compile_log: list[dict] = []
    self._compiled: dict[int, Any] = {}

    ds = pipeline.train_dataset(
      data_dirs,
      vocab_size=self.cfg.vocab_size,
      num_classes=self.cfg.num_classes,
      grid=self.cfg.grid,
      global_batch=c.train.global_batch_size,
      steps_per_epoch=self.plan.steps_per_epoch,
      num_steps=self.plan.total_steps,
      seed=c.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      weights=tuple(c.data.weights),
    )
    self.data_iter = pipeline.to_iterator(ds, c.data.worker_count, c.data.prefetch_buffer_size)
    self.heldout = self._heldout_batches() if c.train.eval_every_steps else []
    self._eval = None

    init = functools.partial(train_step.init_state, self.cfg, self.tx, ema=c.train.ema_decay > 0)
    boxed = jax.eval_shape(init, jax.random.key(0))
    self.state_sharding = sharding.logical_sharding(boxed, self.mesh)
    self.abstract_state = train_step.unboxed(boxed)
    self._init = jax.jit(lambda k: train_step.unboxed(init(k)), out_shardings=self.state_sharding)

  # -- state ------------------------------------------------------------------
  def fresh_state(self) -> train_step.TrainState:
    state = self._init(jax.random.fold_in(self.root_key, 1 << 30))
    if self.c.train.init_from:
      params = params_io.load_params(self.c.train.init_from, self.cfg)
      params = jax.device_put(params, self.state_sharding.params)
      ema = params if state.ema is not None else None
      state = state.replace(params=params, opt_state=self.tx.init(params), ema=ema)
      state = jax.device_put(state, self.state_sharding)
      log.info("initialised params from %s", self.c.train.init_from)
    return state

  # -- compiled steps ---------------------------------------------------------
  def step_fn(self, patch_side: int, state, batch):
    """The compiled step for one stage: traced and compiled once, then reused."""
    if patch_side not in self._compiled:
      fn = functools.partial(
        train_step.train_step,
        cfg=self.cfg,
        tx=self.tx,
        schedule=self.schedule,
        root_key=self.root_key,
        patch_side=patch_side,
        grad_accum_steps=self.c.train.grad_accum_steps,
        ema_decay=self.c.train.ema_decay,
      )
      jitted = jax.jit(
        fn,
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
        donate_argnums=0,
      )
      t0, hits = time.perf_counter(), compile_cache.hits()
      with sharding.activation_sharding(self.mesh):
        compiled = jitted.lower(state, batch).compile()
      seconds, cached = time.perf_counter() - t0, compile_cache.hits() > hits
      self.compile_log.append(_log_compile(patch_side, seconds, compiled, cached))
      self._compiled[patch_side] = compiled
    return self._compiled[patch_side]

  def _heldout_batches(self) -> list[dict[str, jax.Array]]:
    c = self.c
    batches = pipeline.heldout_batches(
      self.heldout_dir,
      vocab_size=self.cfg.vocab_size,
      num_classes=self.cfg.num_classes,
      grid=self.cfg.grid,
      global_batch=c.train.global_batch_size,
      num_batches=c.train.eval_batches,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    return [self.global_batch(b) for b in batches]

  def heldout_loss(self, params) -> float:
    """Mean next-token loss over the held-out batches (one compiled eval step)."""
    if self._eval is None:
      self._eval = jax.jit(
        functools.partial(train_step.ntp_loss, cfg=self.cfg),
        in_shardings=(self.state_sharding.params, self.batch_sharding),
        out_shardings=sharding.replicated(self.mesh),
      )
    with sharding.activation_sharding(self.mesh):  # traced on the first call
      losses = [self._eval(params, b) for b in self.heldout]
    return float(np.mean([float(x) for x in losses]))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.global_batch(local, self.batch_sharding)


def _check_finite(pending: list, workdir: str, last_saved: int | None, resumed_from: int | None):
  """Raises FloatingPointError at the first non-finite loss of `pending`, naming what to do."""
  for step, side, m in pending:
    loss = float(m["loss"])
    if not math.isfinite(loss):
      if resumed_from is not None and last_saved == resumed_from:
        where = (
          f"the run had resumed from the checkpoint at step {resumed_from} only "
          f"{step - resumed_from} steps before, so that checkpoint is suspect: move "
          f"{workdir}/checkpoints/{resumed_from} aside to resume from the one before it"
        )
      elif last_saved is not None:
        where = f"the last checkpoint is step {last_saved} in {workdir}/checkpoints"
      else:
        where = "no checkpoint was written yet"
      raise FloatingPointError(
        f"loss became {loss} at step {step} (patch side {side}, lr {float(m['lr']):.3g}); "
        f"training stopped and {where}. Otherwise lower optim.lr, raise optim.grad_clip, "
        "or check the data."
      )
  pending.clear()


def run(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains until the end of the NPP schedule (or train.max_steps), resuming if possible.

  Returns a summary: final step, last logged metrics, the compile log. A second trainer
  on the same workdir is refused while this one runs.
  """
  with checkpoint.WorkdirLock(workdir):
    return _train(c, workdir)


def _train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  trainer = Trainer(c, workdir)
  plan, cfg = trainer.plan, trainer.cfg
  ckpt = checkpoint.Checkpointer(workdir, keep=c.train.keep_checkpoints)
  writer = metric_writer.MetricWriter(trainer.workdir)
  config_dict = checkpoint.config_to_dict(c)

  abstract = checkpoint.abstract_with_sharding(trainer.abstract_state, trainer.state_sharding)
  dataset = {
    **{k: getattr(trainer.info, k) for k in ("num_records", "grid", "vocab_size", "num_classes")},
    "n_aug": trainer.info.n_aug,
    "steps_per_epoch": plan.steps_per_epoch,
    "extractions": len(trainer.data_dirs),
  }
  restored = ckpt.restore_latest(abstract, trainer.data_iter, config_dict, dataset)
  resumed_from = restored[0] if restored is not None else None
  if restored is not None:
    start, state, meta = restored
    writer.truncate_after(start)
    log.info(
      "resumed from step %d (stage %d, patch side %d)", start, meta["stage"], meta["patch_side"]
    )
  else:
    start, state = 0, trainer.fresh_state()
    _log_overview(trainer.abstract_state.params)
  log.info(
    "training %s: %d steps (%d per epoch, stages end at epochs %s with patch sides %s), "
    "global batch %d on mesh %s",
    "GPT-" + c.model.preset,
    plan.total_steps,
    plan.steps_per_epoch,
    plan.stage_end_epochs,
    plan.patch_sides,
    c.train.global_batch_size,
    dict(trainer.mesh.shape),
  )

  throughput = metric_writer.Throughput(start, plan.flops_until(start))
  eta = metric_writer.StageEta(plan.stage_end_steps, plan.stage_step_flops)
  # Wall-clock time in the training loop (compiles and saves included, held-out
  # evaluation not), carried across resumes.
  train_seconds = float(meta.get("train_seconds", 0.0)) if restored is not None else 0.0
  clock = time.perf_counter()
  pending: list = []
  last_saved = start if restored is not None else None
  last_metrics: dict[str, Any] = {}
  gb = c.train.global_batch_size
  step = start
  stopped = None
  trace = profiling.StepTrace(c.train.profile_steps, trainer.workdir)
  with preemption.PreemptionGuard() as guard:
    try:
      for step in range(start, plan.total_steps):
        stage = plan.stage(step)
        side = plan.patch_sides[stage]
        batch = trainer.global_batch(next(trainer.data_iter))
        trace.before_step(step)
        state, m = trainer.step_fn(side, state, batch)(state, batch)
        pending.append((step + 1, side, m))
        done = step + 1
        trace.after_step(done, m)
        row: dict[str, Any] = {}
        if done % c.train.log_every_steps == 0 or done == plan.total_steps:
          _check_finite(pending, trainer.workdir, last_saved, resumed_from)
          tokens = gb * (cfg.grid // side) ** 2
          rates = throughput.update(done, gb, tokens, plan.flops_until(done))
          eta.observe(stage, rates["flops_per_sec"])
          if (mfu := hardware.mfu(rates["flops_per_sec"])) is not None:
            rates["mfu"] = mfu
          rates["eta_sec"] = eta.seconds_left(done, plan.total_steps)
          row = last_metrics = {
            "loss": float(m["loss"]),
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "patch_side": side,
            "stage": stage,
            "epoch": done / plan.steps_per_epoch,
            **rates,
          }
        if c.train.eval_every_steps and (
          done % c.train.eval_every_steps == 0 or done == plan.total_steps
        ):
          t_eval = time.perf_counter()
          train_seconds += t_eval - clock
          row["eval/ntp_loss"] = trainer.heldout_loss(state.params)
          clock = time.perf_counter()
          throughput.exclude(clock - t_eval)
        if row:
          train_seconds += time.perf_counter() - clock
          clock = time.perf_counter()
          row |= {"train_flops": plan.flops_until(done), "train_seconds": train_seconds}
          writer.write(done, row)
        if "loss" in row:
          log.info(
            "step %d/%d | stage %d (patch %dx%d) | loss %.4f | lr %.3g | grad norm %.3f | "
            "%.2f steps/s %.1f img/s%s | ETA %s",
            done,
            plan.total_steps,
            stage,
            side,
            side,
            last_metrics["loss"],
            last_metrics["lr"],
            last_metrics["grad_norm"],
            rates["steps_per_sec"],
            rates["images_per_sec"],
            f" | MFU {rates['mfu']:.1%}" if "mfu" in rates else "",
            metric_writer.format_duration(rates["eta_sec"]),
          )
        if "eval/ntp_loss" in row:
          log.info("step %d | held-out next-token loss %.4f", done, row["eval/ntp_loss"])
        boundary = done in plan.stage_end_steps or done == plan.total_steps
        stop = guard.should_stop(done)
        if boundary or stop or done % c.train.ckpt_every_steps == 0:
          _check_finite(pending, trainer.workdir, last_saved, resumed_from)
          writer.flush()  # every row up to this checkpoint is written before it
          next_stage = plan.stage(done) if done < plan.total_steps else stage
          ckpt.save(
            done,
            state,
            trainer.data_iter,
            {
              "step": done,
              "stage": next_stage,
              "patch_side": plan.patch_sides[next_stage],
              "config": config_dict,
              "model": cfg.to_dict(),
              "dataset": dataset,
              "train_seconds": train_seconds + time.perf_counter() - clock,
            },
          )
          last_saved = done
        if stop:
          stopped = guard.received
          log.warning(
            "stopped by %s at step %d/%d; checkpoint saved in %s/checkpoints: run the "
            "same command to resume",
            stopped,
            done,
            plan.total_steps,
            trainer.workdir,
          )
          break
      _check_finite(pending, trainer.workdir, last_saved, resumed_from)
    finally:
      trace.stop()  # a run that ends inside the traced steps still writes its trace
      ckpt.close()
      writer.close()
  return {
    "step": int(jax.device_get(state.step)),
    "metrics": last_metrics,
    "compile_log": trainer.compile_log,
    "state": state,
    "plan": plan,
    "cfg": cfg,
    "resumed_from": resumed_from,
    "stopped_by": stopped,
  }


def _log_overview(abstract_params: Any) -> None:
  """Names, shapes, dtypes and sizes of the parameters, from their abstract shapes: no
  parameter is copied to the host (12 GB at 3B), and no host needs the others' shards."""
  from clu import parameter_overview  # noqa: PLC0415 (clu is only needed here)

  overview = parameter_overview.get_parameter_overview(abstract_params, include_stats=False)
  log.info("parameters:\n%s", overview)

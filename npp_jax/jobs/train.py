"""`--config.mode=train`: the NPP trainer (mesh, sharded state, one compiled step per stage,
checkpoints with exact resume, metrics)."""

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from npp_jax import config_lib, programs, sharding, train_step
from npp_jax.accelerators import hardware
from npp_jax.data import datasets, pipeline
from npp_jax.data.records import DatasetInfo
from npp_jax.infra import checkpoint, compile_cache, metric_writer, preemption, profiling, storage
from npp_jax.models import params_io
from npp_jax.models.gpt import GPTConfig

log = logging.getLogger(__name__)


Plan = programs.Plan


def plan_run(c: ml_collections.ConfigDict, num_devices: int, info: DatasetInfo | None) -> Plan:
  """The run's step schedule; checks the config against the devices and the dataset first
  (one-line ValueErrors naming the value and the fix, before anything compiles)."""
  plan = programs.plan_run(c, num_devices, None if info is None else info.num_records)
  if info is not None:
    cfg = config_lib.gpt_config(c)
    for key in ("grid", "vocab_size", "num_classes"):
      if getattr(info, key) != getattr(cfg, key):
        raise ValueError(
          f"the dataset has {key}={getattr(info, key)} but config.model.{key}="
          f"{getattr(cfg, key)}: set --config.model.{key}={getattr(info, key)} or use codes "
          "from the matching tokenizer."
        )
  return plan


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
    self.data_dirs, self.heldout_dir = datasets.locate(c, self.workdir)
    data_dirs = self.data_dirs
    self.info = DatasetInfo.load(data_dirs[0])
    plan_run(c, jax.device_count(), self.info)  # one-line errors before any compile
    self.mesh = sharding.make_mesh(c.mesh.to_dict())
    self.programs = programs.TrainPrograms(c, self.mesh, self.info.num_records)
    p = self.programs
    self.cfg: GPTConfig = p.cfg
    self.plan = p.plan
    if c.train.max_steps > 0:
      self.plan = dataclasses.replace(
        self.plan, total_steps=min(self.plan.total_steps, c.train.max_steps)
      )
    self.batch_sharding, self.schedule, self.tx = p.batch_sharding, p.schedule, p.tx
    self.root_key, self.state_sharding = p.root_key, p.state_sharding
    self.abstract_state = p.abstract_state
    self.compile_log: list[dict] = []
    self._compiled: dict[int, Any] = {}

    # Opening the shards reaches a bucket through ArrayRecord's own client: bounded too.
    ds = storage.call_with_deadline(
      "open the training data",
      data_dirs[0],
      lambda: pipeline.train_dataset(
        data_dirs,
        vocab_size=self.cfg.vocab_size,
        num_classes=self.cfg.num_classes,
        grid=self.cfg.grid,
        global_batch=c.train.global_batch_size,
        steps_per_epoch=self.plan.steps_per_epoch,
        # The whole schedule, not train.max_steps: a checkpoint's data position must stay
        # valid when a run is continued with another (or no) max_steps.
        num_steps=p.plan.total_steps,
        seed=c.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        weights=tuple(c.data.weights),
      ),
    )
    self.data_iter = pipeline.to_iterator(ds, c.data.worker_count, c.data.prefetch_buffer_size)
    self.heldout = self._heldout_batches() if c.train.eval_every_steps else []

  # -- state ------------------------------------------------------------------
  def fresh_state(self) -> train_step.TrainState:
    state = self.programs.init(jax.random.fold_in(self.root_key, programs.FRESH_INIT))
    if self.c.train.init_from:
      params = params_io.load_params(self.c.train.init_from, self.cfg)
      params = jax.device_put(params, self.state_sharding.params)
      ema = params if state.ema is not None else None
      state = state.replace(params=params, opt_state=self.tx.init(params), ema=ema)
      state = jax.device_put(state, self.state_sharding)
      log.info("initialised params from %s", self.c.train.init_from)
    return state

  # -- compiled steps ---------------------------------------------------------
  def compile_stages(self, first_stage: int = 0) -> None:
    """Compiles the step of every stage from `first_stage` to the last this run reaches
    (`train.max_steps` may end it early), before any step runs, and refuses
    (ProgramTooLargeError, one line naming overrides that fit) a stage whose program
    exceeds the device's memory."""
    limit = programs.memory_limit(self.c, self.mesh.devices.flat[0])
    last = self.plan.stage(max(0, self.plan.total_steps - 1))
    for side in self.plan.patch_sides[first_stage : max(first_stage, last) + 1]:
      if side in self._compiled:
        continue
      t0, hits = time.perf_counter(), compile_cache.hits()
      try:
        compiled = programs.compile_program(self.programs.lower_step(side))
      except programs.CompilerOutOfMemoryError as e:
        raise programs.stage_too_large(
          e.required, limit or e.available, self.c, self.mesh, side, self.info.num_records
        ) from None
      seconds, cached = time.perf_counter() - t0, compile_cache.hits() > hits
      self.compile_log.append(_log_compile(side, seconds, compiled, cached))
      programs.check_fits(compiled, limit, self.c, self.mesh, side, self.info.num_records)
      self._compiled[side] = compiled

  def step(self, patch_side: int, state, batch):
    """One train step of the stage with `patch_side` (compiled on first use)."""
    if patch_side not in self._compiled:
      self.compile_stages(self.plan.patch_sides.index(patch_side))
    return self._compiled[patch_side](state, batch)

  def _heldout_batches(self) -> list[dict[str, jax.Array]]:
    c = self.c
    read = lambda: pipeline.heldout_batches(
      self.heldout_dir,
      vocab_size=self.cfg.vocab_size,
      num_classes=self.cfg.num_classes,
      grid=self.cfg.grid,
      global_batch=c.train.global_batch_size,
      num_batches=c.train.eval_batches,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    batches = storage.call_with_deadline("read the held-out data", self.heldout_dir, read)
    return [self.global_batch(b) for b in batches]

  def heldout_loss(self, params) -> float:
    """Mean next-token loss over the held-out batches (one compiled eval step)."""
    with sharding.activation_sharding(self.mesh):  # traced on the first call
      losses = [self.programs.eval_step()(params, b) for b in self.heldout]
    return float(np.mean([float(x) for x in losses]))

  def next_batch(self) -> dict[str, jax.Array]:
    """The next training batch; from a bucket within the storage deadline (ArrayRecord's
    own client retries a lost endpoint without end)."""
    local = storage.call_with_deadline(
      "read the training data", self.data_dirs[0], lambda: next(self.data_iter)
    )
    return self.global_batch(local)

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
  storage.set_deadline(c.storage_deadline_s)
  with checkpoint.WorkdirLock(workdir):
    return _train(c, workdir)


def _train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  trainer = Trainer(c, workdir)
  plan = trainer.plan
  # Every remaining stage's step is compiled (and checked to fit the devices' memory)
  # before any state is restored or any step runs; the training clock starts after, so
  # neither the throughput nor the ETA counts compile time.
  latest = max(checkpoint.saved_steps(trainer.workdir), default=0)
  trainer.compile_stages(plan.stage(min(latest, plan.total_steps - 1)))
  run = _Run(trainer)
  state, stopped = run.state, None
  # Four deep on purpose: the preemption guard and the failure handling (rescue, close)
  # wrap the step loop, whose body stays one screen.
  with preemption.PreemptionGuard() as guard:
    try:
      for done in range(run.start + 1, plan.total_steps + 1):
        side = plan.patch_sides[plan.stage(done - 1)]
        batch = trainer.next_batch()
        run.trace.before_step(done - 1)
        state, m = trainer.step(side, state, batch)
        run.after_step(done, side, m, state)
        stop = guard.should_stop(done)
        if stop or run.ckpt.should_save(done):
          run.save(done, state)
        if stop:
          stopped = guard.received
          log.warning(
            "stopped by %s at step %d/%d; checkpoint saved in %s/checkpoints: run the "
            "same command to resume",
            *(stopped, done, plan.total_steps, trainer.workdir),
          )
          break
      run.check_finite()
    except storage.StorageError as e:
      run.close(failed=True)
      raise storage.StorageError(f"{e}; {_rescue(trainer, state, run.clock)}") from None
    except BaseException:
      run.close(failed=True)
      raise
    run.close(failed=False)
  return {
    "step": int(jax.device_get(state.step)),
    "metrics": run.progress.last,
    "compile_log": trainer.compile_log,
    "state": state,
    "plan": plan,
    "cfg": trainer.cfg,
    "resumed_from": run.resumed_from,
    "stopped_by": stopped,
  }


class _Run:
  """What the training loop keeps beside the state: the checkpoints and their policy, the
  metric files, the clock, the progress report, the steps not yet checked to be finite."""

  def __init__(self, trainer: Trainer):
    c, plan = trainer.c, trainer.plan
    self.trainer = trainer
    self.ckpt = checkpoint.Checkpointer(
      trainer.workdir,
      keep=c.train.keep_checkpoints,
      every=c.train.ckpt_every_steps,
      at=(*plan.stage_end_steps, plan.total_steps),
      fixed_keys=config_lib.FIXED_KEYS,
    )
    self.writer = metric_writer.MetricWriter(trainer.workdir)
    self.start, self.state, meta = _restore_or_init(trainer, self.ckpt, self.writer)
    self.resumed_from = self.start if meta else None
    self.last_saved = self.resumed_from
    self.clock = _Clock(float(meta.get("train_seconds", 0.0)))
    self.progress = _Progress(trainer, self.start)
    self.trace = profiling.StepTrace(c.train.profile_steps, trainer.workdir)
    self.pending: list = []  # (step, patch side, metrics) not yet checked to be finite

  def after_step(self, done: int, side: int, m: dict, state: Any) -> None:
    """Traces, advances the bar, and at the log/eval intervals writes the step's row."""
    c, plan = self.trainer.c, self.trainer.plan
    self.pending.append((done, side, m))
    self.trace.after_step(done, m)
    self.progress.advance()
    row: dict[str, Any] = {}
    last = done == plan.total_steps
    if done % c.train.log_every_steps == 0 or last:
      self.check_finite()
      row = self.progress.measure(done, plan.stage(done - 1), side, m)
    if c.train.eval_every_steps and (done % c.train.eval_every_steps == 0 or last):
      row["eval/ntp_loss"], seconds = self.clock.paused(self.trainer.heldout_loss, state.params)
      self.progress.throughput.exclude(seconds)
    if row:
      row |= {"train_flops": plan.flops_until(done), "train_seconds": self.clock.seconds()}
      self.writer.write(done, row)
      self.progress.report(done, row)

  def save(self, done: int, state: Any) -> None:
    self.check_finite()
    self.writer.flush()  # every row up to this checkpoint is written before it
    meta = _checkpoint_meta(self.trainer, done, self.clock)
    self.ckpt.save(done, state, self.trainer.data_iter, meta)
    self.last_saved = done

  def check_finite(self) -> None:
    _check_finite(self.pending, self.trainer.workdir, self.last_saved, self.resumed_from)

  def close(self, failed: bool) -> None:
    """Ends the trace, the bar, the pending save and the metric files; after a failure a
    storage error while closing is logged, so that the first error is the one reported."""
    self.trace.stop()  # a run that ends inside the traced steps still writes its trace
    self.progress.close()
    for close in (self.ckpt.close, self.writer.close):
      try:
        close()
      except storage.StorageError as e:
        if not failed:
          raise
        if not str(e).startswith("storage failed earlier"):  # not the reported error again
          log.warning("while stopping: %s", e)


def _rescue(trainer: Trainer, state: Any, clock: "_Clock") -> str:
  """Saves the state on the local disk when storage failed (one host only: several hosts
  have no shared local disk); returns what was done, for the error line. The step is the
  state's own: a read that failed before its step ran leaves the state a step behind."""
  if jax.process_count() > 1:
    return "no local copy of the state (several hosts); rerun to resume from the last checkpoint"
  name = re.sub(r"[^\w.-]+", "_", trainer.workdir.split("://", 1)[-1])
  step = int(jax.device_get(state.step))
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())  # never over an earlier rescue
  local = os.path.join(os.path.expanduser("~"), "npp_jax_rescue", name, stamp)
  try:
    rescue = checkpoint.Checkpointer(local, keep=1, async_save=False)
    rescue.save(step, state, trainer.data_iter, _checkpoint_meta(trainer, step, clock))
    rescue.close()
  except Exception as e:  # noqa: BLE001 (the local disk may fail too; the error says so)
    return f"no local copy of the state either ({type(e).__name__}: {e})"
  return (
    f"the state at step {step} is saved in {rescue.directory}/{step}: copy that folder to "
    f"{trainer.workdir}/checkpoints/{step} once it can be written again and rerun to resume "
    "from it"
  )


def _dataset_record(trainer: Trainer) -> dict[str, Any]:
  """What of the dataset a checkpoint must be continued with (checkpoint.DatasetRecord)."""
  info = trainer.info
  record = checkpoint.DatasetRecord(
    num_records=info.num_records,
    grid=info.grid,
    vocab_size=info.vocab_size,
    num_classes=info.num_classes,
    n_aug=info.n_aug,
    steps_per_epoch=trainer.plan.steps_per_epoch,
    extractions=len(trainer.data_dirs),
  )
  return dataclasses.asdict(record)


def _restore_or_init(trainer: Trainer, ckpt: checkpoint.Checkpointer, writer) -> tuple:
  """(start step, state, meta of the restored checkpoint or {}): the newest intact
  checkpoint (metrics after it dropped), else a fresh state."""
  c, plan = trainer.c, trainer.plan
  abstract = checkpoint.abstract_with_sharding(trainer.abstract_state, trainer.state_sharding)
  config = checkpoint.config_to_dict(c)
  restored = ckpt.restore_latest(abstract, trainer.data_iter, config, _dataset_record(trainer))
  if restored is not None:
    start, state, meta = restored
    _check_data_position(trainer, ckpt, start)
    writer.truncate_after(start)
    log.info(
      "resumed from step %d (stage %d, patch side %d)", start, meta["stage"], meta["patch_side"]
    )
  else:
    start, state, meta = 0, trainer.fresh_state(), {}
    _log_overview(trainer.abstract_state.params)
  log.info(
    "training %s: %d steps (%d per epoch, stages end at epochs %s with patch sides %s), "
    "global batch %d on mesh %s",
    *("GPT-" + c.model.preset, plan.total_steps, plan.steps_per_epoch, plan.stage_end_epochs),
    *(plan.patch_sides, c.train.global_batch_size, dict(trainer.mesh.shape)),
  )
  return start, state, meta


def _check_data_position(trainer: Trainer, ckpt: checkpoint.Checkpointer, step: int) -> None:
  """A run at `step` has read `step` batches: a checkpoint whose data position says
  otherwise (its `data` item edited, or copied from another run) would train on other
  examples than the run it continues. Refused in one line; nothing is moved."""
  position = trainer.data_iter.get_state().get("next_index")
  if position != step:
    folder = storage.join(ckpt.directory, str(step))
    raise checkpoint.CheckpointMismatchError(
      f"the checkpoint at step {step} ({folder}) records data position {position} on "
      f"process {jax.process_index()}, but a run at step {step} has read {step} batches: "
      f"its data/ item was edited or comes from another run; restore the original, or move "
      f"{folder} aside to resume from the checkpoint before it."
    )


def _checkpoint_meta(trainer: Trainer, done: int, clock: "_Clock") -> dict[str, Any]:
  """What a checkpoint at step `done` records beside the state: the stage to continue
  with, the config and dataset it must be continued with, the training time so far."""
  plan = trainer.plan
  stage = plan.stage(min(done, plan.total_steps - 1))
  config = checkpoint.config_to_dict(trainer.c)
  for key in ("path", "eval_path"):  # absolute: a sampler started elsewhere finds them
    paths = [p.strip() for p in str(config["data"][key]).split(",") if p.strip()]
    config["data"][key] = ",".join(storage.absolute(p) for p in paths)
  return {
    "step": done,
    "stage": stage,
    "patch_side": plan.patch_sides[stage],
    "config": config,
    "model": trainer.cfg.to_dict(),
    "dataset": _dataset_record(trainer),
    "train_seconds": clock.seconds(),
  }


class _Clock:
  """Wall-clock seconds in the training loop, carried across resumes, with held-out
  evaluations paused out."""

  def __init__(self, seconds: float):
    self._since = time.perf_counter() - seconds

  def seconds(self) -> float:
    return time.perf_counter() - self._since

  def paused(self, fn: Any, *args: Any) -> tuple[Any, float]:
    """(fn(*args), the seconds it took, which the clock does not count)."""
    t0 = time.perf_counter()
    out = fn(*args)
    took = time.perf_counter() - t0
    self._since += took
    return out, took


class _Progress:
  """Throughput, MFU and ETA of the logged steps, their log line, and the optional
  progress bar (`train.progress_bar`, process 0)."""

  def __init__(self, trainer: Trainer, start: int):
    self.trainer, plan = trainer, trainer.plan
    self.throughput = metric_writer.Throughput(start, plan.flops_until(start))
    self.eta = metric_writer.StageEta(plan.stage_end_steps, plan.stage_step_flops)
    self.last: dict[str, Any] = {}
    self.bar = None
    if trainer.c.train.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm  # noqa: PLC0415

      self.bar = tqdm(total=plan.total_steps, initial=start, desc="training", unit="step")

  def advance(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def measure(self, done: int, stage: int, side: int, m: dict) -> dict[str, Any]:
    """The logged row of step `done` (its loss, lr, rates, ETA)."""
    plan, gb = self.trainer.plan, self.trainer.c.train.global_batch_size
    grid = self.trainer.cfg.grid
    rates = self.throughput.update(done, gb, gb * (grid // side) ** 2, plan.flops_until(done))
    self.eta.observe(stage, rates["flops_per_sec"])
    if (mfu := hardware.mfu(rates["flops_per_sec"])) is not None:
      rates["mfu"] = mfu
    rates["eta_sec"] = self.eta.seconds_left(done, plan.total_steps)
    return {
      "loss": float(m["loss"]),
      "lr": float(m["lr"]),
      "grad_norm": float(m["grad_norm"]),
      "patch_side": side,
      "stage": stage,
      "epoch": done / plan.steps_per_epoch,
      **rates,
    }

  def report(self, done: int, row: dict[str, Any]) -> None:
    """The log line(s) of a written row (and the bar's loss and ETA)."""
    total = self.trainer.plan.total_steps
    if "loss" in row:
      self.last = row
      side, eta = row["patch_side"], metric_writer.format_duration(row["eta_sec"])
      log.info(
        "step %d/%d | stage %d (patch %dx%d) | loss %.4f | lr %.3g | grad norm %.3f | "
        "%.2f steps/s %.1f img/s%s | ETA %s",
        *(done, total, row["stage"], side, side, row["loss"], row["lr"], row["grad_norm"]),
        *(row["steps_per_sec"], row["images_per_sec"]),
        f" | MFU {row['mfu']:.1%}" if "mfu" in row else "",
        eta,
      )
      if self.bar is not None:
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", patch=side, eta=eta)
    if "eval/ntp_loss" in row:
      log.info("step %d | held-out next-token loss %.4f", done, row["eval/ntp_loss"])

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _log_overview(abstract_params: Any) -> None:
  """Names, shapes, dtypes and sizes of the parameters, from their abstract shapes: no
  parameter is copied to the host (12 GB at 3B), and no host needs the others' shards."""
  from clu import parameter_overview  # noqa: PLC0415 (clu is only needed here)

  overview = parameter_overview.get_parameter_overview(abstract_params, include_stats=False)
  log.info("parameters:\n%s", overview)

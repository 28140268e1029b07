"""The trainer's compiled programs, built from a config, a mesh and a dataset's size alone.

`TrainPrograms(c, mesh, num_records)` holds what every stage's train step and the held-out
eval step are made of (model, schedule, optimizer, shardings, abstract state and batch);
`lower_step(side)` / `lower_eval()` trace them over abstract arguments. The trainer calls
them on the devices it runs on; `python -m npp_jax.aot` calls the same functions on
compile-only devices of a named topology, so what is checked is what runs.
"""

import dataclasses
import functools
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from npp_jax import config_lib, npp, sharding, train_step
from npp_jax.accelerators import hardware
from npp_jax.data import pipeline
from npp_jax.models import gpt_flops
from npp_jax.models.gpt import GPTConfig

log = logging.getLogger("npp_jax.programs")

# Training images of ImageNet-1k: what `aot` plans for when no dataset is given.
IMAGENET_TRAIN_IMAGES = 1_281_167
# `fold_in(root_key, FRESH_INIT)` seeds the parameters of a fresh run (a stream the
# per-step keys fold_in(root_key, step) never reach).
FRESH_INIT = 1 << 30


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

  @property
  def stage_epochs(self) -> tuple[int, ...]:
    """Epochs spent in each stage."""
    ends = self.stage_end_epochs
    return tuple(e - s for s, e in zip((0, *ends[:-1]), ends, strict=True))

  def stage(self, step: int) -> int:
    return npp.stage_of_step(step, self.steps_per_epoch, self.stage_end_epochs)

  def flops_until(self, step: int) -> int:
    """Training FLOPs of steps [0, step)."""
    total, start = 0, 0
    for end, flops in zip(self.stage_end_steps, self.stage_step_flops, strict=True):
      total += max(0, min(step, end) - start) * flops
      start = end
    return total


def plan_run(c: ml_collections.ConfigDict, num_devices: int, num_records: int | None) -> Plan:
  """The run's step schedule; checks the config against the devices first.

  Every problem is a ValueError naming the value and the fix, before anything compiles.
  With `num_records=None` (no dataset yet) steps are counted per epoch of one step.
  """
  config_lib.check_mode(c)
  config_lib.check_training(c, num_devices)
  cfg = config_lib.gpt_config(c)
  gb = c.train.global_batch_size
  sides = npp.patch_sides(c.train.patch_level)
  ends = npp.stage_boundaries(c.train.epochs, c.train.patch_level, c.train.epoch_rate)
  step_flops = tuple(gpt_flops.train_step_flops(cfg, s, gb) for s in sides)
  spe = 1 if num_records is None else pipeline.steps_per_epoch(num_records, gb)
  return Plan(spe, tuple(sides), tuple(ends), ends[-1] * spe, step_flops)


class TrainPrograms:
  """The train step of every stage and the held-out eval step, for one mesh.

  Nothing here touches data or real parameters: the state and batches are described by
  their shapes and shardings, so the programs compile on any devices, real or abstract.
  """

  def __init__(
    self, c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_records: int | None
  ):
    self.c, self.mesh = c, mesh
    self.cfg: GPTConfig = config_lib.train_gpt_config(c)
    self.plan = plan_run(c, mesh.size, num_records)
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
    self.batch_sharding = sharding.batch_sharding(mesh)
    init = functools.partial(train_step.init_state, self.cfg, self.tx, ema=c.train.ema_decay > 0)
    boxed = jax.eval_shape(init, jax.random.key(0))
    self.state_sharding = sharding.logical_sharding(boxed, mesh)
    self.abstract_state = train_step.unboxed(boxed)
    self.init = jax.jit(lambda k: train_step.unboxed(init(k)), out_shardings=self.state_sharding)
    self._steps: dict[int, Any] = {}

  @property
  def global_batch(self) -> int:
    return self.c.train.global_batch_size

  def sharded_state(self) -> Any:
    """The train state's ShapeDtypeStructs with their shardings (the restore target)."""
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.abstract_state,
      self.state_sharding,
    )

  def abstract_batch(self, rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    rows = rows or self.global_batch
    sds = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32, sharding=self.batch_sharding)
    return {"tokens": sds((rows, self.cfg.seq_len)), "label": sds((rows,))}

  def step(self, patch_side: int) -> Any:
    """The jitted (not yet compiled) train step of one stage; the state is donated."""
    if patch_side not in self._steps:
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
      self._steps[patch_side] = jax.jit(
        fn,
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
        donate_argnums=0,
      )
    return self._steps[patch_side]

  def lower_step(self, patch_side: int) -> jax.stages.Lowered:
    with sharding.activation_sharding(self.mesh):
      return self.step(patch_side).lower(self.sharded_state(), self.abstract_batch())

  def eval_step(self) -> Any:
    """The held-out next-token loss of one batch (params only)."""
    if not hasattr(self, "_eval"):
      self._eval = jax.jit(
        functools.partial(train_step.ntp_loss, cfg=self.cfg),
        in_shardings=(self.state_sharding.params, self.batch_sharding),
        out_shardings=sharding.replicated(self.mesh),
      )
    return self._eval

  def lower_eval(self) -> jax.stages.Lowered:
    params = self.sharded_state().params
    with sharding.activation_sharding(self.mesh):
      return self.eval_step().lower(params, self.abstract_batch())


# -- memory -------------------------------------------------------------------------
# A program "fits" when its compiled memory is at most this share of the chip's memory
# (the runtime, its buffers and fragmentation need the rest).
HEADROOM = 0.95


class ProgramTooLargeError(ValueError):
  """A compiled program needs more memory than the device has."""


class CompilerOutOfMemoryError(ValueError):
  """The compiler refused a program for memory (libtpu does, over a chip's HBM, where the
  GPU compiler returns the program); sizes in bytes, None where the message names none."""

  def __init__(self, message: str, required: int | None, available: int | None):
    super().__init__(message)
    self.required, self.available = required, available


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = r"([\d.]+)([KMGT]?)i?B?"
# libtpu's wordings: "the total memory required for HLO temporaries (18.80G) exceeds
# available HBM (15.75G)" and "Used 20.50G of 15.48G hbm".
_OOM_PATTERNS = (
  re.compile(rf"required[^(]*\({_SIZE}\)[^(]*available[^(]*\({_SIZE}\)"),
  re.compile(rf"Used {_SIZE} of {_SIZE}"),
)


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


# XLA's GPU compiler fails some GEMMs in its Triton tiling (GPT-3B's attention output
# projection, 8192x3200 by 3200x3200: "Couldn't find output tile sizes ..."); with Triton
# GEMMs off they go to cuBLAS and compile.
TRITON_TILING_FAULT = "Couldn't find output tile sizes"
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def compile_program(lowered: jax.stages.Lowered, notes: list[str] | None = None) -> Any:
  """`lowered.compile()`, with the compiler's out-of-memory refusal as
  CompilerOutOfMemoryError (one line, the sizes it names), and XLA GPU's Triton tiling
  fault retried with cuBLAS GEMMs (said in `notes` and the log)."""
  try:
    try:
      return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if TRITON_TILING_FAULT not in str(e):
        raise
      note = ", ".join(f"{k}={v}" for k, v in CUBLAS_GEMMS.items())
      log.warning("XLA's Triton GEMM tiling failed; compiling with %s", note)
      if notes is not None:
        notes.append(note)
      return lowered.compile(compiler_options=CUBLAS_GEMMS)
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    line = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])
    for pattern in _OOM_PATTERNS:
      m = pattern.search(text)
      if m:
        n = m.groups()
        raise CompilerOutOfMemoryError(line, _bytes(*n[:2]), _bytes(*n[2:])) from None
    raise CompilerOutOfMemoryError(line, None, None) from None


def memory_per_chip(compiled: Any) -> dict[str, int] | None:
  """Bytes one chip needs for a compiled program: arguments, outputs (less what aliases
  donated arguments), temporaries and code; None where the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (not every backend reports memory)
    return None
  if m is None:
    return None
  out = {
    "argument": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes) - int(m.alias_size_in_bytes),
    "temp": int(m.temp_size_in_bytes),
    "code": int(m.generated_code_size_in_bytes),
  }
  out["total"] = sum(out.values())
  return out


def memory_limit(c: ml_collections.ConfigDict, device: Any) -> int | None:
  """Bytes a program may use on `device`: `train.device_memory_gib` when set, else the
  runtime's limit or the chip's data sheet, less the headroom (None: unknown, no check)."""
  if c.train.device_memory_gib > 0:
    return int(c.train.device_memory_gib * hardware.GIB)
  total = hardware.memory_bytes(device)
  return None if total is None else int(total * HEADROOM)


def fits(compiled: Any, limit: int | None) -> bool:
  mem = memory_per_chip(compiled)
  return limit is None or mem is None or mem["total"] <= limit


def compiles_within(lowered: jax.stages.Lowered, limit: int | None) -> Any:
  """The compiled program when the compiler accepts it and it fits in `limit` bytes per
  chip, else None."""
  try:
    compiled = compile_program(lowered)
  except CompilerOutOfMemoryError:
    return None
  return compiled if fits(compiled, limit) else None


# Ways to make a stage fit, cheapest first: sharding the state over the data axis costs
# communication only, accumulation costs per-step efficiency, rematerialisation FLOPs.
FIT_CANDIDATES: tuple[dict[str, Any], ...] = (
  {"mesh.fsdp": -1, "mesh.data": 1},
  {"train.grad_accum_steps": 2},
  {"model.remat": "dots"},
  {"train.grad_accum_steps": 4},
  {"model.remat": "dots", "mesh.fsdp": -1, "mesh.data": 1},
  {"model.remat": "full"},
  {"train.grad_accum_steps": 8},
  {"model.remat": "full", "mesh.fsdp": -1, "mesh.data": 1},
  {"model.remat": "full", "train.grad_accum_steps": 4},
)


def with_overrides(c: ml_collections.ConfigDict, overrides: dict[str, Any]) -> Any:
  """A copy of `c` with dotted keys set."""
  out = ml_collections.ConfigDict(c.to_dict())
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = out
    for k in path:
      node = node[k]
    node[last] = value
  return out


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
  node = c
  for k in key.split("."):
    node = node[k]
  return node


def overrides_text(overrides: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def first_fitting(
  c: ml_collections.ConfigDict,
  devices: Any,
  patch_side: int,
  limit: int,
  num_records: int | None,
  candidates=FIT_CANDIDATES,
) -> tuple[dict[str, Any], Any] | None:
  """(overrides, compiled) of the first candidate whose stage `patch_side` fits in `limit`
  bytes per chip, compiling each in turn; None when none does."""
  devices = list(devices)
  base = sharding.mesh_shape(c.mesh.to_dict(), len(devices))
  tried = []
  for overrides in candidates:
    trial = with_overrides(c, overrides)
    try:
      shape = sharding.mesh_shape(trial.mesh.to_dict(), len(devices))
    except ValueError:
      continue
    # Settings that change nothing (fsdp when the data axis is already 1) are skipped.
    changed = {k: v for k, v in overrides.items() if not k.startswith("mesh.")}
    changed = {k: v for k, v in changed.items() if _get(c, k) != v}
    if shape != base:
      changed |= {k: v for k, v in overrides.items() if k.startswith("mesh.")}
    if not changed or changed in tried:
      continue
    tried.append(changed)
    overrides = changed
    try:
      mesh = sharding.make_mesh(trial.mesh.to_dict(), devices)
      lowered = TrainPrograms(trial, mesh, num_records).lower_step(patch_side)
    except ValueError:
      continue  # e.g. an accumulation that does not divide the per-device batch
    compiled = compiles_within(lowered, limit)
    if compiled is not None:
      return overrides, compiled
  return None


def check_fits(
  compiled: Any,
  limit: int | None,
  c: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  patch_side: int,
  num_records: int | None,
) -> None:
  """Raises ProgramTooLargeError (one line) when the stage's compiled step needs more than
  `limit` bytes per chip, naming the cheapest overrides found to fit (compile-only)."""
  mem = memory_per_chip(compiled)
  if limit is None or mem is None or mem["total"] <= limit:
    return
  raise stage_too_large(mem["total"], limit, c, mesh, patch_side, num_records)


def stage_too_large(
  needed: int | None,
  limit: int | None,
  c: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  patch_side: int,
  num_records: int | None,
) -> ProgramTooLargeError:
  """The one-line refusal of stage `patch_side` (`needed` bytes per chip against `limit`),
  naming the cheapest overrides found to fit (compile-only)."""
  gib = lambda n: "?" if n is None else f"{n / hardware.GIB:.2f}"
  found = first_fitting(c, mesh.devices.flat, patch_side, limit, num_records)
  fix = (
    f"{overrides_text(found[0])} fits ({gib(total_memory(found[1]))} GiB)"
    if found
    else "no single override found fits: lower train.global_batch_size or use more chips"
  )
  return ProgramTooLargeError(
    f"the train step of patch side {patch_side} needs {gib(needed)} GiB per "
    f"chip but {mesh.devices.flat[0].device_kind} allows {gib(limit)} GiB "
    f"(global batch {c.train.global_batch_size}, mesh {dict(mesh.shape)}): {fix}; "
    "`python -m npp_jax.aot --fit` plans every stage."
  )


def total_memory(compiled: Any) -> int | None:
  mem = memory_per_chip(compiled)
  return None if mem is None else mem["total"]

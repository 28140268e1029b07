"""Training checkpoints: orbax CheckpointManager holding the train state, data iterator and meta.

A checkpoint at step N holds everything needed to continue exactly: params, optimizer
state, EMA, step, the grain iterator position, the NPP stage and the config. Saves
are asynchronous; orbax commits a step atomically, so a run killed mid-save leaves the
previous checkpoints intact.
"""

import json
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Config entries that change shapes or the step -> (stage, data) mapping: a checkpoint
# written under other values cannot be continued.
FIXED_KEYS = (
  "model.dim",
  "model.n_layer",
  "model.n_head",
  "model.n_kv_head",
  "model.vocab_size",
  "model.num_classes",
  "model.grid",
  "model.multiple_of",
  "model.ffn_dim_multiplier",
  "model.class_dropout_prob",
  "train.global_batch_size",
  "train.epochs",
  "train.patch_level",
  "train.epoch_rate",
  "train.ema_decay",
  "seed",
)


def _lookup(cfg: dict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def config_conflicts(saved: dict, current: dict) -> list[str]:
  """`key: saved -> current` for every FIXED_KEYS entry that differs."""
  out = []
  for key in FIXED_KEYS:
    a, b = _lookup(saved, key), _lookup(current, key)
    if a != b:
      out.append(f"{key}: checkpoint {a!r}, config {b!r}")
  return out


class Checkpointer:
  """Saves and restores (state, data iterator, meta) under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data", "meta")
    )

  def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
    )
    self.manager.save(step, args=args, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any, data_iter: Any, config: dict):
    """Restores the newest readable checkpoint; returns (step, state, meta) or None.

    A checkpoint that fails to load (truncated, corrupt) is reported and skipped in
    favour of the one before it. A checkpoint written under a config that changes
    shapes or the schedule is refused with the list of conflicting keys.
    """
    steps = self.steps()
    unreadable = []
    for step in reversed(steps):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
      except Exception as e:  # noqa: BLE001 (orbax raises many kinds for damaged files)
        log.warning(
          "checkpoint %d in %s is unreadable (%s); trying the previous one.",
          step,
          self.directory,
          _short(e),
        )
        unreadable.append(step)
        continue
      conflicts = config_conflicts(meta.get("config", {}), config)
      if conflicts:
        raise ValueError(
          f"the checkpoint at step {step} in {self.directory} was written with another "
          "configuration and cannot be continued with this one:\n  "
          + "\n  ".join(conflicts)
          + "\nUse the original values, or a new --workdir to start a fresh run."
        )
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
          ),
        )
      except Exception as e:  # noqa: BLE001
        log.warning(
          "checkpoint %d in %s could not be restored (%s: %s); trying the previous one.",
          step,
          self.directory,
          type(e).__name__,
          _short(e),
        )
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      return step, restored["state"], meta
    if steps:
      log.warning("no readable checkpoint in %s: starting from scratch.", self.directory)
      self._set_aside(unreadable)
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the way (kept for inspection, never deleted)."""
    if not steps or jax.process_index() != 0:
      return
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f"{step}-{int(time.time())}")
      shutil.move(os.path.join(self.directory, str(step)), target)
      log.warning("moved unreadable checkpoint %d to %s", step, target)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_sharding(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (what StandardRestore lays out)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _short(e: Exception, limit: int = 300) -> str:
  text = str(e)
  return text if len(text) <= limit else text[:limit] + " ..."


def config_to_dict(config: Any) -> dict:
  """A JSON-safe dict of an ml_collections config."""
  return (
    json.loads(config.to_json_best_effort())
    if hasattr(config, "to_json_best_effort")
    else json.loads(json.dumps(config, default=str))
  )

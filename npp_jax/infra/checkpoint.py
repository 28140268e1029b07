"""Training checkpoints: orbax CheckpointManager holding the train state, data iterator and meta.

A checkpoint at step N holds everything needed to continue exactly: params, optimizer
state, EMA, step, the grain iterator position, the NPP stage, the config, the dataset's
shape and a fingerprint of the state. Saves are asynchronous; orbax commits a step
atomically, so a run killed mid-save leaves the previous checkpoints intact.

Restoring tells two failures apart:
- the checkpoint does not fit this run (another model, optimizer, schedule or dataset):
  refused with the settings that differ, nothing moved;
- the checkpoint is damaged (unreadable, or its fingerprint does not match what was
  saved): set aside in `checkpoints_unreadable/` and the previous one is used.
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from npp_jax.infra import storage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
  """What of the dataset fixes the step -> (epoch, record) mapping and the shapes: a
  checkpoint is continued only on a dataset with the same record."""

  num_records: int
  grid: int
  vocab_size: int
  num_classes: int
  n_aug: int
  steps_per_epoch: int
  extractions: int


DATASET_KEYS = tuple(f.name for f in dataclasses.fields(DatasetRecord))

# orbax's replica-parallel save (each replica of a replicated array writes a slice of it)
# pays off for large arrays spread over hosts; a small array's slices cost a compiled
# program per device each (216 programs, 2-3 s, on the demo model's first save) and save
# nothing. Below this many bytes per slice, one replica writes the whole array.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but was written by a run this config cannot continue."""


def _lookup(cfg: dict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
  out = {}
  for k, v in cfg.items():
    if isinstance(v, dict):
      out |= flatten(v, f"{prefix}{k}.")
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_conflicts(saved: dict, current: dict, keys: Sequence[str]) -> list[str]:
  """`key: saved -> current` for every one of `keys` that differs."""
  out = []
  for key in keys:
    a, b = _lookup(saved, key), _lookup(current, key)
    if a != b:
      out.append(f"{key}: checkpoint {a!r}, config {b!r}")
  return out


def config_changes(saved: dict, current: dict) -> list[str]:
  """Every config key whose value differs (the candidates when the state does not fit)."""
  a, b = flatten(saved), flatten(current)
  return [
    f"{k}: checkpoint {a.get(k)!r}, config {b.get(k)!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k) and not k.startswith(("sample.", "eval.", "extract."))
  ]


def dataset_conflicts(saved: dict | None, current: dict) -> list[str]:
  """`dataset.key: saved -> current` for every DATASET_KEYS entry that differs."""
  if not saved:  # checkpoints written before the dataset was recorded
    return []
  return [
    f"dataset {k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
    for k in DATASET_KEYS
    if k in saved and saved.get(k) != current.get(k)
  ]


def _as_words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (16-bit types widened, bools as 0/1)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if x.dtype.itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"cannot fingerprint arrays of dtype {x.dtype}")


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> jax.Array:
  # A sum over leaves, so that the digest does not depend on how a reader's tree orders
  # them (a TrainState and the dict read back without a target hold the same arrays).
  total = jnp.uint32(0)
  for x in leaves:
    words = _as_words(x)
    # Position- and leaf-dependent odd weights: a changed, swapped or moved word changes
    # the wrapping uint32 sum (which does not depend on the reduction order). Positions
    # come from iotas in the array's own shape, so a sharded array is never gathered.
    pos, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for d in reversed(range(x.ndim)):
      iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
      pos, stride = pos + iota * jnp.uint32(stride & 0xFFFFFFFF), stride * x.shape[d]
    salt = jnp.uint32((x.size * 40503 + x.ndim) & 0xFFFFFFFF)
    weights = (pos * jnp.uint32(2654435761) + salt) | 1
    total = total + jnp.sum(words * weights, dtype=jnp.uint32)
  return total


def fingerprint(tree: Any) -> int:
  """A 32-bit digest of every bit of `tree`'s arrays, computed where they live."""
  digest = _fingerprint(jax.tree.leaves(tree))
  # A replicated scalar: every process reads its own copy (a global fetch would fail on
  # several hosts).
  return int(np.asarray(digest.addressable_data(0)))


def _key_str(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a tree of arrays, ShapeDtypeStructs or orbax array metadata."""
  return {
    "/".join(_key_str(k) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if hasattr(leaf, "shape")
  }


def tree_mismatch(saved: Any, abstract: Any, limit: int = 4) -> list[str]:
  """Differences between the state a checkpoint holds and the state this run builds."""
  a, b = leaf_shapes(saved), leaf_shapes(abstract)
  out = [f"only in the checkpoint: {k}" for k in sorted(set(a) - set(b))[:limit]]
  out += [f"only in this run: {k}" for k in sorted(set(b) - set(a))[:limit]]
  out += [
    f"{k}: checkpoint {a[k]}, this run {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]
  ][:limit]
  return out


def saved_steps(workdir: str) -> list[int]:
  """Steps of the checkpoint folders in WORKDIR/checkpoints (intact or not), unopened."""
  directory = storage.join(storage.absolute(workdir), "checkpoints")
  if not storage.exists(directory):
    return []
  return sorted(int(d) for d in storage.listdir(directory) if d.isdigit())


class Checkpointer:
  """Saves and restores (state, data iterator, meta) under WORKDIR/checkpoints."""

  def __init__(
    self,
    workdir: str,
    keep: int = 3,
    async_save: bool = True,
    every: int = 0,
    at: tuple[int, ...] = (),
    fixed_keys: Sequence[str] = (),
  ):
    """Keeps the newest `keep` checkpoints; `should_save` is true every `every` steps and
    at the steps `at` (the stage ends and the last step). A checkpoint whose config differs
    in one of `fixed_keys` (flat `section.key` names) is refused on restore."""
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints={keep} must be >= 1.")
    self.directory = storage.join(storage.absolute(workdir), "checkpoints")
    self.fixed_keys = tuple(fixed_keys)
    policies = [ocp.checkpoint_managers.SpecificStepsPolicy(frozenset(at))]
    if every > 0:
      policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
      # The decision is the step's alone: a save still in flight does not skip this one.
      enable_should_save_is_saving_in_progress_check=False,
      create=True,
      enable_async_checkpointing=async_save,
      # A save that storage does not take ends the job instead of hanging it.
      async_options=ocp.AsyncOptions(timeout_secs=int(storage.DEADLINE_S)),
    )
    # Handlers are named up front so that a checkpoint's metadata (the state's tree of
    # shapes) can be read before anything is restored.
    handlers = {
      "state": _state_handler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self.manager = _read(
      self.directory, ocp.CheckpointManager, self.directory, options=options, item_handlers=handlers
    )

  def should_save(self, step: int) -> bool:
    """Whether the save policy asks for a checkpoint at `step`."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Saves `state` at `step` with its fingerprint, so that restore can verify it."""
    parts = part_fingerprints(state)
    # The whole state's fingerprint is a wrapping sum over leaves: the parts' sum.
    rest = fingerprint((state.step, state.opt_state))
    total = (sum(parts.values()) + rest) % 2**32
    meta = {**meta, "fingerprint": total, "fingerprints": parts}
    args = ocp.args.Composite(
      state=ocp.args.PyTreeSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
    )
    with self._storage_failures(f"saving step {step}"):
      # orbax's save waits on the bucket (its folders) before it goes asynchronous.
      storage.call_with_deadline(
        "save a checkpoint", self.directory, lambda: self.manager.save(step, args=args, force=True)
      )

  @contextlib.contextmanager
  def _storage_failures(self, what: str):
    """orbax's errors from a bucket (tensorstore's, or its async timeout) and a full disk
    anywhere as StorageError: the job stops on them with one line, as on every other
    storage failure."""
    try:
      yield
    except Exception as e:
      if storage.disk_full(e):
        raise storage.StorageError(f"{what} in {self.directory} failed: the disk is full") from None
      if not storage.is_remote(self.directory) or isinstance(e, storage.StorageError):
        raise
      raise storage.StorageError(f"{what} in {self.directory} failed: {_short(e)}") from e

  def steps(self) -> list[int]:
    return sorted(_read(self.directory, self.manager.all_steps))

  def restore_latest(self, abstract_state: Any, data_iter: Any, config: dict, dataset: dict):
    """Restores the newest intact checkpoint; returns (step, state, meta) or None.

    A checkpoint this run cannot continue raises CheckpointMismatchError naming the
    settings that differ, and nothing is moved. A damaged one is set aside and the one
    before it is tried. The data iterator is restored only with the state it belongs
    to; after a failed attempt it is back at the start.
    """
    steps = self.steps()
    damaged = []
    initial = data_iter.get_state()
    read = functools.partial(_read, self.directory)
    for step in reversed(steps):
      try:
        meta = read(self.manager.restore, step, args=_META)["meta"]
        saved_tree = read(self.manager.item_metadata, step)["state"]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        if not leaf_shapes(saved_tree):
          raise ValueError("the checkpoint's state metadata lists no arrays")
      except storage.StorageError:
        raise
      except Exception as e:  # noqa: BLE001 (orbax raises many kinds for damaged files)
        self._damaged(damaged, step, e)
        continue
      self._check_fits(step, meta, saved_tree, abstract_state, config, dataset)
      # The state and the data position in one composite restore; the meta and the
      # state's tree were read first, to refuse a checkpoint of other settings by name.
      args = ocp.args.Composite(
        state=_pytree_restore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
      )
      try:
        state = read(self.manager.restore, step, args=args)["state"]
        _verify(state, meta)
      except storage.StorageError:
        raise
      except IndexError as e:  # grain: a data position past the end of the dataset
        data_iter.set_state(initial)
        raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} records a data position this "
          f"dataset does not have ({e}): its data/ item was edited or comes from another "
          f"run; restore the original, or move {self.directory}/{step} aside to resume "
          "from the checkpoint before it."
        ) from None
      except Exception as e:  # noqa: BLE001 (orbax raises many kinds for damaged files)
        data_iter.set_state(initial)
        self._damaged(damaged, step, e)
        continue
      self._set_aside(damaged)
      return step, state, meta
    if steps:
      log.warning("no intact checkpoint in %s: starting from scratch.", self.directory)
      self._set_aside(damaged)
    return None

  def _check_fits(self, step, meta, saved_tree, abstract_state, config, dataset) -> None:
    where = f"the checkpoint at step {step} in {self.directory}"
    fix = "Use the original settings, or a new --workdir to start a fresh run."
    conflicts = config_conflicts(meta.get("config", {}), config, self.fixed_keys)
    conflicts += dataset_conflicts(meta.get("dataset"), dataset)
    if conflicts:
      raise CheckpointMismatchError(
        f"{where} was written with another configuration or dataset and cannot be "
        "continued with this one:\n  " + "\n  ".join(conflicts) + f"\n{fix}"
      )
    mismatch = tree_mismatch(saved_tree, abstract_state)
    if mismatch:
      changes = config_changes(meta.get("config", {}), config) or ["(no config key differs)"]
      raise CheckpointMismatchError(
        f"{where} holds a train state of another structure (the optimizer or model "
        "settings changed):\n  "
        + "\n  ".join(mismatch)
        + "\nSettings that differ:\n  "
        + "\n  ".join(changes)
        + f"\n{fix}"
      )

  def _damaged(self, damaged: list[int], step: int, e: Exception) -> None:
    _warn_damaged(self.directory, step, e)
    damaged.append(step)

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the way (kept for inspection, never deleted)."""
    if not steps or jax.process_index() != 0:
      return
    aside = storage.join(os.path.dirname(self.directory), "checkpoints_unreadable")
    storage.makedirs(aside)
    for step in steps:
      target = storage.join(aside, f"{step}-{int(time.time())}")
      storage.move(storage.join(self.directory, str(step)), target)
      log.warning("moved damaged checkpoint %d to %s", step, target)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    with self._storage_failures("finishing the last save"):
      storage.call_with_deadline("finish a checkpoint", self.directory, self.manager.close)


_META = ocp.args.Composite(meta=ocp.args.JsonRestore())


def _read(directory: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """fn(*args, **kwargs), an orbax read of `directory`, within the storage deadline. A
  read that fails because the bucket does not answer is a StorageError, never a damaged
  checkpoint: a damaged one is set aside, and storage briefly gone must not move good ones."""
  try:
    return storage.call_with_deadline("read a checkpoint", directory, lambda: fn(*args, **kwargs))
  except storage.StorageError:
    raise
  except Exception:
    if storage.is_remote(directory):
      storage.listdir(directory)  # StorageError when the bucket does not answer either
    raise


def restore_weights(
  directory: str, use_ema: bool, shardings: Callable[[Any], Any]
) -> tuple[int, Any, str, dict]:
  """(step, weights, "ema" | "raw", meta) of the newest checkpoint in `directory` that
  reads back intact; for readers (sampling), so nothing is moved.

  Only the EMA weights (when `use_ema` and the run kept them) or the raw params are read,
  not the optimizer state, each laid out by `shardings(abstract_weights)` (the mesh's
  rules), so a model that does not fit one chip is never gathered on one. A checkpoint
  whose meta has per-part fingerprints is verified on the part read; an older one (a
  single fingerprint of the whole state) on the whole state, read spread over devices.
  """
  read = functools.partial(_read, directory)
  with _reader(directory) as mngr:
    steps = sorted(read(mngr.all_steps), reverse=True)
    if not steps:
      raise FileNotFoundError(
        f"no training checkpoint in {directory}: train first, or set "
        "--config.sample.checkpoint to converted params (or a .pt file)."
      )
    for step in steps:  # newest first; a damaged one is logged and the one before tried
      try:
        saved = read(mngr.item_metadata, step)["state"]
        saved = getattr(saved, "tree", saved)
        part = "ema" if use_ema and _has_arrays(saved.get("ema")) else "params"
        meta = read(mngr.restore, step, args=_META)["meta"]
        parts = meta.get("fingerprints")
        if parts is None and meta.get("fingerprint") is not None:
          target = jax.tree.map(_spread_over_devices, saved)  # verify the whole, as written
          args = ocp.args.Composite(state=_pytree_restore(target))
          got = read(mngr.restore, step, args=args)
          _verify(got["state"], meta)
          weights = jax.device_put(got["state"][part], shardings(got["state"][part]))
        else:
          target = {part: _with_shardings(saved[part], shardings)}
          args = ocp.args.Composite(state=_pytree_restore(target, partial=True))
          weights = read(mngr.restore, step, args=args)["state"][part]
          if parts is not None and fingerprint(weights) != parts.get(part):
            raise ValueError(f"the restored {part} do not match the fingerprint saved with them")
        return step, weights, "ema" if part == "ema" else "raw", meta
      except (CheckpointMismatchError, storage.StorageError):
        raise
      except Exception as e:  # noqa: BLE001 (orbax raises many kinds for damaged files)
        _warn_damaged(directory, step, e)
  raise ValueError(f"every checkpoint in {directory} is damaged: train again or sample another.")


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """What StandardCheckpointHandler is (same files, same limits), with replica-parallel
  saving only for slices of MIN_REPLICA_SLICE_BYTES or more."""
  th = ocp.type_handlers
  arrays = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  registry = th.create_type_handler_registry(
    (jax.Array, arrays),
    (np.ndarray, th.NumpyHandler()),
    *((t, th.ScalarHandler()) for t in (int, float, np.number)),
  )
  return ocp.PyTreeCheckpointHandler(
    save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry
  )


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager over a training run's checkpoints. Every item is named (the data
  iterator's too, though readers never restore it) so that orbax does not warn about it."""
  handlers = {
    "state": ocp.PyTreeCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }
  options = ocp.CheckpointManagerOptions(create=False)
  return _read(directory, ocp.CheckpointManager, directory, options=options, item_handlers=handlers)


def newest_meta(directory: str) -> tuple[int, dict] | None:
  """(step, meta) of the newest checkpoint in `directory` whose meta reads back (the config
  and dataset the run was trained with), or None when there is none; nothing is moved."""
  if not storage.exists(directory):
    return None
  with _reader(directory) as mngr:
    for step in sorted(_read(directory, mngr.all_steps), reverse=True):
      try:
        meta = _read(directory, mngr.restore, step, args=_META)["meta"]
      except storage.StorageError:
        raise
      except Exception as e:  # noqa: BLE001 (orbax raises many kinds for damaged files)
        _warn_damaged(directory, step, e)
        continue
      return step, meta
  return None


def _has_arrays(tree: Any) -> bool:
  return tree is not None and bool(jax.tree.leaves(tree))


def _with_shardings(saved: Any, shardings: Callable[[Any], Any]) -> Any:
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings(abstract)
  )


def _pytree_restore(target: Any, partial: bool = False) -> Any:
  restore_args = jax.tree.map(
    lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
    target,
  )
  return ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)


def part_fingerprints(state: Any) -> dict[str, int]:
  """Fingerprints of the params and EMA of a train state (what a sampler verifies)."""
  out = {"params": fingerprint(state.params)}
  if getattr(state, "ema", None) is not None:
    out["ema"] = fingerprint(state.ema)
  return out


def _spread_over_devices(meta: Any) -> jax.ShapeDtypeStruct:
  """A restore target on this machine's devices, whatever topology wrote the checkpoint
  (orbax refuses a restore without one across topologies): split along the first axis
  that divides over the devices, so that the optimizer state (twice the parameters) is
  not copied whole to every device; small arrays are replicated."""
  devices = np.asarray(jax.devices())
  axis = next((i for i, d in enumerate(meta.shape) if d % len(devices) == 0), None)
  spec = PartitionSpec() if axis is None else PartitionSpec(*[None] * axis, "all")
  sharding = NamedSharding(Mesh(devices, ("all",)), spec)
  return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)


class WorkdirBusyError(RuntimeError):
  """Another trainer holds the workdir."""


class WorkdirLock:
  """One trainer per workdir: an advisory lock on WORKDIR/train.lock, held by process 0.

  The operating system releases it when the process dies, so a killed or preempted run
  leaves no stale lock; the file names the owner for the error message. A bucket
  (`gs://`) has no such lock: there it is not enforced, and the log says so.
  """

  def __init__(self, workdir: str):
    self.path = storage.join(storage.absolute(workdir), "train.lock")
    self._file = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    if storage.is_remote(self.path):
      log.warning(
        "%s is in a bucket, where no lock can be held: make sure one trainer uses it.",
        os.path.dirname(self.path),
      )
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")  # noqa: SIM115 (held open for the lifetime of the lock)
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "unknown owner"
      f.close()
      raise WorkdirBusyError(
        f"another trainer is running in {os.path.dirname(self.path)} ({owner}); stop it or "
        "use another --workdir."
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.ctime()}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    return False


def abstract_with_sharding(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (what the restore lays out)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _verify(state: Any, meta: dict) -> None:
  """Raises ValueError unless `state` has the fingerprint saved with it (when one was)."""
  want = meta.get("fingerprint")
  if want is not None and fingerprint(state) != want:
    raise ValueError("the restored state does not match the fingerprint saved with it")


def _warn_damaged(directory: str, step: int, e: Exception) -> None:
  log.warning(
    "checkpoint %d in %s is damaged (%s: %s); trying the previous one.",
    step,
    directory,
    type(e).__name__,
    _short(e),
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

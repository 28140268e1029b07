"""Device mesh and logical-axis rules.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and `tensor` (model parallel over heads and
the FFN). Batches are split over data x fsdp.
"""

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

# Logical parameter / activation axis -> mesh axes.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("classes", None),
  ("norm", None),
  ("layers", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves a {data, fsdp, tensor} spec (one entry may be -1) against the device count."""
  sizes = [int(spec.get(a, 1)) for a in AXES]
  named = lambda: dict(zip(AXES, sizes, strict=True))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {named()}: sizes must be positive, at most one -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh {named()} cannot be filled from {num_devices} devices: "
        f"{num_devices} is not divisible by {known}."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh {named()} has {int(np.prod(sizes))} devices but {num_devices} are "
      "available; set one axis to -1 to fill the rest."
    )
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over all (or the given) devices with axes (data, fsdp, tensor), laid out by
  `jax.make_mesh` in the order that fits the hardware's interconnect (TPU torus, NVLink)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(spec, len(devices))  # a one-line error when the axes do not fit
  # Auto axes: the sharding is steered by in/out shardings and constraints (jax.make_mesh
  # would otherwise make them Explicit, a different programming model).
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
  """Inside: the model's logical activation constraints (the batch axis over data x fsdp)
  apply on `mesh`; outside they are no-ops (sampling, tests on one device)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    yield


def logical_sharding(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of boxed (logically partitioned) abstract values."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: Mapping[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """This host's rows of a token batch ({"tokens", "label"}) as global int32 arrays."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k], np.int32))
    for k in ("tokens", "label")
  }


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(row indices, rows) of a batch-sharded array that this host's devices hold, in row
  order (each row once, however many devices hold a replica of it)."""
  by_start: dict[int, jax.Shard] = {}
  for shard in x.addressable_shards:
    by_start.setdefault(shard.index[0].start or 0, shard)
  starts = sorted(by_start)
  rows = [np.arange(s, s + by_start[s].data.shape[0]) for s in starts]
  values = [np.asarray(by_start[s].data) for s in starts]
  return np.concatenate(rows), np.concatenate(values)

"""Accelerator facts: peak matmul rate, memory, memory and interconnect bandwidth per chip.

Used for model FLOPs utilisation (MFU: achieved model FLOP/s over peak), for the roofline
time estimates of `python -m npp_jax.aot`, and to tell whether a compiled program fits a
chip. Figures are the vendors' data sheets: dense bf16 matmul TFLOP/s (no sparsity), HBM
per chip, HBM bandwidth, and the chip's interconnect bandwidth (TPU ICI, all links; NVIDIA
NVLink, one direction). A device kind not listed (CPUs, say) has no entry, and MFU and
the memory check are then left out, not guessed.
"""

import dataclasses
from typing import Any

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's data-sheet figures."""

  name: str
  peak_bf16_tflops: float
  hbm_gib: float
  hbm_gb_per_s: float
  interconnect_gb_per_s: float
  # NVIDIA only: SM count, compute capability and clock for the compile-only target config.
  sm_count: int = 0
  compute_capability: tuple[int, int] = (0, 0)
  clock_ghz: float = 0.0


# Matched as substrings of `device.device_kind`, first match wins (so "TPU v5 lite", the
# v5e, comes before "TPU v5", the v5p).
CHIPS: tuple[tuple[str, Chip], ...] = (
  ("H200", Chip("H200", 989.0, 139.8, 4800.0, 450.0, 132, (9, 0), 1.98)),
  ("H100", Chip("H100", 989.0, 79.1, 3350.0, 450.0, 132, (9, 0), 1.98)),
  ("A100", Chip("A100", 312.0, 80.0, 2039.0, 300.0, 108, (8, 0), 1.41)),
  ("TPU v6 lite", Chip("v6e", 918.0, 32.0, 1640.0, 448.0)),
  ("TPU v6e", Chip("v6e", 918.0, 32.0, 1640.0, 448.0)),
  ("TPU v5 lite", Chip("v5e", 197.0, 16.0, 819.0, 200.0)),
  ("TPU v5e", Chip("v5e", 197.0, 16.0, 819.0, 200.0)),
  ("TPU v5p", Chip("v5p", 459.0, 95.0, 2765.0, 600.0)),
  ("TPU v5", Chip("v5p", 459.0, 95.0, 2765.0, 600.0)),
  ("TPU v4", Chip("v4", 275.0, 32.0, 1228.0, 300.0)),
)
# Kept for callers of the peak table alone.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = tuple(
  (kind, spec.peak_bf16_tflops) for kind, spec in CHIPS
)


def chip(device: Any = None) -> Chip | None:
  """The data sheet of `device` (default: the first device), or None if unknown."""
  kind = getattr(device or jax.devices()[0], "device_kind", "")
  return next((spec for name, spec in CHIPS if name.lower() in kind.lower()), None)


def peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of one `device` (default: the first), or None if unknown."""
  spec = chip(device)
  return None if spec is None else spec.peak_bf16_tflops * 1e12


def memory_bytes(device: Any = None) -> int | None:
  """Memory one program may use on `device`: the runtime's limit where it reports one (a
  real accelerator), else the data sheet's HBM (abstract devices), else None (CPUs)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 (abstract and CPU devices have no memory stats)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  spec = chip(device)
  return None if spec is None else int(spec.hbm_gib * GIB)


def mfu(flops_per_sec: float, num_devices: int | None = None, device: Any = None) -> float | None:
  """Model FLOP/s over the bf16 peak of `num_devices` (default: all) chips; None if unknown."""
  peak = peak_flops(device)
  if peak is None:
    return None
  return flops_per_sec / (peak * (num_devices or jax.device_count()))

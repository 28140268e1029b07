"""Accelerator peaks, for model FLOPs utilisation (MFU): achieved model FLOP/s over peak.

Peaks are dense bf16 matmul TFLOP/s per chip from the vendors' data sheets (no sparsity).
A device kind not listed (CPUs, say) has no peak, and MFU is then left out, not guessed.
"""

from typing import Any

import jax

# Matched as substrings of `device.device_kind`, first match wins (so "TPU v5 lite", the
# v5e, comes before "TPU v5", the v5p).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
  ("H200", 989.0),
  ("H100", 989.0),
  ("A100", 312.0),
  ("TPU v6 lite", 918.0),
  ("TPU v6e", 918.0),
  ("TPU v5 lite", 197.0),
  ("TPU v5e", 197.0),
  ("TPU v5p", 459.0),
  ("TPU v5", 459.0),
  ("TPU v4", 275.0),
)


def peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of one `device` (default: the first), or None if unknown."""
  kind = getattr(device or jax.devices()[0], "device_kind", "")
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None


def mfu(flops_per_sec: float, num_devices: int | None = None, device: Any = None) -> float | None:
  """Model FLOP/s over the bf16 peak of `num_devices` (default: all) chips; None if unknown."""
  peak = peak_flops(device)
  if peak is None:
    return None
  return flops_per_sec / (peak * (num_devices or jax.device_count()))

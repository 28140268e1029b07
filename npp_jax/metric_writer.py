"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard event files, readable log lines with ETA.

TensorBoard files are written with tensorboardX (clu's writers import TensorFlow).
Only process 0 writes.
"""

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log.warning("tensorboardX is not installed: no TensorBoard event files.")

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = np.asarray(v).item() if not isinstance(v, str) else v
      row[k] = v
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (they belong to work lost in an interruption)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and _row_step(line) <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError):
    return -1


class Throughput:
  """Steps/s, images/s, tokens/s since the last call, and the ETA of the run.

  The ETA uses the recent rate: coarse NPP stages run much faster than the token stage,
  so an average over the whole run would promise too early a finish.
  """

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self._t = time.perf_counter()
    self._s = start_step

  def update(self, step: int, images_per_step: int, tokens_per_step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt, ds = max(now - self._t, 1e-9), step - self._s
    rate = ds / dt
    self._t, self._s = now, step
    return {
      "steps_per_sec": ds / dt,
      "images_per_sec": ds * images_per_step / dt,
      "tokens_per_sec": ds * tokens_per_step / dt,
      "eta_sec": (self.total - step) / rate if rate > 0 else float("nan"),
    }

"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard event files, readable log lines with ETA.

TensorBoard files are written with tensorboardX (clu's writers import TensorFlow).
Only process 0 writes.
"""

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from npp_jax.infra import storage

log = logging.getLogger(__name__)


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX loads it when it is
  installed (1.9 s and hundreds of MB per training job, for tensor types a JAX job never
  passes), so it is hidden during the import unless something loaded it already."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError; tensorboardX expects that
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


def format_duration(seconds: float) -> str:
  """`1h02m05s` or `3m07s`; `?` when unknown."""
  if not math.isfinite(seconds):
    return "?"
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

  Locally every row is appended and flushed at once. In a bucket an object cannot grow,
  so rows are kept and the file (and TensorBoard's event file, which tensorboardX also
  uploads whole) is uploaded at most every `upload_every_s` seconds, on `flush()` (the
  trainer flushes before each checkpoint, so no row of a checkpointed step is lost) and
  on `close()`.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, upload_every_s: float = 60.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = storage.join(storage.absolute(workdir), "metrics.jsonl")
    self.remote = storage.is_remote(self.path)
    self.upload_every_s = upload_every_s
    self._pending = ""  # rows not yet uploaded (bucket only)
    self._uploaded_at = time.monotonic()
    self._tb = None
    self._tb_dir = storage.join(storage.absolute(workdir), "tensorboard")
    # In a bucket the event file is written locally and uploaded through storage.py (with
    # its deadline): tensorboardX's own GCS writer retries for two minutes and uploads
    # again whenever Python collects it, at exit too.
    local = self.remote and self.enabled
    self._tb_local = tempfile.mkdtemp(prefix="npp_jax_tb_") if local else self._tb_dir
    if self.enabled:
      storage.makedirs(workdir)
      try:
        self._tb = _summary_writer_class()(self._tb_local)
      except ImportError:
        log.warning("tensorboardX is not installed: no TensorBoard event files.")

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = np.asarray(v).item() if not isinstance(v, str) else v
      row[k] = v
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
    if not self.remote:
      storage.append_text(self.path, json.dumps(row) + "\n")
      self._tensorboard("flush")
      return
    self._pending += json.dumps(row) + "\n"
    if time.monotonic() - self._uploaded_at >= self.upload_every_s:
      self.flush()

  def flush(self) -> None:
    """Writes out every row logged so far (in a bucket: one upload of each file)."""
    if not self.enabled:
      return
    if self._pending:
      storage.append_text(self.path, self._pending)
      self._pending = ""
    self._tensorboard("flush")
    self._uploaded_at = time.monotonic()

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (they belong to work lost in an interruption)."""
    if not self.enabled or not storage.exists(self.path):
      return
    lines = storage.read_text(self.path).splitlines(keepends=True)
    storage.write_text(self.path, "".join(x for x in lines if x.strip() and _row_step(x) <= step))

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._tensorboard("close")

  def _tensorboard(self, method: str) -> None:
    """Flushes or closes the event file; in a bucket uploads it (not once storage failed)."""
    if self._tb is None:
      return
    getattr(self._tb, method)()
    if not self.remote or storage.failed():
      return
    for name in sorted(os.listdir(self._tb_local)):
      storage.copy(os.path.join(self._tb_local, name), storage.join(self._tb_dir, name))
    if method == "close":
      shutil.rmtree(self._tb_local, ignore_errors=True)


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError):
    return -1


class Throughput:
  """Steps/s, images/s, tokens/s and FLOP/s since the last call."""

  def __init__(self, start_step: int, start_flops: float = 0.0):
    self._t = time.perf_counter()
    self._s, self._f = start_step, start_flops

  def update(
    self, step: int, images_per_step: int, tokens_per_step: int, flops: float = 0.0
  ) -> dict[str, float]:
    """Rates since the previous call; `flops` is the cumulative count at `step`."""
    now = time.perf_counter()
    dt, ds = max(now - self._t, 1e-9), step - self._s
    rates = {
      "steps_per_sec": ds / dt,
      "images_per_sec": ds * images_per_step / dt,
      "tokens_per_sec": ds * tokens_per_step / dt,
      "flops_per_sec": (flops - self._f) / dt,
    }
    self._t, self._s, self._f = now, step, flops
    return rates

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent on other work (held-out evaluation) out of the next rates."""
    self._t += seconds


class StageEta:
  """Time left in a staged run: each remaining stage's FLOPs over a measured FLOP rate.

  The coarse NPP stages are far cheaper per step than the token stage, so extrapolating
  the current stage's step rate would promise far too early a finish. A stage that has
  run is estimated at its own measured FLOP rate; one still to come at the latest rate
  measured (refined once it runs).
  """

  def __init__(self, stage_end_steps: tuple[int, ...], stage_step_flops: tuple[float, ...]):
    self.ends, self.flops = stage_end_steps, stage_step_flops
    self.rates: dict[int, float] = {}
    self._latest = 0.0

  def observe(self, stage: int, flops_per_sec: float) -> None:
    if flops_per_sec > 0:
      self.rates[stage] = self._latest = flops_per_sec

  def seconds_left(self, step: int, total_steps: int) -> float:
    if not self._latest:
      return float("nan")
    left, start = 0.0, 0
    for k, (end, flops) in enumerate(zip(self.ends, self.flops, strict=True)):
      end = min(end, total_steps)
      steps = max(0, end - max(start, step))
      left += steps * flops / self.rates.get(k, self._latest)
      start = end
    return left

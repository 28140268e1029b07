"""An optional profiler trace of chosen training steps (`config.train.profile_steps`).

`profile_steps = (a, b)` traces the steps after step `a` up to step `b` (as the log counts
them) with `jax.profiler` into WORKDIR/profile (every host writes its own file; open it
with TensorBoard's profile plugin or xprof). A bucket workdir gets the trace uploaded.
"""

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from npp_jax.infra import storage

log = logging.getLogger(__name__)


class StepTrace:
  """Starts the trace before step `start + 1` and stops it once step `end` is done."""

  def __init__(self, steps: Sequence[int], workdir: str):
    self.start, self.end = tuple(steps) or (-1, -1)
    self.target = storage.join(storage.absolute(workdir), "profile")
    self._local: str | None = None

  def before_step(self, step: int) -> None:
    """Call with the number of steps done before the next one runs."""
    if step == self.start and self._local is None:
      remote = storage.is_remote(self.target)
      self._local = tempfile.mkdtemp(prefix="npp_jax_trace_") if remote else self.target
      jax.profiler.start_trace(self._local)
      log.info("profiling steps %d-%d into %s", self.start + 1, self.end, self.target)

  def after_step(self, done: int, outputs: Any) -> None:
    """Call after each step with what it returned (waited for before the trace stops)."""
    if self._local is not None and done >= self.end:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self._local is None:
      return
    jax.profiler.stop_trace()
    if self._local != self.target:  # upload the trace files to the bucket
      for f in storage.files_under(self._local):
        storage.copy(f, storage.join(self.target, os.path.relpath(f, self._local)))
      shutil.rmtree(self._local, ignore_errors=True)
    log.info("wrote the profiler trace to %s", self.target)
    self._local = None

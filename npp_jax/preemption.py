"""Graceful stops: SIGTERM (preemption notices, `scancel`, `kill`) or Ctrl-C checkpoint first.

The trainer asks `should_stop(step)` after every step. On one host a caught signal answers
yes; on several hosts JAX's preemption sync point answers for all of them at the same step
(the coordinator sees the notice), so every host saves the same checkpoint. A second Ctrl-C
falls through to Python's default handler and stops at once.
"""

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class PreemptionGuard:
  """Context manager that turns SIGTERM/SIGINT into a checkpoint-then-stop request."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = signals
    self.received: str | None = None
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    log.warning(
      "received %s: saving a checkpoint after this step, then stopping "
      "(send it again to stop at once)",
      self.received,
    )
    signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)
    return False

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received is not None
    from jax.experimental import multihost_utils  # noqa: PLC0415

    try:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or "preemption notice"
        return True
    except Exception:  # noqa: BLE001 (no preemption service: only periodic checkpoints)
      pass
    return False

"""Graceful stops: SIGTERM (preemption notices, `scancel`, `kill`) or Ctrl-C checkpoint first.

The trainer asks `should_stop(step)` after every step. On one host a caught signal answers
yes, and a second Ctrl-C falls through to Python's default handler and stops at once.
On several hosts the guard installs no handler: `jax.distributed.initialize()` registered
its own SIGTERM listener, which tells the coordination service, and JAX's preemption sync
point then answers yes on every host at the same step, so all save the same checkpoint.
(A Python handler would replace JAX's, and the notice would never reach the service.)
"""

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class StoppedBySignalError(Exception):
  """A job stopped on SIGTERM/SIGINT after keeping what it had finished; the command
  line exits with 128 + the signal's number, as a shell reports a signal."""

  def __init__(self, message: str, signal_name: str):
    super().__init__(message)
    self.exit_status = 128 + signal.Signals[signal_name].value


class PreemptionGuard:
  """Context manager that turns SIGTERM/SIGINT into a finish-then-stop request.

  `local=True` is for jobs whose hosts share no step to stop at (extraction): the handler
  is installed on every host, in place of JAX's listener.
  """

  def __init__(
    self,
    signals=(signal.SIGTERM, signal.SIGINT),
    local: bool = False,
    action: str = "saving a checkpoint after this step",
  ):
    self.signals, self.local, self.action = signals, local, action
    self.received: str | None = None
    self._old = {}
    self._warned = False

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    log.warning(
      "received %s: %s, then stopping (send it again to stop at once)",
      self.received,
      self.action,
    )
    signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if jax.process_count() > 1 and not self.local:
      return self  # JAX's own SIGTERM listener stays in place (see the module docstring)
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
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as err:  # jax_enable_preemption_service turned off
      if not self._warned:
        log.warning("no preemption sync (%s): only periodic checkpoints on several hosts", err)
        self._warned = True
      return False
    if reached:
      self.received = self.received or "preemption notice (SIGTERM on a host)"
      log.warning("preemption sync point at step %d: saving a checkpoint, then stopping", step)
      return True
    return False

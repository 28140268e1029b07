"""On several hosts, one host's failure stops every host at once, each with one line.

The host that stops on an error (`stop`) writes its line under one key of JAX's
distributed key-value store; every host watches that key from a daemon thread (`watch`)
and, when it appears, says which host stopped and why. Then all of them leave the cluster
together through JAX's shutdown barrier and exit with the failed host's status. Without
this the other hosts wait for the lost one inside a collective: on TPUs until the
coordination service's heartbeat timeout (100 s) aborts them with a C++ stack trace, on
CPUs and GPUs with the transport's traceback; and a host that exits alone makes the
service abort the others.
"""

import atexit
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from jax._src import distributed  # the key-value store has no public API

log = logging.getLogger(__name__)

KEY = "npp_jax/stopped"
# How long the stopping host waits for the others to take its line before leaving anyway.
ACK_DEADLINE_S = 30.0
# The watcher asks again every second, so that it can end before the interpreter does: a
# thread killed at exit inside JAX's blocking call aborts the process.
_POLL_MS = 1000
_taken = threading.Event()  # another host's stop was seen: this host's watcher ends it


def several_hosts() -> bool:
  """True in a job of several processes (without starting JAX's backends to find out)."""
  return _client() is not None


def _client():
  state = distributed.global_state
  return state.client if state.client is not None and (state.num_processes or 1) > 1 else None


def watch(on_stop: Callable[[str], None]) -> None:
  """Starts the watcher: when another host stops, `on_stop(line)` runs (it writes the line
  to the log files), the line goes to stderr and this process leaves with the stopping
  host's status. Nothing on one host."""
  client = _client()
  if client is None:
    return
  me = distributed.global_state.process_id

  done = threading.Event()

  def loop():
    while not done.is_set():
      try:
        value = client.blocking_key_value_get(KEY, _POLL_MS)
      except Exception:  # noqa: BLE001 (not set yet: wait again; service gone: stop watching)
        if not _alive(client):
          return
        continue
      stop = json.loads(value)
      if stop["host"] == me:
        return  # this host's own stop: `stop` ends it
      _taken.set()
      line = f"error: host {stop['host']} stopped the job: {stop['line'].removeprefix('error: ')}"
      with contextlib.suppress(Exception):
        on_stop(line)
      print(line, file=sys.stderr, flush=True)
      with contextlib.suppress(Exception):
        client.key_value_set(f"{KEY}/ack/{me}", "1")
      _leave(stop["status"])

  thread = threading.Thread(target=loop, daemon=True, name="npp_jax-peers")
  thread.start()

  def end():  # at a normal exit, before JAX's own shutdown (atexit runs in reverse)
    done.set()
    thread.join(timeout=5 * _POLL_MS / 1000)

  atexit.register(end)


def _alive(client) -> bool:
  try:
    client.key_value_try_get(f"{KEY}/alive-check")
  except Exception as e:  # noqa: BLE001
    return "not found" in str(e).lower()
  return True


def stop(status: int, line: str) -> NoReturn:
  """Ends this host's part of a job that failed here with `line` (already printed): tells
  every other host, waits (at most ACK_DEADLINE_S) until they have taken it, and leaves
  with `status`. When another host stopped first, its line is the one reported."""
  client = _client()
  wait_if_another_host_stopped()
  me = distributed.global_state.process_id
  try:
    client.key_value_set(KEY, json.dumps({"host": me, "line": line, "status": status}))
  except Exception:  # noqa: BLE001 (another host stopped first: the watcher reports it)
    _wait_for_watcher()
  end = time.monotonic() + ACK_DEADLINE_S
  for host in range(distributed.global_state.num_processes):
    left_ms = int((end - time.monotonic()) * 1000)
    if host == me or left_ms <= 0:
      continue
    try:
      client.blocking_key_value_get(f"{KEY}/ack/{host}", left_ms)
    except Exception:  # noqa: BLE001 (that host is gone already or does not answer)
      log.debug("host %d did not confirm the stop", host)
  _leave(status)


def wait_if_another_host_stopped() -> None:
  """Never returns once another host's stop was seen (the watcher is ending this process:
  an error here is a consequence, e.g. a collective broken by that host's exit)."""
  if _taken.is_set():
    _wait_for_watcher()


def _wait_for_watcher() -> NoReturn:
  time.sleep(ACK_DEADLINE_S + 60)  # the watcher exits the process long before
  os._exit(1)


def _leave(status: int) -> NoReturn:
  """Every stopping host meets the others in JAX's shutdown barrier, so that the
  coordination service sees no host vanish (it would abort the rest), then exits at once:
  threads still waiting on lost storage would hold a normal exit for minutes."""
  sys.stdout.flush()
  sys.stderr.flush()
  # The line is the last thing said: what the main thread prints from here on (the
  # collective broken by the shutdown, a periodic log row) goes nowhere.
  with contextlib.suppress(OSError), open(os.devnull, "wb") as null:
    os.dup2(null.fileno(), 1)
    os.dup2(null.fileno(), 2)
  logging.disable(logging.CRITICAL)
  with contextlib.suppress(Exception):
    distributed.global_state.shutdown()
  os._exit(status)

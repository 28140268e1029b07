"""What the command lines share: logging (console and WORKDIR/logs), and every failure
ending in one line and an exit status (failure_line), on several hosts on every host."""

import contextlib
import copy
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from npp_jax import config_lib
from npp_jax.infra import checkpoint, peers, preemption, storage

# What a job raises for bad input or a state it refuses: printed as one line (exit status 2);
# NPP_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = (
  ValueError,
  FileNotFoundError,
  FileExistsError,
  ImportError,
  FloatingPointError,
  checkpoint.WorkdirBusyError,
)


# The exit status of a job that stopped because storage failed (sysexits' EX_TEMPFAIL).
STORAGE_EXIT_STATUS = 75


class _LibraryTracebacksToFile(logging.Filter):
  """On the console a library's error is one line; its traceback (orbax prints one for
  every failed background save) is kept in the run's log file only, so that the job's
  own last line is what a reader sees."""

  def __init__(self, console: logging.Handler):
    super().__init__()
    self.console = console

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.exc_info or record.name.startswith("npp_jax"):
      return True
    brief = copy.copy(record)
    brief.exc_info, brief.exc_text, brief.stack_info = None, None, None
    self.console.emit(brief)
    return False


def _unraisable_to_file(info: "sys.UnraisableHookArgs") -> None:
  """An error Python ignored (tensorstore's "Event loop is closed", one per write still
  pending when orbax stops its loop after a failed save) goes to the log file only."""
  text = "".join(traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback))
  _to_log_files(f"ignored in {info.object!r}: {text.rstrip()}")


def setup_logging() -> None:
  """npp_jax logs at INFO; the libraries (orbax, absl, grain) only at WARNING, their
  tracebacks to the log file only."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  sys.unraisablehook = _unraisable_to_file
  for console in logging.getLogger().handlers:  # absl's (app.run installs it)
    if not any(isinstance(f, _LibraryTracebacksToFile) for f in console.filters):
      console.addFilter(_LibraryTracebacksToFile(console))
  logger = logging.getLogger("npp_jax")
  logger.setLevel(logging.INFO)
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False


class WorkdirLog(logging.FileHandler):
  """npp_jax's log in WORKDIR/logs/, one file per run and host, so that a pod job's log
  outlives its machines. In a bucket the file is written locally and uploaded whole at
  most every `upload_every_s` seconds and when logging shuts down (objects cannot grow)."""

  def __init__(self, workdir: str, mode: str, process: int, upload_every_s: float = 60.0):
    name = f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    name += f"-host{process}.log" if process else ".log"
    self.path = storage.join(workdir, "logs", name)
    self.remote = storage.is_remote(self.path)
    if self.remote:
      local = os.path.join(tempfile.mkdtemp(prefix="npp_jax_log_"), storage.basename(self.path))
    else:
      storage.makedirs(os.path.dirname(self.path))
      local = self.path
    super().__init__(local, encoding="utf-8")
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    self.upload_every_s, self._uploaded = upload_every_s, -math.inf
    self._broken = False

  def emit(self, record: logging.LogRecord) -> None:
    if self._broken:
      return
    super().emit(record)
    if self.remote and time.monotonic() - self._uploaded > self.upload_every_s:
      self._upload()

  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
    """A log file that cannot be written (a full disk) is given up in one warning, not a
    traceback per record: the job's own errors still reach the console."""
    del record
    if not self._broken:
      self._broken = True
      print(
        f"warning: the log file {self.path} cannot be written: {sys.exc_info()[1]}", file=sys.stderr
      )

  def close(self) -> None:
    try:
      super().close()
    except OSError:
      self._broken = True  # its last lines did not fit (a full disk); the console has them
    if self.remote and os.path.exists(self.baseFilename):  # logging closes it twice
      self._upload()
      shutil.rmtree(os.path.dirname(self.baseFilename), ignore_errors=True)

  def _upload(self) -> None:
    self._uploaded = time.monotonic()
    if storage.failed():
      return  # the job is stopping on that failure; its error line says so
    try:
      storage.copy(self.baseFilename, self.path)
    except Exception as e:  # noqa: BLE001 (a lost log upload must not stop the job)
      print(f"warning: could not upload the log to {self.path}: {e}", file=sys.stderr)


def log_to_workdir(workdir: str, mode: str, process: int) -> WorkdirLog:
  """Adds a WorkdirLog to npp_jax's logger (every host its own file); returns it."""
  handler = WorkdirLog(workdir, mode, process)
  logging.getLogger("npp_jax").addHandler(handler)
  logging.getLogger().addHandler(handler)  # the libraries' warnings, with tracebacks
  logging.getLogger("npp_jax").info("log file: %s; command: %s", handler.path, " ".join(sys.argv))
  return handler


def _to_log_files(line: str) -> None:
  """The last line of a failed run goes to its log file too (stderr has it already)."""
  for handler in logging.getLogger("npp_jax").handlers:
    if isinstance(handler, WorkdirLog):
      with contextlib.suppress(Exception):
        handler.emit(logging.LogRecord("npp_jax", logging.ERROR, "", 0, line, None, None))


def _close_log_files() -> None:
  for logger in (logging.getLogger("npp_jax"), logging.getLogger()):
    for handler in [h for h in logger.handlers if isinstance(h, WorkdirLog)]:
      logger.removeHandler(handler)
      handler.close()


def define_config_flags(workdir_help: str | None) -> None:
  """A required --config (locked) and, given `workdir_help`, a required --workdir.

  Called by an entry point's run(), never at import: a module with a command line is also a
  library (tests and notebooks import several into one process) and absl refuses a flag
  defined twice.
  """
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_bool(
    "print_config", False, "Print every config key with its value and meaning, and exit."
  )
  if workdir_help is not None:
    flags.DEFINE_string("workdir", None, workdir_help + " (required)")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with unknown config keys and bad values as one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except SyntaxError as e:  # the config file itself does not parse
    print(f"error: config file {e.filename} line {e.lineno}: {e.msg}", file=sys.stderr)
    sys.exit(2)
  except (flags.Error, AttributeError, KeyError) as e:
    print(f"error: {flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def failure_line(e: Exception) -> tuple[str, int]:
  """The one line a job ends with on `e`, and its exit status: 75 for storage (EX_TEMPFAIL:
  a scheduler may retry once storage is back or the disk has room), 2 for bad input or a
  state npp_jax refuses, 1 for anything else (printed with its traceback)."""
  if storage.disk_full(e) and not isinstance(e, storage.StorageError):
    text = " ".join(str(e).split())[:300]
    return f"error: storage: the disk is full ({text}); free space and rerun", STORAGE_EXIT_STATUS
  if isinstance(e, storage.StorageError):
    return f"error: storage: {e}", STORAGE_EXIT_STATUS
  if isinstance(e, USER_ERRORS):
    return f"error: {e}", 2
  return f"failed: {type(e).__name__}: {e}", 1


def stop(line: str, status: int) -> None:
  """Ends the job with one line (stderr and the log files) and `status`; on several hosts
  every other host stops too (peers.py), and a storage failure exits at once: threads
  still waiting on the lost storage (orbax's commit, tensorstore's retries) would hold the
  interpreter's exit for minutes, and on several hosts JAX's shutdown barrier would wait
  for hosts that have gone."""
  print(line, file=sys.stderr, flush=True)
  _to_log_files(line)
  _close_log_files()
  if peers.several_hosts():
    peers.stop(status, line)
  if status == STORAGE_EXIT_STATUS:
    sys.stdout.flush()
    os._exit(status)
  sys.exit(status)


def watch_peers() -> None:
  """On several hosts: another host's stop ends this one with its line (peers.watch)."""

  def on_stop(line: str) -> None:
    logging.disable(logging.CRITICAL)  # the line is the last thing said
    _to_log_files(line)
    _close_log_files()

  peers.watch(on_stop)


def run_command(
  job: Callable[[str, flags.FlagValues, list[str]], int],
  choices: Sequence[str],
  define_flags: Callable[[flags.FlagValues], None],
  name: str,
) -> None:
  """A command with a first argument and its own flags (`python -m npp_jax.convert`,
  `.bench`): parses `name WHAT --config=FILE [--flags]` (parse_command), then exits with
  `job(WHAT, flags, argv)`'s status, a failure ending as a job's does (failure_line)."""
  setup_logging()
  argv = [name, *sys.argv[1:]]
  try:
    what, fv = parse_command(argv, choices, define_flags)
    status = job(what, fv, argv)
  except Exception as e:
    line, status = failure_line(e)
    if status == 1 or os.environ.get("NPP_TRACEBACK") == "1":
      raise
    print(line, file=sys.stderr)
  sys.exit(status)


def flag_error(argv: Sequence[str], e: Exception) -> str:
  """One line for a command line ml_collections or absl refused (unknown key, bad value)."""
  if not isinstance(e, (AttributeError, KeyError)):
    return str(e).splitlines()[0]
  # ml_collections raises KeyError("'epoch'\nDid you mean ...?"), maybe inside AttributeError.
  text: object = e
  while isinstance(text, BaseException):
    text = text.args[0] if text.args else ""
  text = str(text)
  key, _, hint = text.partition("\n")
  key = key.strip("'\"")
  arg = next((a for a in argv if a.startswith("--config.") and f".{key}" in a), "")
  line = f"unknown config key {key!r}" + (f" in {arg.split('=')[0]}" if arg else "")
  return line + (f"; {hint.strip()[0].lower()}{hint.strip()[1:]}" if hint.strip() else "")


def parse_command(
  argv: Sequence[str], choices: Sequence[str], define_flags: Callable[[flags.FlagValues], None]
) -> tuple[str, flags.FlagValues]:
  """Parses `PROG WHAT --config=FILE [--config.a.b=v ...] [--flag=v ...]`.

  `--config` is a config file whose keys the command line overrides, as for
  `python -m npp_jax.main`; `define_flags` adds the command's own flags. Returns WHAT and
  the parsed flags; a bad command line is one ValueError with the usage.
  """
  argv = list(argv)
  usage = f"usage: {argv[0]} {{{','.join(choices)}}} --config=configs/FILE.py [--flags]"
  if len(argv) < 2 or argv[1] not in choices:
    got = argv[1] if len(argv) > 1 else "nothing"
    raise ValueError(f"the first argument must be one of {tuple(choices)}, got {got!r}.\n{usage}")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py).", flag_values=fv, sys_argv=argv
  )
  flags.mark_flag_as_required("config", flag_values=fv)
  define_flags(fv)
  try:
    fv(argv[:1] + argv[2:])
  except (flags.Error, AttributeError, KeyError) as e:
    raise ValueError(f"{flag_error(argv, e)}\n{usage}") from None
  return argv[1], fv


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with logging set up and every failure ending in one line (failure_line)."""

  def _main(argv):
    setup_logging()
    if flags.FLAGS.print_config:
      print(config_lib.describe(flags.FLAGS.config))
      return
    if "workdir" in flags.FLAGS and not flags.FLAGS.workdir:
      raise app.UsageError("--workdir is required (or --print_config to list the config).")
    try:
      main(argv)
    except preemption.StoppedBySignalError as e:
      # Every host stops at the same step on a signal (preemption.py): nobody to tell.
      _to_log_files(f"stopped: {e}")
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(e.exit_status)
    except Exception as e:
      peers.wait_if_another_host_stopped()  # its line is the one to read, not this error
      line, status = failure_line(e)
      if status == 1 or (status == 2 and os.environ.get("NPP_TRACEBACK") == "1"):
        if not peers.several_hosts():
          _to_log_files(line)
          raise  # not an error npp_jax knows: the traceback is what there is to read
        traceback.print_exc()
      stop(line, status)
    finally:
      _close_log_files()  # uploaded now, while the storage clients still run

  app.run(_main, flags_parser=_parse_flags)

"""What the command lines share: logging set-up, and bad input as one line on stderr."""

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from npp_jax import checkpoint, config_lib, preemption

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


def setup_logging() -> None:
  """npp_jax logs at INFO; the libraries (orbax, absl, grain) only at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger("npp_jax")
  logger.setLevel(logging.INFO)
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False


def define_config_flags(workdir_help: str | None) -> None:
  """A required --config (locked) and, given `workdir_help`, a required --workdir.

  Called by an entry point's run(), never at import: a module with a command line is also a
  library (tests and notebooks import several into one process) and absl refuses a flag
  defined twice.
  """
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.mark_flag_as_required("config")
  if workdir_help is not None:
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with unknown config keys and bad values as one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except SyntaxError as e:  # the config file itself does not parse
    print(f"error: config file {e.filename} line {e.lineno}: {e.msg}", file=sys.stderr)
    sys.exit(2)
  except (flags.Error, AttributeError, KeyError) as e:
    print(f"error: {config_lib.flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with logging set up and USER_ERRORS as one line."""

  def _main(argv):
    setup_logging()
    try:
      main(argv)
    except preemption.StoppedBySignalError as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(e.exit_status)
    except USER_ERRORS as e:
      if os.environ.get("NPP_TRACEBACK") == "1":
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, flags_parser=_parse_flags)

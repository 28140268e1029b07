"""Entry point: `python -m npp_jax.main --config=configs/l.py --workdir=DIR [--config.a.b=v]`.

`config.mode` selects the job: train (default), sample, eval or extract; each lives in
`npp_jax/jobs/`.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from npp_jax import checkpoint, config_lib
from npp_jax.jobs import evaluate, extract, sample, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
flags.mark_flags_as_required(["config", "workdir"])

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
JOBS = {"train": train.run, "sample": sample.run, "eval": evaluate.run, "extract": extract.run}
log = logging.getLogger("npp_jax.main")


def main(argv):
  del argv
  c = _CONFIG.value
  try:
    config_lib.check_mode(c)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if os.environ.get("NPP_DISTRIBUTED") == "1" or c.distributed:
    jax.distributed.initialize()  # multi-host: TPU pods, SLURM, or the JAX_* env vars
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  log.info(
    "devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  out = JOBS[c.mode](c, workdir)
  if c.mode == "train":
    log.info("finished at step %d: %s", out["step"], out["metrics"])
  elif c.mode == "extract":
    log.info("codes: %s", {k: v for k, v in out.items() if k != "skipped_images"})
  else:
    log.info("%s: %s", c.mode, out)


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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with unknown config keys and bad values as one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    print(f"error: {config_lib.flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def run():
  """Console entry point (`npp-jax`)."""

  def _main(argv):
    setup_logging()
    try:
      main(argv)
    except USER_ERRORS as e:
      if os.environ.get("NPP_TRACEBACK") == "1":
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

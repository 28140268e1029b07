"""Entry point: `python -m npp_jax.main --config=configs/l.py --workdir=DIR [--config.x=y]`.

`config.mode` selects the job: train (default), sample, eval or extract.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
flags.mark_flags_as_required(["config", "workdir"])

_AVAILABLE = {"train", "sample", "extract", "eval"}
log = logging.getLogger("npp_jax.main")


def main(argv):
  del argv
  c = _CONFIG.value
  if os.environ.get("NPP_DISTRIBUTED") == "1" or c.get("distributed", False):
    jax.distributed.initialize()  # multi-host: TPU pods, SLURM, or the JAX_* env vars
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  log.info(
    "devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  if c.mode not in _AVAILABLE:
    raise app.UsageError(
      f"config.mode={c.mode!r} is not available in this version; available: {sorted(_AVAILABLE)}."
    )
  if c.mode == "train":
    from npp_jax import train  # noqa: PLC0415

    summary = train.train_and_evaluate(c, workdir)
    log.info("finished at step %d: %s", summary["step"], summary["metrics"])
  elif c.mode == "sample":
    from npp_jax import sample_job  # noqa: PLC0415

    out = sample_job.run(c, workdir)
    log.info("samples: %s", out)
  elif c.mode == "eval":
    from npp_jax import evaluate  # noqa: PLC0415

    out = evaluate.run(c, workdir)
    log.info("eval: %s", out)
  elif c.mode == "extract":
    from npp_jax import extract  # noqa: PLC0415

    out = extract.run(c, workdir)
    log.info("codes: %s", {k: v for k, v in out.items() if k != "skipped_images"})


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


def run():
  def _main(argv):
    setup_logging()
    main(argv)

  app.run(_main)


if __name__ == "__main__":
  run()

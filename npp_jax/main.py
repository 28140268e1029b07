"""Entry point: `python -m npp_jax.main --config=configs/l.py --workdir=DIR [--config.a.b=v]`.

`config.mode` selects the job: train (default), sample, eval or extract; each lives in
`npp_jax/jobs/`.
"""

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from npp_jax import cli, config_lib, run_config
from npp_jax.infra import compile_cache, storage
from npp_jax.jobs import evaluate, extract, sample, train

JOBS = {"train": train.run, "sample": sample.run, "eval": evaluate.run, "extract": extract.run}
log = logging.getLogger("npp_jax.main")


def main(argv):
  del argv
  c = flags.FLAGS.config
  try:
    config_lib.check_mode(c)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if os.environ.get("NPP_DISTRIBUTED") == "1" or c.distributed:
    try:
      _join_cluster()
    except (ValueError, RuntimeError) as e:
      raise ValueError(
        f"NPP_DISTRIBUTED=1 or config.distributed asks for several hosts, but JAX found no "
        f"cluster to join ({str(e).splitlines()[0]}): run on a TPU pod or under SLURM, or set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on one machine "
        "leave both unset."
      ) from None
    cli.watch_peers()  # another host's failure ends this one too, in one line
  workdir = storage.absolute(flags.FLAGS.workdir)  # local -> absolute; gs://... as given
  storage.set_deadline(c.storage_deadline_s)  # for the checks below; each job sets it too
  # A missing or read-only bucket is one line now, not a hang after minutes of compiling.
  for path in {workdir, c.extract.out_dir if c.mode == "extract" else ""} - {""}:
    storage.check_writable(path)
  storage.makedirs(workdir)
  cli.log_to_workdir(workdir, c.mode, jax.process_index())
  compile_cache.enable(c.compile_cache, workdir)
  log.info(
    "devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  if c.mode in ("sample", "eval"):
    # A training run's model, tokenizer and data come from what it stored, not the flags.
    run_config.adopt(c, workdir, config_flags.get_override_values(flags.FLAGS["config"]))
  out = JOBS[c.mode](c, workdir)
  if c.mode == "train":
    log.info("finished at step %d: %s", out["step"], out["metrics"])
  elif c.mode == "extract":
    log.info("codes: %s", {k: v for k, v in out.items() if k != "skipped_images"})
  else:
    log.info("%s: %s", c.mode, out)


def _join_cluster() -> None:
  """jax.distributed.initialize(): a TPU pod, SLURM or Open MPI is found by JAX; elsewhere
  JAX_COORDINATOR_ADDRESS (read by JAX) with JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(
    num_processes=int(count) if count else None, process_id=int(index) if index else None
  )


def run():
  """Console entry point (`npp-jax`)."""
  cli.define_config_flags("Directory for checkpoints, metrics, outputs.")
  cli.run(main)


if __name__ == "__main__":
  run()

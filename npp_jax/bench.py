"""`python -m npp_jax.bench {train,sample,tokenizer,eval} ...`: forwards to `npp_jax.jobs.bench`."""

from npp_jax import cli
from npp_jax.jobs import bench


def run() -> None:
  """Console entry point (`npp-jax-bench`)."""
  cli.run_command(bench.main, "python -m npp_jax.bench")


if __name__ == "__main__":
  run()

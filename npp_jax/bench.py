"""`python -m npp_jax.bench {train,sample,...} --config=FILE ...`: parses the command line
(cli), then runs `npp_jax.jobs.bench`."""

from npp_jax import cli
from npp_jax.jobs import bench


def run() -> None:
  """Console entry point (`npp-jax-bench`)."""
  cli.run_command(bench.run, bench.WHAT, bench.define_flags, "python -m npp_jax.bench")


if __name__ == "__main__":
  run()

"""`python -m npp_jax.convert {gpt,vq} --config=FILE ...`: parses the command line (cli),
then runs `npp_jax.jobs.convert`."""

from npp_jax import cli
from npp_jax.jobs import convert


def run() -> None:
  """Console entry point (`npp-jax-convert`)."""
  cli.run_command(convert.run, convert.KINDS, convert.define_flags, "python -m npp_jax.convert")


if __name__ == "__main__":
  run()

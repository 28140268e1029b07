"""`python -m npp_jax.convert {gpt,vq} ...`: forwards to `npp_jax.jobs.convert`."""

from npp_jax.jobs import convert

if __name__ == "__main__":
  convert.run()

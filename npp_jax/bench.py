"""`python -m npp_jax.bench {train,sample,tokenizer,eval} ...`: forwards to `npp_jax.jobs.bench`."""

from npp_jax.jobs import bench

if __name__ == "__main__":
  bench.run()

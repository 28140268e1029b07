"""One host of a 2-process CPU cluster running `python -m npp_jax.main` (tests/test_multihost.py).

python tests/peer_failure_worker.py FAIL_HOST FAIL_AT_READ MAIN_ARGS...

NPP_DISTRIBUTED=1 and the JAX_* variables make it join the cluster as a launcher would.
On host FAIL_HOST the training-data read number FAIL_AT_READ raises the StorageError that
a bucket lost past the deadline gives, as if that host alone lost its network, while the
other host goes on into the next step's collectives.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + os.environ.get(
  "NPP_TEST_XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npp_jax import main  # noqa: E402
from npp_jax.infra import storage  # noqa: E402
from npp_jax.jobs import train  # noqa: E402
from tests import cache_on_every_host  # noqa: E402

if __name__ == "__main__":
  cache_on_every_host.install()
  fail_host, fail_at = int(sys.argv[1]), int(sys.argv[2])
  if int(os.environ["JAX_PROCESS_ID"]) == fail_host:
    read = train.Trainer.next_batch
    count = [0]

    def next_batch(self):
      count[0] += 1
      if count[0] == fail_at:
        raise storage.StorageError(
          "read the training data gs://bucket/codes failed after 300 s: the storage "
          "endpoint is unreachable (test)"
        )
      return read(self)

    train.Trainer.next_batch = next_batch
  sys.argv = [sys.argv[0], *sys.argv[3:]]
  main.run()

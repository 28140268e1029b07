"""One process of a 2-process CPU "cluster" (gloo collectives), for tests/test_multihost.py.

python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA MAX_STEPS MODE
"""

import json
import os
import sys

DEVICES = os.environ.get("NPP_TEST_LOCAL_DEVICES", "2")
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES} " + os.environ.get(
  "NPP_TEST_XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if __name__ == "__main__":
  pid, n, port, workdir, data, max_steps, mode = sys.argv[1:8]
  if int(n) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=int(n), process_id=int(pid)
    )
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from npp_jax.jobs import sample, train  # noqa: E402
  from tests import cache_on_every_host  # noqa: E402
  from tests.helpers import tiny_config  # noqa: E402

  cache_on_every_host.install()

  c = tiny_config(data, **{"train.max_steps": int(max_steps), "train.ckpt_every_steps": 4})
  if mode == "train_long":  # long enough to be preempted: 12 epochs, stage checkpoints only
    c.train.update(epochs=12, ckpt_every_steps=1000)
  if mode.startswith("train"):
    s = train.run(c, workdir)
    print(
      json.dumps(
        {
          "process": jax.process_index(),
          "devices": jax.device_count(),
          "step": s["step"],
          "resumed_from": s["resumed_from"],
          "stopped_by": s.get("stopped_by"),
        }
      ),
      flush=True,
    )
  else:
    c.tokenizer.update(name="grey", levels=64)
    c.sample.update(num_images=12, batch_size=8, png_per_class=1, png_classes=(1, 2), top_k=1)
    out = sample.run(c, workdir)
    print(json.dumps({"process": jax.process_index(), **out}), flush=True)

"""GPT-tiny, the test-suite's golden model (2 layers, dim 64, vocab 64, 8x8 grid): a smoke test.

It trains on codes with vocab 64 and an 8x8 grid (`--config.data.path=CODES`); for a run
that needs no data, use configs/mnist.py.
"""

from npp_jax import config_lib


def get_config():
  c = config_lib.get_config("tiny")
  c.model.dtype = "float32"
  # NPP: patch sides 4 -> 2 -> 1 on the 8x8 grid, stages ending at epochs 2, 5 and 10.
  c.train.update(epochs=10, global_batch_size=16, patch_level=3, epoch_rate=0.5)
  c.train.update(log_every_steps=1, ckpt_every_steps=100)
  c.optim.update(lr=1e-3, end_lr=1e-4, warmup_epochs=1.0)
  return c

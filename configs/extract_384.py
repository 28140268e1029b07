"""Tokenize ImageNet at 384 px with VQ-16 (24 x 24 codes, ten-crop variants).

python -m npp_jax.main --config=configs/extract_384.py --workdir=runs/extract_384 \
  --config.extract.data_dir=/data/imagenet/train --config.tokenizer.checkpoint=converted/vq16
Train on the result at the same size: --config.model.grid=24.
"""

from npp_jax import config_lib


def get_config():
  c = config_lib.get_config("B")
  c.mode = "extract"
  c.extract.image_size = 384
  c.model.grid = 24
  return c

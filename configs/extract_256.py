"""Tokenize ImageNet at 256 px with VQ-16 (16 x 16 codes, ten-crop variants).

python -m npp_jax.main --config=configs/extract_256.py --workdir=runs/extract_256 \
  --config.extract.data_dir=/data/imagenet/train --config.tokenizer.checkpoint=converted/vq16
Train on the result at the same size: --config.model.grid=16.
"""

from npp_jax import config_lib


def get_config():
  c = config_lib.get_config("B")
  c.mode = "extract"
  c.extract.image_size = 256
  c.model.grid = 16
  return c

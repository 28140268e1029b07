"""GPT-XXXL (3.9B parameters) on ImageNet-256: `configs/imagenet.py:XXXL`,
under the name that commands, launchers and notebooks use.

python -m npp_jax.main --config=configs/xxxl.py --workdir=runs/xxxl --config.data.path=CODES
"""

from npp_jax import config_lib


def get_config():
  return config_lib.get_config("XXXL")

"""GPT-XXL (1.4B parameters) on ImageNet-256: `configs/imagenet.py:XXL`,
under the name that commands, launchers and notebooks use.

python -m npp_jax.main --config=configs/xxl.py --workdir=runs/xxl --config.data.path=CODES
"""

from npp_jax import config_lib


def get_config():
  return config_lib.get_config("XXL")

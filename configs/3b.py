"""GPT-3B (3.1B parameters) on ImageNet-256: `configs/imagenet.py:3B`,
under the name that commands, launchers and notebooks use.

python -m npp_jax.main --config=configs/3b.py --workdir=runs/3b --config.data.path=CODES
"""

from npp_jax import config_lib


def get_config():
  return config_lib.get_config("3B")

"""GPT-B (111M parameters) on ImageNet-256: `configs/imagenet.py:B`,
under the name that commands, launchers and notebooks use.

python -m npp_jax.main --config=configs/b.py --workdir=runs/b --config.data.path=CODES
"""

from npp_jax import config_lib


def get_config():
  return config_lib.get_config("B")

"""GPT-L (343M parameters) on ImageNet-256: `configs/imagenet.py:L`,
under the name that commands, launchers and notebooks use.

python -m npp_jax.main --config=configs/l.py --workdir=runs/l --config.data.path=CODES
"""

from npp_jax import config_lib


def get_config():
  return config_lib.get_config("L")

"""GPT-XL (775M parameters) on ImageNet-256: `configs/imagenet.py:XL`,
under the name that commands, launchers and notebooks use.

python -m npp_jax.main --config=configs/xl.py --workdir=runs/xl --config.data.path=CODES
"""

from npp_jax import config_lib


def get_config():
  return config_lib.get_config("XL")

"""GPT-L with the NPP ImageNet-256 recipe. Point data.path at extracted codes."""

from npp_jax import config_lib


def get_config(arg=None):
  return config_lib.get_config("L", arg)

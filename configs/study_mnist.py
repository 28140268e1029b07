"""Does NPP help? NTP against NPP at the demo's length (`make study`; its size: README).

The demo's model and data (configs/mnist.py: dim 64, 3 layers, 34 epochs of the 4,500
training digits, 70 steps of 64 each) for every schedule: next-token prediction (patch
level 1), NPP with patch levels 2 (sides 2, 1; stages end at epochs 17, 34) and 3 (sides
4, 2, 1; 8, 17, 34) at the paper's epoch rate 0.5, and NTP trained for the FLOPs NPP-3
spends (19 epochs, 0.56x NTP's 34); seeds 0 and 1. At 6 epochs spread over each run and at
every stage end the weights sample 500 digits (guidance 2.0, a fixed set of labels per
seed) for the judge, beside the next-token loss on 256 held-out digits.
"""

import importlib.util
import pathlib


def _config_file(name: str):
  spec = importlib.util.spec_from_file_location(
    name, pathlib.Path(__file__).with_name(f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _config_file("mnist")
  c.train.ckpt_every_steps = 280  # every 4 epochs; the quality points save their own
  c.study.update(patch_levels=(1, 2, 3), epoch_rate=0.5, seeds=(0, 1), num_images=500)
  c.study.update(quality_points=6, flops_matched_level=3)
  return c

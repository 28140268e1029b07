"""NTP against NPP for 4 epochs on the embedded digits: the first, cheaper study.

The demo's model and data (configs/mnist.py) with the dropout and layer scan it had then,
4 epochs of the 4,500 training digits for every schedule: next-token prediction (patch
level 1), NPP with patch levels 2 (sides 2, 1) and 3 (sides 4, 2, 1) at epoch rate 0.5,
seeds 0 and 1; the weights sample 200 digits (guidance 2.0) for the judge at epochs 1 to 4.
"""

import importlib.util
import pathlib


def get_config():
  spec = importlib.util.spec_from_file_location(
    "mnist", pathlib.Path(__file__).with_name("mnist.py")
  )
  mnist = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mnist)
  c = mnist.get_config()
  # The published study's model: the demo's shape with the dropout and layer scan it had
  # then (the demo has since turned dropout off and unrolled its layers).
  c.model.update(resid_dropout_p=0.1, ffn_dropout_p=0.1, scan_unroll=1)
  c.sample.update(num_images=200, batch_size=100)
  c.train.update(epochs=4, log_every_steps=35, ckpt_every_steps=140)
  c.train.update(eval_every_steps=35, eval_batches=7)  # 448 held-out digits every half epoch
  c.study.update(patch_levels=(1, 2, 3), epoch_rate=0.5, seeds=(0, 1), num_images=200)
  c.study.update(quality_points=4)
  return c

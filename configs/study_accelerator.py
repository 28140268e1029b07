"""The digit study sized for one GPU or TPU: a wider model, more epochs, three seeds.

configs/study_mnist.py's data, judge and schedules (NTP, NPP-2, NPP-3 at epoch rate 0.5,
NTP for NPP-3's FLOPs) with a model 4x wider and 3x deeper (dim 256, 9 layers, 8 heads,
about 7M parameters, bfloat16 compute) trained for 100 epochs, three seeds, 8 quality points
per run. Run it with `python -m npp_jax.study --config=configs/study_accelerator.py
--workdir=...` on a machine with jax[cuda12] or jax[tpu].
"""

import importlib.util
import pathlib


def get_config():
  spec = importlib.util.spec_from_file_location(
    "study_mnist", pathlib.Path(__file__).with_name("study_mnist.py")
  )
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  c = study.get_config()
  c.model.update(dim=256, n_layer=9, n_head=8, multiple_of=256, dtype="bfloat16", scan_unroll=1)
  # Dropout as in the paper's recipe: this model is big enough to overfit 4,500 digits.
  c.model.update(resid_dropout_p=0.1, ffn_dropout_p=0.1)
  c.train.update(epochs=100, ckpt_every_steps=700, eval_every_steps=350)
  c.optim.update(lr=3e-4, end_lr=3e-5, warmup_epochs=1.0)
  c.study.update(seeds=(0, 1, 2), quality_points=8)
  return c

"""Released PyTorch checkpoints -> orbax params directories that every job reads.

  python -m npp_jax.convert gpt --checkpoint=c2i_L_256.pt --config=configs/l.py --out=DIR
  python -m npp_jax.convert vq --checkpoint=vq_ds16_c2i.pt --config=configs/l.py --out=DIR

The model comes from the config (`config.model` for gpt, `config.tokenizer` for vq), so
it is chosen and overridden like everywhere else: `--config.tokenizer.preset=VQ-8`.
Inputs: `.pt`/`.pth` (the `torch` extra), `.npz` or `.safetensors`.
"""

import numpy as np
from absl import flags

from npp_jax import config_lib
from npp_jax.infra import torch_io
from npp_jax.models import gpt_torch, params_io, vqgan_torch

KINDS = ("gpt", "vq")


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags beside `--config`."""
  flags.DEFINE_string("checkpoint", None, ".pt/.pth/.npz/.safetensors file", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory (orbax params + config)", flag_values=fv)
  flags.DEFINE_string("key", None, "checkpoint entry to read (default: model)", flag_values=fv)
  flags.DEFINE_bool("force", False, "replace an existing output", flag_values=fv)
  flags.DEFINE_bool(
    "trust_checkpoint", False, "load a .pt that pickles objects besides tensors", flag_values=fv
  )
  for name in ("checkpoint", "out"):
    flags.mark_flag_as_required(name, flag_values=fv)


def run(kind: str, fv: flags.FlagValues, argv: list[str]) -> int:
  """Converts `--checkpoint` of `kind` (gpt or vq) into `--out`; returns the exit status."""
  del argv  # the parsed flags say everything
  c = fv.config
  trust = fv.trust_checkpoint or c.trust_checkpoint
  sd = torch_io.load_torch_checkpoint(fv.checkpoint, key=fv.key, trust=trust)
  n = sum(int(np.prod(x.shape)) for x in sd.values())
  if kind == "vq":
    vcfg = config_lib.vq_config(c)
    params = vqgan_torch.params_from_torch(sd, vcfg)
    out = params_io.save_params(fv.out, params, vcfg, force=fv.force)
    print(f"converted {fv.checkpoint} ({n:,} values, {c.tokenizer.preset}) -> {out}")
    return 0
  cfg = config_lib.gpt_config(c)
  params = gpt_torch.params_from_torch(sd, cfg)
  out = params_io.save_params(fv.out, params, cfg, force=fv.force)
  print(f"converted {fv.checkpoint} ({n:,} parameters, {gpt_torch.describe(cfg)}) -> {out}")
  return 0

"""The NPP paper's ImageNet-256 recipe on VQ-16 codes, for one GPT size (the argument).

python -m npp_jax.main --config=configs/imagenet.py:L --workdir=runs/l --config.data.path=CODES
(CODES: a directory written by `--config.mode=extract`, e.g. with configs/extract_256.py).

Sizes: B, L, XL, XXL, XXXL, 3B (`configs/b.py` ... `configs/3b.py` are the same recipe).
Everything is `config_lib.get_config`'s defaults: NPP with patch sides 4 -> 2 -> 1 and
stages ending at epochs 75, 150 and 300, global batch 256, AdamW at 1e-4 decaying to
1e-5; the paper's guidance scale per size (`config_lib.CFG_SCALES`, 1.5 where it reports
none); from XL up the train state split over every chip (`mesh.fsdp=-1`).

Where every stage fits at batch 256 (compiled with `python -m npp_jax.aot`):
  B, L       v5e:4x4, v6e:2x4, v5p:4x4x4, 8 H100s
  XL, XXL    v5p:4x4x4, 8 H100s; not v5e:4x4 or v6e:2x4 (token stage; `aot --fit` names
             an override)
  XXXL       v5p:4x4x4, 16 H100s; on 8 H100s add --config.train.grad_accum_steps=2 (the
             token stage needs 90.7 GiB per chip otherwise)
  3B         v5p:4x4x4, 8 H100s (cuBLAS GEMMs: XLA's Triton tiling fails one of its
             GEMMs); on v5e:4x4 add --config.model.remat=dots
"""

from npp_jax import config_lib


def get_config(size: str = "L"):
  return config_lib.get_config(size.upper())

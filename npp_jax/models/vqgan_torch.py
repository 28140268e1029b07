"""The VQ tokenizer's PyTorch layout: LlamaGen `vq_ds16_c2i.pt` -> Flax params of `VQModel`."""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from npp_jax.infra.torch_io import mismatch_error
from npp_jax.models.vqgan import VQConfig, abstract_params

# Buffers of the reference that are not parameters (codebook usage statistics).
_IGNORED = re.compile(r"(^|\.)codebook_used$")


def flax_path(name: str, ndim: int) -> tuple[str, ...]:
  """Reference name -> Flax param path: `a.conv_blocks.0.res.1.conv1.weight` ->
  (a, conv_blocks_0, res_1, conv1, kernel); 1-D weights are GroupNorm scales."""
  parts = name.split(".")
  merged: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{p}"
    else:
      merged.append(p)
  leaf = parts[-1]
  if merged[-1:] == ["embedding"] and merged[:1] == ["quantize"]:
    return tuple(merged)
  if leaf == "weight":
    leaf = "kernel" if ndim == 4 else "scale"
  return (*merged, leaf)


def _to_flax(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # (out,in,kh,kw) -> HWIO


def params_from_torch(sd: Mapping[str, Any], cfg: VQConfig) -> dict[str, Any]:
  """Reference state dict -> Flax params; every name and shape checked in one error."""
  want = {
    tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params(cfg)))
  }
  got, unexpected = {}, []
  for name, value in sd.items():
    if _IGNORED.search(name):
      continue
    path = flax_path(name, np.ndim(value))
    if path in want:
      got[path] = _to_flax(value)
    else:
      unexpected.append(name)
  missing = sorted(".".join(p) for p in set(want) - set(got))
  bad = sorted(
    f"{'.'.join(p)}: checkpoint {got[p].shape}, model {want[p]}"
    for p in set(want) & set(got)
    if got[p].shape != want[p]
  )
  if missing or unexpected or bad:
    emb = sd.get("quantize.embedding.weight")
    hint = ""
    if emb is not None and tuple(np.shape(emb)) != (cfg.codebook_size, cfg.codebook_embed_dim):
      hint = (
        f"the checkpoint's codebook is {tuple(np.shape(emb))}: set codebook_size and "
        "codebook_embed_dim to match."
      )
    # The width and latent channels the checkpoint has, read off its first and last
    # encoder convolutions (Conv2d weights are (out, in, kh, kw)).
    found = {
      key: int(np.shape(sd[name])[0])
      for key, name in (("ch", "encoder.conv_in.weight"), ("z_channels", "encoder.conv_out.weight"))
      if name in sd and np.ndim(sd[name]) == 4
    }
    found = {k: v for k, v in found.items() if v != getattr(cfg, k)}
    if found:
      flags = " ".join(f"--config.tokenizer.{k}={v}" for k, v in found.items())
      hint = f"{hint} " if hint else ""
      hint += f"the checkpoint has {', '.join(f'{k}={v}' for k, v in found.items())}: set {flags}."
    what = (
      f"the VQ tokenizer (ch={cfg.ch}, ch_mult={cfg.ch_mult}, z_channels={cfg.z_channels}, "
      f"codebook {cfg.codebook_size}x{cfg.codebook_embed_dim})"
    )
    raise mismatch_error(what, missing, unexpected, bad, hint)
  params: dict[str, Any] = {}
  for path, value in got.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return params

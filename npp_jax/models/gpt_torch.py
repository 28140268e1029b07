"""The LlamaGen GPT's PyTorch layout: reference state dict <-> Flax params of `GPT`.

sd = torch_io.load_torch_checkpoint("c2i_B_256.pt")
params = gpt_torch.params_from_torch(sd, GPTConfig.preset("B"))
sd2 = gpt_torch.params_to_torch(params, cfg)   # the exact inverse
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from npp_jax.infra.torch_io import mismatch_error, to_numpy
from npp_jax.models.gpt_config import PRESETS, GPTConfig


def torch_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
  """Reference state-dict names and shapes of `Transformer(ModelArgs(...))` for `cfg`."""
  d, hd = cfg.dim, cfg.head_dim
  qkv = (cfg.n_head + 2 * cfg.kv_heads) * hd
  shapes = {
    "tok_embeddings.weight": (cfg.vocab_size, d),
    "cls_embedding.embedding_table.weight": (cfg.class_rows, d),
    "norm.weight": (d,),
    "output.weight": (cfg.vocab_size, d),
  }
  for i in range(cfg.n_layer):
    p = f"layers.{i}."
    shapes |= {
      p + "attention.wqkv.weight": (qkv, d),
      p + "attention.wo.weight": (d, d),
      p + "feed_forward.w1.weight": (cfg.ffn_hidden, d),
      p + "feed_forward.w3.weight": (cfg.ffn_hidden, d),
      p + "feed_forward.w2.weight": (d, cfg.ffn_hidden),
      p + "attention_norm.weight": (d,),
      p + "ffn_norm.weight": (d,),
    }
  return shapes


def infer_gpt_config(sd: Mapping[str, Any], base: GPTConfig | None = None) -> GPTConfig | None:
  """Best guess of the GPTConfig a reference state dict was trained with (None if unsure)."""
  try:
    vocab, dim = np.shape(sd["tok_embeddings.weight"])
    rows = np.shape(sd["cls_embedding.embedding_table.weight"])[0]
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
  except (KeyError, ValueError):
    return None
  base = base or GPTConfig()
  n_head = next(
    (p["n_head"] for p in PRESETS.values() if p["dim"] == dim and p["n_layer"] == n_layer), None
  )
  if n_head is None:
    n_head = base.n_head if dim % base.n_head == 0 else None
  if n_head is None:
    return None
  classes = rows - 1 if base.has_null_class else rows
  kwargs = dict(
    dim=int(dim), n_layer=n_layer, n_head=n_head, vocab_size=int(vocab), num_classes=int(classes)
  )
  qkv = np.shape(sd.get("layers.0.attention.wqkv.weight", (0,)))[0]
  hd = dim // n_head
  if qkv and qkv != 3 * dim and (qkv - dim) % (2 * hd) == 0:
    kwargs["n_kv_head"] = (qkv - dim) // (2 * hd)
  try:
    return base.__class__(**{**base.to_dict(), **kwargs})
  except ValueError:
    return None


def describe(cfg: GPTConfig) -> str:
  preset = next(
    (n for n, p in PRESETS.items() if p["dim"] == cfg.dim and p["n_layer"] == cfg.n_layer), None
  )
  size = f"preset {preset!r}: " if preset else ""
  return (
    f"{size}dim={cfg.dim}, n_layer={cfg.n_layer}, n_head={cfg.n_head}, "
    f"n_kv_head={cfg.n_kv_head}, vocab_size={cfg.vocab_size}, "
    f"num_classes={cfg.num_classes}"
  )


def check_state_dict(sd: Mapping[str, Any], cfg: GPTConfig) -> None:
  """Raises one ValueError listing every missing, unexpected or mis-shaped tensor."""
  want = torch_shapes(cfg)
  missing = sorted(set(want) - set(sd))
  unexpected = sorted(set(sd) - set(want))
  bad = sorted(
    f"{k}: checkpoint {tuple(np.shape(sd[k]))}, model {want[k]}"
    for k in set(want) & set(sd)
    if tuple(np.shape(sd[k])) != want[k]
  )
  if not (missing or unexpected or bad):
    return
  guess = infer_gpt_config(sd, cfg)
  hint = f"the checkpoint looks like: {describe(guess)}" if guess and guess != cfg else ""
  raise mismatch_error(f"the model ({describe(cfg)})", missing, unexpected, bad, hint)


def params_from_torch(sd: Mapping[str, Any], cfg: GPTConfig) -> dict[str, Any]:
  """Reference state dict -> Flax params of `GPT(cfg)` (layers stacked on axis 0).

  Args:
    sd: {reference name: array}; from `load_torch_checkpoint`.
    cfg: the model the params are for; every name and shape is checked against it.

  Returns:
    A params pytree (numpy arrays in `cfg.param_dtype`) for `GPT(cfg).apply({"params": p}, ...)`.
  """
  check_state_dict(sd, cfg)
  dt = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else np.float32
  a = {k: np.asarray(to_numpy(v), dtype=np.float32) for k, v in sd.items()}
  d, hd, nh, nkv = cfg.dim, cfg.head_dim, cfg.n_head, cfg.kv_heads

  def layer(i):
    p = f"layers.{i}."
    wqkv = a[p + "attention.wqkv.weight"]
    wq, wk, wv = np.split(wqkv, [nh * hd, (nh + nkv) * hd], axis=0)
    return {
      "attention": {
        "wq": wq.T.reshape(d, nh, hd),
        "wk": wk.T.reshape(d, nkv, hd),
        "wv": wv.T.reshape(d, nkv, hd),
        "wo": a[p + "attention.wo.weight"].T.reshape(nh, hd, d),
      },
      "feed_forward": {
        "w1": a[p + "feed_forward.w1.weight"].T,
        "w3": a[p + "feed_forward.w3.weight"].T,
        "w2": a[p + "feed_forward.w2.weight"].T,
      },
      "attention_norm": {"weight": a[p + "attention_norm.weight"]},
      "ffn_norm": {"weight": a[p + "ffn_norm.weight"]},
    }

  layers = [layer(i) for i in range(cfg.n_layer)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  params = {
    "tok_embeddings": a["tok_embeddings.weight"],
    "cls_embedding": a["cls_embedding.embedding_table.weight"],
    "layers": stacked,
    "norm": {"weight": a["norm.weight"]},
    "output": a["output.weight"].T,
  }
  return jax.tree.map(lambda x: np.ascontiguousarray(x).astype(dt), params)


def params_to_torch(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
  """Flax params of `GPT(cfg)` -> reference state dict (numpy, float32): the exact inverse."""
  p = nn.unbox(params)
  f32 = lambda x: np.asarray(x, dtype=np.float32)
  d = cfg.dim
  sd = {
    "tok_embeddings.weight": f32(p["tok_embeddings"]),
    "cls_embedding.embedding_table.weight": f32(p["cls_embedding"]),
    "norm.weight": f32(p["norm"]["weight"]),
    "output.weight": f32(p["output"]).T,
  }
  lay = p["layers"]
  for i in range(cfg.n_layer):
    at, ff = lay["attention"], lay["feed_forward"]
    q, k, v = (f32(at[n][i]).reshape(d, -1).T for n in ("wq", "wk", "wv"))
    pre = f"layers.{i}."
    sd |= {
      pre + "attention.wqkv.weight": np.concatenate([q, k, v], axis=0),
      pre + "attention.wo.weight": f32(at["wo"][i]).reshape(-1, d).T,
      pre + "feed_forward.w1.weight": f32(ff["w1"][i]).T,
      pre + "feed_forward.w3.weight": f32(ff["w3"][i]).T,
      pre + "feed_forward.w2.weight": f32(ff["w2"][i]).T,
      pre + "attention_norm.weight": f32(lay["attention_norm"]["weight"][i]),
      pre + "ffn_norm.weight": f32(lay["ffn_norm"]["weight"][i]),
    }
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}

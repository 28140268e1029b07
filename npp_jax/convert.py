"""PyTorch checkpoints <-> Flax params for the LlamaGen GPT.

Library:
  sd = load_torch_checkpoint("c2i_B_256.pt")        # .pt/.pth (torch extra), .npz, .safetensors
  params = gpt_params_from_torch(sd, GPTConfig.preset("B"))
  sd2 = gpt_params_to_torch(params, cfg)              # exact inverse

CLI:
  python -m npp_jax.convert gpt --checkpoint c2i_B_256.pt --model B --out DIR
  python -m npp_jax.convert vq --checkpoint vq_ds16_c2i.pt --out DIR
"""

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from npp_jax.models.gpt_config import PRESETS, GPTConfig

log = logging.getLogger(__name__)

# Buffers the reference registers that are not parameters (RoPE tables, masks, caches).
_IGNORED = re.compile(r"(^|\.)(freqs_cis|causal_mask|k_cache|v_cache)$")
# Wrappers added by DDP, torch.compile and FSDP around parameter names.
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_WRAPPER_KEYS = ("model", "module", "state_dict")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; bf16 has no numpy dtype, so go through float32
    t = value.detach().cpu()
    if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
      t = t.float()
    return t.numpy()
  return np.asarray(value)


def _import_torch():
  try:
    import torch  # noqa: PLC0415 (optional dependency, imported lazily)
  except ImportError as e:
    raise ImportError(
      "reading a PyTorch .pt/.pth file needs PyTorch: `pip install 'npp_jax[torch]'` (on a "
      "CPU-only machine `pip install torch==2.13.0` or the CPU wheel index), or convert the "
      "file to .npz/.safetensors elsewhere."
    ) from e
  return torch


def unwrap_state_dict(obj: Any, key: str | None = None) -> dict[str, Any]:
  """Finds the state dict inside a checkpoint object and strips DDP/compile/FSDP prefixes.

  Accepts `{"model": sd}`, `{"module": sd}`, `{"state_dict": sd}` or a bare state dict.
  `key` picks another entry (for example "ema").
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors.")
  if key is not None:
    if key not in obj:
      raise ValueError(f"checkpoint has no entry {key!r}; it has {sorted(obj)}.")
    obj = obj[key]
  else:
    for k in _WRAPPER_KEYS:
      if k in obj and isinstance(obj[k], Mapping):
        obj = obj[k]
        break
  out = {}
  for name, value in obj.items():
    if not isinstance(name, str) or not (hasattr(value, "shape") or isinstance(value, np.ndarray)):
      continue  # step counters, args and other metadata
    for p in _PREFIXES:
      name = name.replace(p, "")
    if _IGNORED.search(name):
      continue
    out[name] = value
  if not out:
    raise ValueError("checkpoint contains no tensors (expected a state dict of parameters).")
  return out


def load_torch_checkpoint(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a checkpoint into {reference_name: numpy array}.

  Formats: `.pt`/`.pth`/`.bin` (PyTorch, the `torch` extra), `.npz`, `.safetensors`.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".pt", ".pth", ".bin", ".ckpt", ".npz", ".safetensors"):
    raise ValueError(
      f"unknown checkpoint format {ext!r} for {path}; use .pt, .pth, .npz or .safetensors."
    )
  torch = _import_torch() if ext not in (".npz", ".safetensors") else None
  try:
    if torch is not None:
      try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # noqa: BLE001
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
          raise
        # Released training checkpoints may pickle argparse args next to the weights.
        log.warning(
          "%s holds pickled objects besides tensors; loading it with "
          "weights_only=False (only do this for files you trust).",
          path,
        )
        obj = torch.load(path, map_location="cpu", weights_only=False)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as z:
        obj = {k: z[k] for k in z.files}
    else:
      from safetensors.numpy import load_file  # noqa: PLC0415

      obj = load_file(path)
  except Exception as e:  # noqa: BLE001 (torch, zip, pickle and safetensors raise many kinds)
    raise ValueError(
      f"could not read checkpoint {path} ({type(e).__name__}: {e}); the file is "
      "corrupt or truncated: download or convert it again."
    ) from e
  return {k: _to_numpy(v) for k, v in unwrap_state_dict(obj, key).items()}


def gpt_torch_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
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


def _describe(cfg: GPTConfig) -> str:
  preset = next(
    (n for n, p in PRESETS.items() if p["dim"] == cfg.dim and p["n_layer"] == cfg.n_layer), None
  )
  size = f"preset {preset!r}: " if preset else ""
  return (
    f"{size}dim={cfg.dim}, n_layer={cfg.n_layer}, n_head={cfg.n_head}, "
    f"n_kv_head={cfg.n_kv_head}, vocab_size={cfg.vocab_size}, "
    f"num_classes={cfg.num_classes}"
  )


def check_gpt_state_dict(sd: Mapping[str, Any], cfg: GPTConfig) -> None:
  """Raises one ValueError listing every missing, unexpected or mis-shaped tensor."""
  want = gpt_torch_shapes(cfg)
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
  hint = f"the checkpoint looks like: {_describe(guess)}" if guess and guess != cfg else ""
  raise mismatch_error(f"the model ({_describe(cfg)})", missing, unexpected, bad, hint)


def mismatch_error(
  what: str, missing: list[str], unexpected: list[str], bad: list[str], hint: str = ""
) -> ValueError:
  """One ValueError listing (the first few of) every missing, unexpected, mis-shaped tensor."""

  def short(items):
    return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")

  lines = [f"checkpoint does not fit {what}:"]
  for label, items in (
    ("missing", missing),
    ("unexpected", sorted(unexpected)),
    ("wrong shape", bad),
  ):
    if items:
      lines.append(f"  {label}: {short(items)}")
  if hint:
    lines.append(f"  {hint}")
  return ValueError("\n".join(lines))


def gpt_params_from_torch(sd: Mapping[str, Any], cfg: GPTConfig) -> dict[str, Any]:
  """Reference state dict -> Flax params of `GPT(cfg)` (layers stacked on axis 0).

  Args:
    sd: {reference name: array}; from `load_torch_checkpoint`.
    cfg: the model the params are for; every name and shape is checked against it.

  Returns:
    A params pytree (numpy arrays in `cfg.param_dtype`) for `GPT(cfg).apply({"params": p}, ...)`.
  """
  check_gpt_state_dict(sd, cfg)
  dt = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else np.float32
  a = {k: np.asarray(_to_numpy(v), dtype=np.float32) for k, v in sd.items()}
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
  import jax  # noqa: PLC0415 (keep `python -m npp_jax.convert --help` fast)

  stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  params = {
    "tok_embeddings": a["tok_embeddings.weight"],
    "cls_embedding": a["cls_embedding.embedding_table.weight"],
    "layers": stacked,
    "norm": {"weight": a["norm.weight"]},
    "output": a["output.weight"].T,
  }
  return jax.tree.map(lambda x: np.ascontiguousarray(x).astype(dt), params)


def gpt_params_to_torch(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
  """Flax params of `GPT(cfg)` -> reference state dict (numpy, float32): the exact inverse."""
  import flax.linen as nn  # noqa: PLC0415

  p = nn.unbox(params)
  p = {k: v for k, v in p.items()}
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


def _parse_overrides(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects NAME=VALUE, got {item!r}.")
    k, v = item.split("=", 1)
    out[k] = (
      None
      if v == "None"
      else (
        int(v) if v.lstrip("-").isdigit() else (float(v) if re.fullmatch(r"-?[\d.e+-]+", v) else v)
      )
    )
  return out


def main(argv: list[str] | None = None) -> int:
  """`python -m npp_jax.convert gpt --checkpoint FILE --model B --out DIR`."""
  parser = argparse.ArgumentParser(
    prog="python -m npp_jax.convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="kind", required=True)
  g = sub.add_parser("gpt", help="LlamaGen/NPP GPT checkpoint -> orbax params directory")
  g.add_argument("--checkpoint", required=True, help=".pt/.pth/.npz/.safetensors file")
  g.add_argument("--model", required=True, help=f"model size, one of {sorted(PRESETS)}")
  g.add_argument("--out", required=True, help="output directory (orbax params + config)")
  g.add_argument("--key", default=None, help="checkpoint entry to read (default: model)")
  g.add_argument(
    "--set",
    nargs="*",
    default=[],
    metavar="NAME=VALUE",
    help="GPTConfig overrides, e.g. num_classes=1000 vocab_size=16384",
  )
  g.add_argument("--force", action="store_true", help="replace an existing output")
  v = sub.add_parser("vq", help="LlamaGen VQ tokenizer checkpoint -> orbax params directory")
  v.add_argument("--checkpoint", required=True, help="vq_ds16_c2i.pt (or .npz/.safetensors)")
  v.add_argument("--model", default="VQ-16", help="VQ-16 or VQ-8")
  v.add_argument("--out", required=True)
  v.add_argument("--key", default=None)
  v.add_argument(
    "--set",
    nargs="*",
    default=[],
    metavar="NAME=VALUE",
    help="VQConfig overrides, e.g. codebook_size=16384 codebook_embed_dim=8",
  )
  v.add_argument("--force", action="store_true")
  args = parser.parse_args(argv)

  from npp_jax import checkpoint_io  # noqa: PLC0415

  sd = load_torch_checkpoint(args.checkpoint, key=args.key)
  n = sum(int(np.prod(x.shape)) for x in sd.values())
  if args.kind == "vq":
    from npp_jax import convert_vq  # noqa: PLC0415
    from npp_jax.models.vqgan import VQConfig  # noqa: PLC0415

    vcfg = VQConfig.preset(args.model, **_parse_overrides(args.set))
    params = convert_vq.vq_params_from_torch(sd, vcfg)
    out = checkpoint_io.save_params(args.out, params, vcfg, force=args.force)
    print(f"converted {args.checkpoint} ({n:,} values, {args.model}) -> {out}")
    return 0
  cfg = GPTConfig.preset(args.model, **_parse_overrides(args.set))
  params = gpt_params_from_torch(sd, cfg)
  out = checkpoint_io.save_params(args.out, params, cfg, force=args.force)
  print(f"converted {args.checkpoint} ({n:,} parameters, {_describe(cfg)}) -> {out}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)

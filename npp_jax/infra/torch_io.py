"""Reading PyTorch checkpoints as numpy state dicts, for every model's converter.

`load_torch_checkpoint(path)` reads `.pt`/`.pth` (the `torch` extra), `.npz` or
`.safetensors` into {reference name: numpy array}, unwrapping training-checkpoint
wrappers; `mismatch_error` is the one error all converters raise for a checkpoint that
does not fit a model. The name mappings themselves live next to each model
(`models/gpt_torch.py`, `models/vqgan_torch.py`, `models/inception_torch.py`).
"""

import argparse
import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from npp_jax.infra import digests, storage

log = logging.getLogger(__name__)

# Buffers the reference registers that are not parameters (RoPE tables, masks, caches).
_IGNORED = re.compile(r"(^|\.)(freqs_cis|causal_mask|k_cache|v_cache)$")
# Wrappers added by DDP, torch.compile and FSDP around parameter names.
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_WRAPPER_KEYS = ("model", "module", "state_dict")


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array-like as a numpy array (bf16/fp16 tensors widened to float32)."""
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
      "reading a PyTorch .pt/.pth file needs PyTorch: `pip install -e '.[torch]'` in the "
      "npp_jax clone (on a "
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


class UnsafeCheckpointError(ValueError):
  """A `.pt` file carries pickled objects that could run code when loaded."""


# Harmless non-tensor types that released LlamaGen / NPP training checkpoints pickle (their
# command-line arguments). Anything else needs an explicit `trust`.
SAFE_GLOBALS = (argparse.Namespace,)


def torch_file_problem(f) -> str | None:
  """Why the open binary file `f` is not an intact PyTorch checkpoint, or None.

  A checkpoint is a zip archive holding `<name>/data.pkl` (PyTorch >= 1.6) whose entries
  pass their CRC, or a legacy pickle (it starts with the pickle protocol byte 0x80)."""
  head = f.read(4)
  f.seek(0)
  if head[:2] == b"PK":
    try:
      with zipfile.ZipFile(f) as z:
        names = z.namelist()
        broken = z.testzip()  # reads every entry: a flipped byte fails its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      return f"a truncated or corrupt PyTorch archive ({e})"
    if not any(n.endswith("data.pkl") for n in names):
      return "a zip archive but not a PyTorch checkpoint (it has no data.pkl)"
    if broken is not None:
      return f"a corrupt PyTorch archive (its entry {broken} fails its checksum)"
    return None
  if head[:1] == b"\x80":
    return None  # a legacy PyTorch pickle: torch.load checks what is in it
  return "not a PyTorch file (neither a zip archive nor a pickle)"


def _torch_load(torch, path: str, trust: bool) -> Any:
  data = storage.read_bytes(path) if storage.is_remote(path) else None  # read once
  with io.BytesIO(data) if data is not None else open(path, "rb") as f:
    problem = torch_file_problem(f)
  source = io.BytesIO(data) if data is not None else path
  if problem:
    raise ValueError(f"{path} is {problem}: download or convert it again.")
  if trust:
    log.warning("loading %s with weights_only=False: it may run code (trusted on request).", path)
    return torch.load(source, map_location="cpu", weights_only=False)
  torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
  try:
    return torch.load(source, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if not found and "weights_only" not in str(e).lower().replace(" ", "_"):
      # Not a refused object: the pickle itself is damaged (a truncated legacy file).
      raise ValueError(
        f"{path} is a damaged PyTorch pickle ({str(e).splitlines()[0]}): download or convert "
        "it again."
      ) from None
    what = f"a pickled {found.group(1)}" if found else "pickled objects besides tensors"
    raise UnsafeCheckpointError(
      f"{path} holds {what}, which could run code when loaded, so it was not loaded. If you "
      "trust the file, pass --trust_checkpoint (convert) or --config.trust_checkpoint=True."
    ) from None


def load_torch_checkpoint(
  path: str, key: str | None = None, trust: bool = False
) -> dict[str, np.ndarray]:
  """Reads a checkpoint into {reference_name: numpy array}.

  Formats: `.pt`/`.pth`/`.bin` (PyTorch, the `torch` extra), `.npz`, `.safetensors`.
  `.pt` files are loaded weights-only: tensors, plain containers and SAFE_GLOBALS; any
  other pickled object raises UnsafeCheckpointError unless `trust` is set.
  """
  if not storage.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".pt", ".pth", ".bin", ".ckpt", ".npz", ".safetensors"):
    raise ValueError(
      f"unknown checkpoint format {ext!r} for {path}; use .pt, .pth, .npz or .safetensors."
    )
  digests.check(path, "checkpoint")
  torch = _import_torch() if ext not in (".npz", ".safetensors") else None
  try:
    if torch is not None:
      obj = _torch_load(torch, path, trust)
    elif ext == ".npz":
      obj = storage.load_npz(path)
    else:
      from safetensors.numpy import load  # noqa: PLC0415

      obj = load(storage.read_bytes(path))
  except UnsafeCheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 (torch, zip, pickle and safetensors raise many kinds)
    raise ValueError(
      f"could not read checkpoint {path} ({type(e).__name__}: {e}); the file is "
      "corrupt or truncated: download or convert it again."
    ) from e
  return {k: to_numpy(v) for k, v in unwrap_state_dict(obj, key).items()}


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

"""The settings a training run stored, so that sampling and evaluating it repeat no flag.

A training checkpoint's meta holds the config the run was trained with. `mode=sample`
and `mode=eval` on that workdir take its model, tokenizer and data sections from there
(and the tokenizer the codes were extracted with, from the extraction's
`extract_settings.json`), so the command line only needs what changes the samples. A
flag that contradicts the run's weights (another shape, another tokenizer) is refused;
one that only changes how they are run (`model.attention`, `model.dtype`, a moved
`tokenizer.checkpoint`) is taken.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections

from npp_jax import config_lib
from npp_jax.infra import checkpoint, storage
from npp_jax.models.vqgan import VQ_PRESETS

log = logging.getLogger(__name__)

# Sections of the config that describe the trained model and its data.
SECTIONS = ("model", "tokenizer", "data")
# Keys that decide what the weights are and what their tokens mean: a command-line value
# that differs from the run's is refused.
_TOKENIZER_KEYS = ("name", "preset", "codebook_embed_dim", "ch", "z_channels", "levels")
FIXED = tuple(k for k in config_lib.FIXED_KEYS if k.startswith("model.")) + tuple(
  f"tokenizer.{k}" for k in _TOKENIZER_KEYS
)


def adopt(c: ml_collections.ConfigDict, workdir: str, given: Mapping[str, Any]) -> list[str]:
  """Sets `c`'s model, tokenizer and data keys to the run's in `workdir`, except those
  `given` on the command line (flat `section.key` names); returns what changed.

  Does nothing when the weights do not come from the workdir's checkpoints (an explicit
  `sample.checkpoint`, or no checkpoint yet). Raises ValueError for a given value that
  contradicts the run.
  """
  if c.mode == "sample" and c.sample.checkpoint:
    return []
  directory = storage.join(storage.absolute(workdir), "checkpoints")
  found = checkpoint.newest_meta(directory)
  if found is None or "config" not in found[1]:
    return []
  step, meta = found
  run = {k: v for k, v in checkpoint.flatten(meta["config"]).items() if k.split(".")[0] in SECTIONS}
  run |= _extraction_tokenizer(run)
  where = f"the run in {storage.absolute(workdir)} (checkpoint at step {step})"
  for key in FIXED:
    if key in given and key in run and _json(given[key]) != _json(run[key]):
      raise ValueError(
        f"--config.{key}={given[key]!r} contradicts {where}, trained with {run[key]!r}: "
        "drop the flag (sample and eval take the model from the run), or name other "
        "weights with --config.sample.checkpoint."
      )
  changed = []
  for key, value in run.items():
    if key in given or not _has(c, key):
      continue
    if _json(_get(c, key)) != _json(value):
      changed.append(f"{key}={value!r}")
      _set(c, key, value)
  if changed:
    log.info("taking from %s: %s", where, ", ".join(changed))
  return changed


def _extraction_tokenizer(run: dict[str, Any]) -> dict[str, Any]:
  """The VQ tokenizer the run's codes were extracted with (empty when unknown): the
  training config need not name it, the extraction recorded it."""
  if run.get("tokenizer.name") != "vq" or run.get("data.name") == "mnist":
    return {}
  first = next((p.strip() for p in str(run.get("data.path", "")).split(",") if p.strip()), "")
  path = storage.join(first, "extract_settings.json") if first else ""
  try:
    tok = json.loads(storage.read_text(path))["tokenizer"] if path else None
  except (OSError, ValueError, KeyError) as e:
    log.info("no tokenizer record in %s (%s): the config's tokenizer is used", path, e)
    return {}
  if not tok:
    return {}
  preset = next((n for n, p in VQ_PRESETS.items() if list(p["ch_mult"]) == tok["ch_mult"]), None)
  if preset is None:
    return {}
  out = {
    "tokenizer.preset": preset,
    "tokenizer.ch": tok["ch"],
    "tokenizer.z_channels": tok["z_channels"],
    "tokenizer.codebook_embed_dim": tok["codebook_embed_dim"],
    "tokenizer.precision": tok["precision"],
  }
  if not run.get("tokenizer.checkpoint"):
    out["tokenizer.checkpoint"] = tok["checkpoint"]
  return out


def _json(value: Any) -> Any:
  """Tuples and lists compare equal, as the stored JSON has lists."""
  return json.loads(json.dumps(value, default=str))


def _has(c: ml_collections.ConfigDict, dotted: str) -> bool:
  *parents, leaf = dotted.split(".")
  node = c
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      return False
    node = node[p]
  return leaf in node and not isinstance(node[leaf], ml_collections.ConfigDict)


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  return c[leaf]


def _set(c: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  if isinstance(c[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  c[leaf] = value

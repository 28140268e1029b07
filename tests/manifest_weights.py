"""Regenerates golden random weights bit for bit from a `*_manifest.json` (golden README rule)."""

import json

import numpy as np


def generate(manifest_path) -> dict[str, np.ndarray]:
  with open(manifest_path) as f:
    manifest = json.load(f)
  rng = np.random.default_rng(manifest["seed"])
  out = {}
  for t in manifest["tensors"]:
    shape, dtype = tuple(t["shape"]), t["dtype"]
    if t["init"] == "normal":
      out[t["name"]] = (t["mean"] + t["std"] * rng.standard_normal(shape)).astype(dtype)
    elif t["init"] == "uniform":
      out[t["name"]] = (t["low"] + (t["high"] - t["low"]) * rng.random(shape)).astype(dtype)
    elif t["init"] == "zeros":
      out[t["name"]] = np.zeros(shape, dtype)
    elif t["init"] == "constant":
      out[t["name"]] = np.full(shape, t["value"], dtype)
    else:
      raise ValueError(f"unknown init {t['init']!r} for {t['name']}")
  return out

"""The FID Inception's PyTorch layout: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` ->
Flax variables of `InceptionV3`."""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from npp_jax.infra.torch_io import mismatch_error
from npp_jax.models.inception import abstract_variables


def _flax_path(name: str) -> tuple[str, tuple[str, ...]] | None:
  """Reference name -> (collection, path); None for buffers that are not needed."""
  parts = name.split(".")
  leaf, mods = parts[-1], parts[:-1]
  if leaf == "num_batches_tracked":
    return None
  if mods[-1:] == ["bn"]:
    table = {
      "weight": ("params", "scale"),
      "bias": ("params", "bias"),
      "running_mean": ("batch_stats", "mean"),
      "running_var": ("batch_stats", "var"),
    }
    col, new = table[leaf]
    return col, (*mods, new)
  return "params", (*mods, "kernel" if leaf == "weight" else leaf)


def variables_from_torch(sd: Mapping[str, Any]) -> dict[str, Any]:
  """State dict of the FID Inception -> {"params", "batch_stats"} for `InceptionV3`.

  Every name and shape is checked; problems are listed in one ValueError.
  """
  want = {}
  for col, tree in nn.unbox(abstract_variables()).items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      want[(col, tuple(str(getattr(k, "key", k)) for k in path))] = tuple(leaf.shape)
  got, unexpected = {}, []
  for name, value in sd.items():
    where = _flax_path(name)
    if where is None:
      continue
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    if where in want:
      got[where] = value
    else:
      unexpected.append(name)
  missing = sorted(".".join(p[1]) for p in set(want) - set(got))
  bad = sorted(
    f"{'.'.join(k[1])}: checkpoint {got[k].shape}, model {want[k]}"
    for k in set(want) & set(got)
    if got[k].shape != want[k]
  )
  if missing or unexpected or bad:
    raise mismatch_error("the FID InceptionV3 (pt_inception-2015-12-05)", missing, unexpected, bad)
  out: dict[str, Any] = {}
  for (col, path), value in got.items():
    node = out.setdefault(col, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out

"""`--config.mode=eval`: FID, sFID, Inception Score, precision and recall of a sample batch.

Reads the sampler's `.npz` (ADM format: `arr_0` uint8 (N, H, W, 3)) and a reference batch
(ADM's `VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`, `mu_s`, `sigma_s` and images
`arr_0`, or images only), runs the FID InceptionV3 (pytorch-fid weights, given by path)
sharded over the devices, and writes WORKDIR/eval.json. Reference features are cached in
WORKDIR/eval_cache so a second evaluation against the same batch skips them.
"""

import functools
import glob
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from npp_jax import convert, convert_inception, metrics_fid, sharding
from npp_jax.models import inception

log = logging.getLogger(__name__)

_PREPROCESS = {"adm": inception.preprocess_adm, "pytorch_fid": inception.preprocess_pytorch_fid}


def check_images(arr: Any, what: str) -> np.ndarray:
  """An ADM image batch: uint8 (N, H, W, 3). Anything else is a clear ValueError."""
  arr = np.asarray(arr)
  if arr.dtype != np.uint8:
    raise ValueError(
      f"{what}: images must be uint8 in [0, 255] (ADM format), got {arr.dtype}; "
      "convert with np.clip(x, 0, 255).astype(np.uint8)."
    )
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise ValueError(f"{what}: images must be (N, H, W, 3) NHWC RGB, got shape {arr.shape}.")
  if len(arr) < 2:
    raise ValueError(f"{what}: need at least 2 images, got {len(arr)}.")
  return arr


def load_npz(path: str, what: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist.")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{what} {path} is not a readable .npz ({e}).") from e


@functools.cache
def _features_fn(preprocess: str):
  """One jitted feature function per preprocessing, shared by every extractor."""
  pre = _PREPROCESS[preprocess]

  def features(v, images):
    out = inception.InceptionV3().apply(v, pre(images))
    return out["pool3"], out["sfid_spatial"], out["logits_nobias"]

  return jax.jit(features)


class FeatureExtractor:
  """pool3 (2048), sFID spatial (2023) and bias-free logits (1008) for uint8 image batches."""

  def __init__(self, variables: Any, preprocess: str, batch: int, mesh=None):
    if preprocess not in _PREPROCESS:
      raise ValueError(f"eval.preprocess={preprocess!r}; use 'adm' or 'pytorch_fid'.")
    self.mesh = mesh or sharding.make_mesh({"data": -1})
    dp = sharding.data_parallel_size(self.mesh)
    self.batch = batch + (-batch) % dp
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._fn = _features_fn(preprocess)
    self._sharding = sharding.batch_sharding(self.mesh)

  def __call__(self, images: np.ndarray, desc: str = "features"):
    """Yields (pool3, spatial, logits) numpy batches for `images` (uint8 NHWC)."""
    from tqdm import tqdm  # noqa: PLC0415

    for i in tqdm(
      range(0, len(images), self.batch), desc=desc, unit="batch", disable=jax.process_index() != 0
    ):
      chunk = images[i : i + self.batch]
      n = len(chunk)
      if n < self.batch:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
      out = self._fn(self.variables, jax.device_put(jnp.asarray(chunk), self._sharding))
      if jax.process_count() > 1:  # every host gets the whole batch's features
        out = multihost_utils.process_allgather(out, tiled=True)
      yield tuple(np.asarray(o)[:n] for o in out)


def batch_features(extract: FeatureExtractor, images: np.ndarray, desc: str) -> dict:
  """Streaming statistics plus the per-image pool3 features and logits."""
  pool_stats, spatial_stats = metrics_fid.GaussianStats(2048), metrics_fid.GaussianStats(2023)
  pools, logits = [], []
  for pool3, spatial, lg in extract(images, desc):
    pool_stats.update(pool3)
    spatial_stats.update(spatial)
    pools.append(pool3)
    logits.append(lg)
  mu, sigma = pool_stats.mean_cov()
  mu_s, sigma_s = spatial_stats.mean_cov()
  return {
    "mu": mu,
    "sigma": sigma,
    "mu_s": mu_s,
    "sigma_s": sigma_s,
    "pool3": np.concatenate(pools),
    "logits": np.concatenate(logits),
  }


def reference_statistics(
  path: str, extract: FeatureExtractor, cache_dir: str, preprocess: str
) -> dict:
  """mu/sigma/mu_s/sigma_s (stored ones preferred) and pool3 features of the reference."""
  st = os.stat(path)
  key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime}:{preprocess}".encode())
  cache = os.path.join(cache_dir, f"ref_{key.hexdigest()[:16]}.npz")
  if os.path.exists(cache):
    log.info("reference statistics from cache %s", cache)
    return load_npz(cache, "reference cache")
  ref = load_npz(path, "reference batch")
  has_stats = all(k in ref for k in ("mu", "sigma", "mu_s", "sigma_s"))
  if "arr_0" not in ref and not has_stats:
    raise ValueError(
      f"reference batch {path} has keys {sorted(ref)}; it needs images `arr_0` "
      "or all of `mu`, `sigma`, `mu_s`, `sigma_s` (ADM's reference batches)."
    )
  out: dict[str, np.ndarray] = {}
  if "arr_0" in ref:
    feats = batch_features(extract, check_images(ref["arr_0"], "reference batch"), "reference")
    out = {k: feats[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool3")}
  if has_stats:
    out.update({k: np.asarray(ref[k], np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")})
  os.makedirs(cache_dir, exist_ok=True)
  np.savez(cache, **out)
  return out


def latest_samples(workdir: str) -> str:
  found = sorted(glob.glob(os.path.join(workdir, "samples", "samples_*.npz")), key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(
      f"no samples_*.npz in {workdir}/samples: run --config.mode=sample "
      "first or set --config.eval.samples."
    )
  return found[-1]


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Computes the ADM metrics; returns them and writes WORKDIR/eval.json."""
  e = c.eval
  if e.kind == "mnist_classifier":
    from npp_jax import demo_eval  # noqa: PLC0415

    return demo_eval.run(c, workdir)
  if e.kind != "inception":
    raise ValueError(f"eval.kind={e.kind!r}; use 'inception' or 'mnist_classifier'.")
  if not e.reference:
    raise ValueError(
      "eval.reference is empty: give the ADM reference batch "
      "(VIRTUAL_imagenet256_labeled.npz) or an npz of reference images `arr_0`."
    )
  if not e.inception_checkpoint:
    raise ValueError(
      "eval.inception_checkpoint is empty: give pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (never downloaded at run time)."
    )
  samples_path = e.samples or latest_samples(workdir)
  data = load_npz(samples_path, "sample batch")
  if "arr_0" not in data:
    raise ValueError(f"sample batch {samples_path} has keys {sorted(data)}, no `arr_0` images.")
  samples = check_images(data["arr_0"], f"sample batch {samples_path}")
  variables = convert_inception.inception_variables_from_torch(
    convert.load_torch_checkpoint(e.inception_checkpoint)
  )
  extract = FeatureExtractor(
    variables, e.preprocess, e.batch_size, sharding.make_mesh(c.mesh.to_dict())
  )
  ref = reference_statistics(
    e.reference, extract, os.path.join(workdir, "eval_cache"), e.preprocess
  )
  smp = batch_features(extract, samples, "samples")
  result = {
    "fid": metrics_fid.frechet_distance(smp["mu"], smp["sigma"], ref["mu"], ref["sigma"]),
    "sfid": metrics_fid.frechet_distance(smp["mu_s"], smp["sigma_s"], ref["mu_s"], ref["sigma_s"]),
    "inception_score": metrics_fid.inception_score(smp["logits"], e.is_split_size),
    "num_samples": len(samples),
    "samples": samples_path,
    "reference": e.reference,
    "preprocess": e.preprocess,
  }
  if "pool3" in ref:
    result["precision"], result["recall"] = metrics_fid.precision_recall(ref["pool3"], smp["pool3"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
  log.info(
    "FID %.3f | sFID %.3f | IS %.2f | precision %s | recall %s",
    result["fid"],
    result["sfid"],
    result["inception_score"],
    result.get("precision"),
    result.get("recall"),
  )
  return result

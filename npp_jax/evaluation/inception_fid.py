"""FID Inception features of image batches, sharded over the devices, and their statistics.

`FeatureExtractor` yields pool3 (2048), the sFID spatial features (2023) and the bias-free
logits (1008) of uint8 images; `batch_features` reduces them to FID/sFID statistics;
`reference_statistics` does the same for an ADM reference batch, cached on disk.
"""

import functools
import hashlib
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from npp_jax import sharding, storage
from npp_jax.evaluation import stats
from npp_jax.evaluation.sample_batches import check_images, load_npz
from npp_jax.models import inception

log = logging.getLogger(__name__)

PREPROCESS = {"adm": inception.preprocess_adm, "pytorch_fid": inception.preprocess_pytorch_fid}


@functools.cache
def features_fn(preprocess: str, mesh):
  """The jitted feature function of a preprocessing on `mesh` (weights replicated, images
  split over its data axes), shared by every extractor."""
  pre = PREPROCESS[preprocess]

  def features(v, images):
    out = inception.InceptionV3().apply(v, pre(images))
    return out["pool3"], out["sfid_spatial"], out["logits_nobias"]

  shardings = (sharding.replicated(mesh), sharding.batch_sharding(mesh))
  return jax.jit(features, in_shardings=shardings)


def lower_features(preprocess: str, mesh, batch: int, image_size: int) -> jax.stages.Lowered:
  """The feature step for `batch` uint8 images of `image_size` px, from shapes alone."""
  variables = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
    inception.abstract_variables(),
  )
  images = jax.ShapeDtypeStruct(
    (batch, image_size, image_size, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh)
  )
  return features_fn(preprocess, mesh).lower(variables, images)


class FeatureExtractor:
  """pool3 (2048), sFID spatial (2023) and bias-free logits (1008) for uint8 image batches."""

  def __init__(self, variables: Any, preprocess: str, batch: int, mesh=None):
    if preprocess not in PREPROCESS:
      raise ValueError(f"eval.preprocess={preprocess!r}; use 'adm' or 'pytorch_fid'.")
    self.mesh = mesh or sharding.make_mesh({"data": -1})
    dp = sharding.data_parallel_size(self.mesh)
    self.batch = batch + (-batch) % dp
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._fn = features_fn(preprocess, self.mesh)
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
  pool_stats, spatial_stats = stats.GaussianStats(2048), stats.GaussianStats(2023)
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
  stamp = f"{storage.absolute(path)}:{storage.size(path)}:{storage.mtime(path)}:{preprocess}"
  key = hashlib.sha1(stamp.encode())
  cache = storage.join(cache_dir, f"ref_{key.hexdigest()[:16]}.npz")
  if storage.exists(cache):
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
  storage.save_npz(cache, **out)
  return out


def adm_metrics(
  extract: FeatureExtractor, samples: np.ndarray, ref: dict, is_split_size: int
) -> dict[str, float]:
  """FID, sFID, Inception Score and (when the reference has images) precision/recall."""
  smp = batch_features(extract, samples, "samples")
  result = {
    "fid": stats.frechet_distance(smp["mu"], smp["sigma"], ref["mu"], ref["sigma"]),
    "sfid": stats.frechet_distance(smp["mu_s"], smp["sigma_s"], ref["mu_s"], ref["sigma_s"]),
    "inception_score": stats.inception_score(smp["logits"], is_split_size),
  }
  if "pool3" in ref:
    result["precision"], result["recall"] = stats.precision_recall(ref["pool3"], smp["pool3"])
  return result

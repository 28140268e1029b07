"""FID Inception features of image batches, sharded over the devices, and their statistics.

`FeatureExtractor` yields pool3 (2048), the sFID spatial features (2023) and the bias-free
logits (1008) of uint8 images; `batch_features` reduces them to FID/sFID statistics;
`reference_statistics` does the same for an ADM reference batch, cached on disk.
"""

import functools
import hashlib
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from npp_jax import sharding
from npp_jax.evaluation import stats
from npp_jax.evaluation.sample_batches import NpzImages, load_npz, npz_keys
from npp_jax.infra import digests, storage
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
    if batch < 1:
      raise ValueError(f"eval.batch_size={batch} must be >= 1 (images per Inception step).")
    self.mesh = mesh or sharding.make_mesh({"data": -1})
    self.dp = sharding.data_parallel_size(self.mesh)
    self.batch = batch + (-batch) % self.dp
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._fn = features_fn(preprocess, self.mesh)
    self._sharding = sharding.batch_sharding(self.mesh)

  def __call__(self, images: np.ndarray | NpzImages, desc: str = "features"):
    """Yields (pool3, spatial, logits) numpy batches for `images`: uint8 NHWC, or an
    NpzImages read a batch at a time."""
    from tqdm import tqdm  # noqa: PLC0415

    # A set smaller than one batch runs at its own size (rounded up to the devices): 8
    # samples should not cost eval.batch_size Inception passes.
    batch = min(self.batch, len(images) + (-len(images)) % self.dp)
    if isinstance(images, NpzImages):
      batches = images.batches(batch)
    else:
      batches = (images[i : i + batch] for i in range(0, len(images), batch))
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=jax.process_index() != 0)
    for chunk in batches:
      n = len(chunk)
      if n < batch:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
      out = self._fn(self.variables, jax.device_put(jnp.asarray(chunk), self._sharding))
      if jax.process_count() > 1:  # every host gets the whole batch's features
        out = multihost_utils.process_allgather(out, tiled=True)
      bar.update(n)
      yield tuple(np.asarray(o)[:n] for o in out)
    bar.close()


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


STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
# The pool3 covariance is 2048 x 2048: below that many images it is singular, and FID is
# far from what 50,000 samples against ADM's 10,000 references give.
MEANINGFUL_IMAGES = 2048


def warn_if_too_few(n: int, what: str) -> None:
  if n < MEANINGFUL_IMAGES:
    log.warning(
      "%d %s: FID and sFID from fewer than %d images are not comparable to published "
      "numbers (the covariance is singular; the paper uses 50,000 samples against 10,000 "
      "reference images)",
      n,
      what,
      MEANINGFUL_IMAGES,
    )


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
  digests.check(path, "reference batch")
  keys = npz_keys(path, "reference batch")
  has_stats = all(k in keys for k in STAT_KEYS)
  if "arr_0" not in keys and not has_stats:
    raise ValueError(
      f"reference batch {path} has keys {sorted(keys)}; it needs images `arr_0` "
      "or all of `mu`, `sigma`, `mu_s`, `sigma_s` (ADM's reference batches)."
    )
  ref = load_npz(path, "reference batch", STAT_KEYS)
  out: dict[str, np.ndarray] = {}
  if "arr_0" in keys:
    images = NpzImages(path, "reference batch")
    warn_if_too_few(len(images), "reference images")
    feats = batch_features(extract, images, "reference")
    out = {k: feats[k] for k in (*STAT_KEYS, "pool3")}
  if has_stats:
    for k, shape in STAT_SHAPES.items():
      if np.shape(ref[k]) != shape:
        raise ValueError(
          f"reference batch {path}: `{k}` is {np.shape(ref[k])}, the FID Inception's is {shape};"
          " use ADM's reference batch or statistics of the same Inception features."
        )
    out.update({k: np.asarray(ref[k], np.float64) for k in STAT_KEYS})
  storage.save_npz(cache, **out)
  return out


def adm_metrics(
  extract: FeatureExtractor, samples: np.ndarray, ref: dict, is_split_size: int
) -> dict[str, float]:
  """FID, sFID, Inception Score and (when the reference has images) precision/recall."""
  warn_if_too_few(len(samples), "samples")
  smp = batch_features(extract, samples, "samples")
  result = {
    "fid": stats.frechet_distance(smp["mu"], smp["sigma"], ref["mu"], ref["sigma"]),
    "sfid": stats.frechet_distance(smp["mu_s"], smp["sigma_s"], ref["mu_s"], ref["sigma_s"]),
    "inception_score": stats.inception_score(smp["logits"], is_split_size),
  }
  if "pool3" in ref:
    t0 = time.perf_counter()
    log.info("precision and recall: %d x %d pool3 features", len(ref["pool3"]), len(samples))
    result["precision"], result["recall"] = stats.precision_recall(ref["pool3"], smp["pool3"])
    log.info("precision and recall took %.1f s", time.perf_counter() - t0)
  return result

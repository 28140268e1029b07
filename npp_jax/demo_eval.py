"""A meaningful score for the embedded MNIST demo: a small digit classifier as the judge.

The classifier (an MLP on the grey-level images the tokenizer renders) is trained once on
4,500 of the real digits and cached in WORKDIR/classifier.npz; the other 500 measure its
own accuracy. Generated samples are scored by
- class accuracy: how often the classifier reads the class that was asked for;
- Fréchet distance in the classifier's 64-d feature space between generated and real
  digits (FID's formula with a domain-appropriate network), next to the same distance
  between the 500 held-out real digits and the training digits as the floor to compare to.
"""

import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from npp_jax import metrics_fid, train
from npp_jax.data import pipeline
from npp_jax.data.records import DatasetInfo
from npp_jax.evaluate import latest_samples, load_npz

log = logging.getLogger(__name__)


class DigitClassifier(nn.Module):
  """16x16 grey digit -> (64-d features, 10 logits)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
    h = nn.relu(nn.Dense(256)(h))
    h = nn.Dropout(0.2)(h, deterministic=not train)
    feats = nn.relu(nn.Dense(64)(h))
    return feats, nn.Dense(10)(feats)


def real_digits(c: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """All tokenized real digits rendered back to grey images (the samples' domain)."""
  from npp_jax.data.grey_tokenizer import GreyLevelTokenizer  # noqa: PLC0415

  path = train.dataset_dir(c, workdir)
  info = DatasetInfo.load(path)
  src = pipeline.TokenSource(path, info.vocab_size, info.num_classes, info.grid)
  recs = [src[i] for i in range(len(src))]
  tokens = np.stack([r["codes"][0] for r in recs])
  labels = np.array([int(r["label"]) for r in recs])
  return GreyLevelTokenizer(info.grid, c.tokenizer.levels).decode(tokens), labels


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 8):
  """Adam, batch 128; returns params. Deterministic for a seed."""
  model = DigitClassifier()
  params = model.init(jax.random.key(seed), images[:1])["params"]
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y, key):
    def loss(p):
      _, logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed + 1)
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    for i in range(0, len(order) - 127, 128):
      idx = order[i : i + 128]
      key = jax.random.fold_in(key, epoch * 10_000 + i)
      params, opt = step(params, opt, images[idx], labels[idx], key)
  return params


def _apply(params, images):
  feats, logits = jax.jit(DigitClassifier().apply)({"params": params}, jnp.asarray(images))
  return np.asarray(feats, np.float64), np.asarray(logits)


def classifier(c, workdir):
  """(params, real images, labels, held-out accuracy), trained once and cached."""
  images, labels = real_digits(c, workdir)
  hold = np.zeros(len(images), bool)
  hold[np.random.default_rng(0).permutation(len(images))[:500]] = True
  cache = os.path.join(workdir, "classifier.npz")
  if os.path.exists(cache):
    flat = load_npz(cache, "classifier cache")
    params = {
      k: {"kernel": flat[f"{k}/kernel"], "bias": flat[f"{k}/bias"]}
      for k in ("Dense_0", "Dense_1", "Dense_2")
    }
  else:
    params = train_classifier(images[~hold], labels[~hold], c.seed)
    np.savez(cache, **{f"{k}/{n}": np.asarray(v) for k, d in params.items() for n, v in d.items()})
    log.info("trained the digit classifier and cached it in %s", cache)
  _, logits = _apply(params, images[hold])
  return params, images, labels, hold, float((logits.argmax(1) == labels[hold]).mean())


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the newest samples_*.npz of the workdir; writes WORKDIR/eval.json."""
  params, images, labels, hold, acc_real = classifier(c, workdir)
  path = c.eval.samples or latest_samples(workdir)
  data = load_npz(path, "sample batch")
  if "arr_0" not in data or "labels" not in data:
    raise ValueError(f"{path} needs `arr_0` images and the requested `labels`.")
  grey = data["arr_0"][..., 0]
  if grey.shape[1:] != images.shape[1:]:
    raise ValueError(f"samples are {grey.shape[1:]} images, the digits {images.shape[1:]}.")
  feats, logits = _apply(params, grey)
  real_train, _ = _apply(params, images[~hold])
  real_hold, _ = _apply(params, images[hold])
  mu_r, s_r = metrics_fid.statistics(real_train)
  result = {
    "class_accuracy": float((logits.argmax(1) == data["labels"]).mean()),
    "frechet_distance": metrics_fid.frechet_distance(*metrics_fid.statistics(feats), mu_r, s_r),
    "real_holdout_frechet_distance": metrics_fid.frechet_distance(
      *metrics_fid.statistics(real_hold), mu_r, s_r
    ),
    "classifier_accuracy_on_real": acc_real,
    "num_samples": int(len(grey)),
    "samples": path,
  }
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  log.info(
    "demo scores: generated digits read as the requested class %.1f%% of the time "
    "(classifier accuracy on real digits %.1f%%); Frechet distance in classifier "
    "features %.2f (real held-out digits: %.2f)",
    100 * result["class_accuracy"],
    100 * acc_real,
    result["frechet_distance"],
    result["real_holdout_frechet_distance"],
  )
  print(json.dumps({k: v for k, v in result.items() if k != "samples"}), flush=True)
  return result

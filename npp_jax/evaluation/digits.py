"""A meaningful score for the embedded MNIST digits: a small digit classifier as the judge.

The classifier (an MLP on the grey-level images the tokenizer renders) is trained once on
the 4,500 training digits and cached; the 500 held-out digits (`data.mnist`, never trained
on by the GPT or the judge) measure its own accuracy. Generated samples are scored by
- class accuracy: how often the classifier reads the class that was asked for;
- Fréchet distance in the classifier's 64-d feature space between generated and real
  digits (FID's formula with a domain-appropriate network), next to the same distance
  between the 500 held-out real digits and the training digits as the floor to compare to.
"""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from npp_jax.data import pipeline
from npp_jax.data.grey_tokenizer import GreyLevelTokenizer
from npp_jax.data.records import DatasetInfo
from npp_jax.evaluation import stats
from npp_jax.evaluation.sample_batches import load_npz
from npp_jax.infra import storage

log = logging.getLogger(__name__)

_LAYERS = ("Dense_0", "Dense_1", "Dense_2")


class DigitClassifier(nn.Module):
  """16x16 grey digit -> (64-d features, 10 logits)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
    h = nn.relu(nn.Dense(256)(h))
    h = nn.Dropout(0.2)(h, deterministic=not train)
    feats = nn.relu(nn.Dense(64)(h))
    return feats, nn.Dense(10)(feats)


def real_digits(data_dir: str, levels: int) -> tuple[np.ndarray, np.ndarray]:
  """All tokenized real digits rendered back to grey images (the samples' domain)."""
  info = DatasetInfo.load(data_dir)
  src = pipeline.TokenSource(data_dir, info.vocab_size, info.num_classes, info.grid)
  recs = [src[i] for i in range(len(src))]
  tokens = np.stack([r["codes"][0] for r in recs])
  labels = np.array([int(r["label"]) for r in recs])
  return GreyLevelTokenizer(info.grid, levels).decode(tokens), labels


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


@dataclasses.dataclass
class DigitJudge:
  """A trained digit classifier and the real digits it compares samples with."""

  params: dict
  train_images: np.ndarray
  train_labels: np.ndarray
  held_images: np.ndarray
  held_labels: np.ndarray

  @classmethod
  def load_or_train(
    cls, train_dir: str, heldout_dir: str, levels: int, cache: str, seed: int = 0
  ) -> "DigitJudge":
    """The judge of the digits in `train_dir`, trained once and cached in the file `cache`;
    `heldout_dir` holds the real digits it never sees."""
    images, labels = real_digits(train_dir, levels)
    held, held_labels = real_digits(heldout_dir, levels)
    if storage.exists(cache):
      flat = load_npz(cache, "classifier cache")
      params = {k: {"kernel": flat[f"{k}/kernel"], "bias": flat[f"{k}/bias"]} for k in _LAYERS}
    else:
      params = train_classifier(images, labels, seed)
      flat = {f"{k}/{n}": np.asarray(v) for k, d in params.items() for n, v in d.items()}
      storage.save_npz(cache, **flat)
      log.info("trained the digit classifier and cached it in %s", cache)
    return cls(params, images, labels, held, held_labels)

  def accuracy_on_real(self) -> float:
    """Share of the held-out real digits read as their true class."""
    _, logits = _apply(self.params, self.held_images)
    return float((logits.argmax(1) == self.held_labels).mean())

  def score(self, grey: np.ndarray, requested: np.ndarray) -> dict:
    """Scores uint8 (N, grid, grid) samples generated for the classes `requested`."""
    grey = np.asarray(grey)
    if grey.dtype != np.uint8:
      raise ValueError(
        f"samples must be uint8 images (ADM format), got {grey.dtype}; convert with "
        "np.clip(x, 0, 255).astype(np.uint8)."
      )
    if grey.shape[1:] != self.train_images.shape[1:]:
      raise ValueError(
        f"samples are {grey.shape[1:]} images, the digits {self.train_images.shape[1:]}."
      )
    feats, logits = _apply(self.params, grey)
    real_train, _ = _apply(self.params, self.train_images)
    # The floor is measured on as many real held-out digits as there are samples (drawn
    # at random: the held-out digits are stored by class), since a Frechet distance
    # estimated from fewer images is larger.
    n = min(len(grey), len(self.held_images))
    pick = np.random.default_rng(0).permutation(len(self.held_images))[:n]
    real_hold, _ = _apply(self.params, self.held_images[pick])
    mu_r, s_r = stats.statistics(real_train)
    return {
      "class_accuracy": float((logits.argmax(1) == np.asarray(requested)).mean()),
      "frechet_distance": stats.frechet_distance(*stats.statistics(feats), mu_r, s_r),
      "real_holdout_frechet_distance": stats.frechet_distance(
        *stats.statistics(real_hold), mu_r, s_r
      ),
      "classifier_accuracy_on_real": self.accuracy_on_real(),
      "num_samples": int(len(grey)),
      "num_real_holdout": n,
    }

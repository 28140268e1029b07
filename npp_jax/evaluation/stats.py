"""Sample-quality metrics with the semantics of OpenAI's ADM evaluator (pure NumPy/JAX).

FID / sFID (Fréchet distance of Gaussian statistics), Inception Score (chunked, as ADM),
and the k-NN manifold precision/recall on squared distances. Statistics accumulate in
float64 over batches, so features never need to be held all at once for FID.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


class GaussianStats:
  """Running mean and covariance (float64, ddof 1) of feature batches."""

  def __init__(self, dim: int):
    self.n = 0
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def update(self, feats: np.ndarray) -> None:
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
      raise ValueError(f"features of shape {f.shape} do not match dimension {self.sum.shape[0]}.")
    self.n += len(f)
    self.sum += f.sum(axis=0)
    self.outer += f.T @ f

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}.")
    mu = self.sum / self.n
    sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, sigma


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance ddof 1) in float64: np.mean and np.cov(rowvar=False)."""
  f = np.asarray(feats, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) (pytorch-fid / ADM, float64).

  tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2, which are
  those of the symmetric S1^1/2 S2 S1^1/2 (both covariances are positive semi-definite):
  two symmetric eigendecompositions instead of ADM's `scipy.linalg.sqrtm` of the product
  (a Schur decomposition), 3.5x faster at 2048 dimensions (2 s against 7 s on one core).
  The ADM evaluator's golden FID is matched to 1e-14 relative, `sqrtm`'s at full rank to
  4e-13 (2048 dimensions). With fewer images than dimensions `sqrtm` is ill-conditioned
  and the two differ by about 1e-6 relative; the rounding's negative eigenvalues count as
  0 here.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(
      f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} "
      f"vs {s2.shape} (features of different sizes?)."
    )
  diff = mu1 - mu2
  w, v = linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2
  inner = root @ s2 @ root
  eigenvalues = linalg.eigvalsh((inner + inner.T) / 2, overwrite_a=True)
  tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
  """ADM's IS: softmax, then per chunk of `split_size` exp(mean KL(p || mean p)), averaged."""
  x = np.asarray(logits, np.float64)
  if x.ndim != 2:
    raise ValueError(f"logits must be (N, classes), got shape {x.shape}.")
  x = x - x.max(axis=1, keepdims=True)
  p = np.exp(x)
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for i in range(0, len(p), split_size):
    part = p[i : i + split_size]
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    kl = np.where(part > 0, kl, 0.0)  # p log p -> 0 as p -> 0 (ADM would give NaN)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores))


@jax.jit
def _sq_dist(a, b):
  a2 = jnp.sum(a * a, axis=1)[:, None]
  b2 = jnp.sum(b * b, axis=1)[None, :]
  d = a2 - 2 * jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST) + b2
  return jnp.maximum(d, 0.0)


def _blocks(n: int, size: int):
  return [(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(feats: np.ndarray, k: int = 3, block: int = 10000) -> np.ndarray:
  """Squared distance of every point to its k-th nearest neighbour in its own set."""
  f = jnp.asarray(feats, jnp.float32)
  if len(f) <= k:
    raise ValueError(f"need more than k={k} points for manifold radii, got {len(f)}.")
  out = []
  for a, b in _blocks(len(f), block):
    d = np.concatenate(
      [np.asarray(_sq_dist(f[a:b], f[c:e])) for c, e in _blocks(len(f), block)], axis=1
    )
    out.append(np.partition(d, k, axis=1)[:, k])
  return np.concatenate(out)


def _inside(points, centres, radii, block):
  status = np.zeros(len(points), bool)
  for a, b in _blocks(len(points), block):
    for c, e in _blocks(len(centres), block):
      d = np.asarray(_sq_dist(points[a:b], centres[c:e]))
      status[a:b] |= np.any(d <= radii[None, c:e], axis=1)
  return status


def precision_recall(
  ref_feats: np.ndarray, sample_feats: np.ndarray, k: int = 3, block: int = 10000
) -> tuple[float, float]:
  """ADM's improved precision and recall: (share of samples inside the reference manifold,
  share of references inside the sample manifold); balls of k-NN squared radii."""
  ref = jnp.asarray(ref_feats, jnp.float32)
  smp = jnp.asarray(sample_feats, jnp.float32)
  if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
    raise ValueError(
      f"feature sets must be (N, D) with the same D: got {ref.shape} and {smp.shape}."
    )
  r_ref, r_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
  precision = _inside(smp, ref, r_ref, block).mean()
  recall = _inside(ref, smp, r_smp, block).mean()
  return float(precision), float(recall)

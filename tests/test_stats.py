"""FID, IS, precision/recall against the ADM evaluator's own outputs, and metric properties."""

import numpy as np
import pytest

from npp_jax.evaluation import stats as M


@pytest.fixture(scope="module")
def io(golden_dir):
  with np.load(golden_dir / "metrics_random_io.npz") as z:
    return {k: z[k] for k in z.files}


def test_fid_matches_evaluator(io):
  mu_a, s_a = M.statistics(io["feats_A"])
  mu_b, s_b = M.statistics(io["feats_B"])
  np.testing.assert_allclose(mu_a, io["mu_A"], rtol=1e-12)
  np.testing.assert_allclose(s_b, io["sigma_B"], rtol=1e-10, atol=1e-12)
  fid = M.frechet_distance(mu_b, s_b, mu_a, s_a)
  np.testing.assert_allclose(fid, io["fid_evaluator"], rtol=1e-12)  # 0 measured
  np.testing.assert_allclose(
    M.frechet_distance(mu_a, s_a, mu_b, s_b), io["fid_evaluator_swapped"], rtol=1e-12
  )  # 1e-14 measured


@pytest.mark.parametrize("n", [20, 500])
def test_fid_equals_the_sqrtm_formula(n):
  """The eigenvalue form against ADM's `sqrtm` of S1 S2 on 64-dimensional features, with
  full-rank covariances and with fewer samples than dimensions (rank 19)."""
  from scipy import linalg  # noqa: PLC0415

  rng = np.random.default_rng(n)
  mix = rng.normal(size=(64, 64)) / 8
  f1, f2 = rng.normal(size=(n, 64)) @ mix, rng.normal(size=(n, 64)) @ mix + 0.1
  (mu1, s1), (mu2, s2) = M.statistics(f1), M.statistics(f2)
  want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
  got = M.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, want, rtol=1e-9 if n > 64 else 5e-8)  # 1.6e-10, 8.5e-9 seen


def test_running_statistics_equal_batch_statistics(io):
  stats = M.GaussianStats(32)
  for chunk in np.array_split(io["feats_A"], 7):
    stats.update(chunk)
  mu, sigma = stats.mean_cov()
  np.testing.assert_allclose(mu, io["mu_A"], rtol=1e-12)
  np.testing.assert_allclose(sigma, io["sigma_A"], rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match="do not match dimension 32"):
    stats.update(np.zeros((3, 16)))


@pytest.mark.parametrize("split", [100, 128, 5000])
def test_inception_score_matches_evaluator(io, split):
  logits = io["logits"].astype(np.float32)
  got = M.inception_score(logits, split)
  np.testing.assert_allclose(got, io[f"is_split{split}_float64"], rtol=1e-9)
  np.testing.assert_allclose(got, io[f"is_split{split}"], rtol=1e-6)


def test_precision_recall_matches_evaluator(io):
  p, r = M.precision_recall(io["feats_A"], io["feats_B"])
  assert p == io["precision"] and r == io["recall"]
  radii = M.manifold_radii(io["feats_A"])
  np.testing.assert_allclose(radii, io["radii_A_float64"], rtol=6e-6)  # measured 2.8e-7
  # Small blocks give the same decisions as one block.
  assert M.precision_recall(io["feats_A"], io["feats_B"], block=64) == (p, r)


def test_metric_properties(io):
  mu, s = M.statistics(io["feats_A"])
  assert abs(M.frechet_distance(mu, s, mu, s)) < 1e-8
  assert M.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0)
  one_hot = np.full((10, 10), -1e4)
  np.fill_diagonal(one_hot, 0)
  assert M.inception_score(one_hot) == pytest.approx(10.0, rel=1e-6)
  p, r = M.precision_recall(io["feats_A"], io["feats_A"])
  assert p == 1.0 and r == 1.0


def test_malformed_inputs(io):
  mu, s = M.statistics(io["feats_A"])
  with pytest.raises(ValueError, match="statistics do not match"):
    M.frechet_distance(mu, s, mu[:16], s[:16, :16])
  with pytest.raises(ValueError, match="logits must be"):
    M.inception_score(np.zeros(10))
  with pytest.raises(ValueError, match="same D"):
    M.precision_recall(io["feats_A"], io["feats_B"][:, :16])
  with pytest.raises(ValueError, match="need more than k=3 points"):
    M.manifold_radii(io["feats_A"][:3])

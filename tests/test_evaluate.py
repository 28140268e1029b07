"""`mode=eval`: ADM metrics end to end with the golden Inception weights; input checks; demo."""

import json
import os

import numpy as np
import pytest

from npp_jax import config_lib
from npp_jax.evaluation import inception_fid
from npp_jax.jobs import evaluate

from .helpers import load_config_file
from .manifest_weights import generate


@pytest.fixture(scope="module")
def inception_npz(golden_dir, tmp_path_factory):
  path = tmp_path_factory.mktemp("inc") / "pt_inception.npz"
  np.savez(path, **generate(golden_dir / "inception_fid_random_manifest.json"))
  return str(path)


def _images(n, seed, size=32):
  rng = np.random.default_rng(seed)
  base = rng.random((n, 1, 1, 3)) * 200
  noise = rng.random((n, size, size, 3)) * 55
  return (base + noise).astype(np.uint8)


def _config(inception_npz, samples, reference, **eval_overrides):
  c = config_lib.get_config("tiny")
  c.eval.update(
    samples=str(samples),
    reference=str(reference),
    inception_checkpoint=inception_npz,
    batch_size=4,
    **eval_overrides,
  )
  c.mesh.update(data=-1)
  return c


@pytest.mark.slow
def test_eval_end_to_end(tmp_path, inception_npz):
  np.savez(tmp_path / "samples.npz", arr_0=_images(8, 0), labels=np.arange(8))
  np.savez(tmp_path / "ref.npz", arr_0=_images(8, 1))
  c = _config(inception_npz, tmp_path / "samples.npz", tmp_path / "ref.npz")
  result = evaluate.run(c, str(tmp_path))
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert np.isfinite(result[key]), key
  assert result["fid"] > 0 and result["inception_score"] >= 1.0
  with open(tmp_path / "eval.json") as f:
    assert json.load(f)["fid"] == result["fid"]
  assert os.listdir(tmp_path / "eval_cache"), "reference statistics are cached"
  # The same set against itself: FID 0 (up to rounding), precision = recall = 1.
  c.eval.samples = str(tmp_path / "ref.npz")
  same = evaluate.run(c, str(tmp_path))
  assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
  # ADM-style reference statistics without images: FID and sFID but no precision/recall.
  stats = inception_fid.reference_statistics(
    str(tmp_path / "ref.npz"), None, str(tmp_path / "eval_cache"), "adm"
  )
  np.savez(tmp_path / "ref_stats.npz", **{k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
  c.eval.update(samples=str(tmp_path / "samples.npz"), reference=str(tmp_path / "ref_stats.npz"))
  only = evaluate.run(c, str(tmp_path))
  assert only["fid"] == pytest.approx(result["fid"], rel=1e-6) and "precision" not in only


def test_malformed_inputs(tmp_path, inception_npz):
  np.savez(tmp_path / "ref.npz", arr_0=_images(6, 1))
  cases = [
    (dict(arr_0=_images(6, 0).astype(np.float32)), "images must be uint8"),
    (dict(arr_0=_images(6, 0)[..., :1]), r"must be \(N, H, W, 3\)"),
    (dict(images=_images(6, 0)), "no `arr_0` images"),
  ]
  for i, (content, message) in enumerate(cases):
    np.savez(tmp_path / f"bad{i}.npz", **content)
    with pytest.raises(ValueError, match=message):
      evaluate.run(
        _config(inception_npz, tmp_path / f"bad{i}.npz", tmp_path / "ref.npz"), str(tmp_path)
      )
  np.savez(tmp_path / "good.npz", arr_0=_images(6, 0))
  small = dict(mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  np.savez(tmp_path / "ref_small.npz", **small)
  with pytest.raises(ValueError, match=r"`mu` is \(64,\), the FID Inception's is \(2048,\)"):
    evaluate.run(
      _config(inception_npz, tmp_path / "good.npz", tmp_path / "ref_small.npz"),
      str(tmp_path / "small"),
    )
  np.savez(tmp_path / "ref_bad.npz", mu=np.zeros(2048))
  with pytest.raises(ValueError, match="needs images `arr_0` or all of `mu`, `sigma`"):
    evaluate.run(
      _config(inception_npz, tmp_path / "good.npz", tmp_path / "ref_bad.npz"), str(tmp_path / "x")
    )
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate.run(
      _config(inception_npz, tmp_path / "missing.npz", tmp_path / "ref.npz"), str(tmp_path)
    )
  with pytest.raises(ValueError, match="eval.inception_checkpoint is empty"):
    evaluate.run(_config("", tmp_path / "good.npz", tmp_path / "ref.npz"), str(tmp_path))
  zero = _config(inception_npz, tmp_path / "good.npz", tmp_path / "ref.npz")
  zero.eval.batch_size = 0
  with pytest.raises(ValueError, match=r"eval.batch_size=0 must be >= 1 \(images per"):
    evaluate.run(zero, str(tmp_path))
  with pytest.raises(ValueError, match="eval.preprocess='tf2'"):
    evaluate.run(
      _config(inception_npz, tmp_path / "good.npz", tmp_path / "ref.npz", preprocess="tf2"),
      str(tmp_path),
    )


def test_demo_classifier_scores(tmp_path):
  from npp_jax.data import datasets
  from npp_jax.data.grey_tokenizer import GreyLevelTokenizer
  from npp_jax.evaluation import digits

  c = load_config_file("mnist")
  c.data.cache_dir = str(tmp_path / "data")
  train_dir = datasets.dataset_dir("mnist", "", c.data.cache_dir)
  heldout = datasets.heldout_dir("mnist", "", c.data.cache_dir)
  judge = digits.DigitJudge.load_or_train(train_dir, heldout, 16, str(tmp_path / "classifier.npz"))
  assert len(judge.train_images) == 4500 and len(judge.held_images) == 500
  acc = judge.accuracy_on_real()
  assert acc > 0.85, "the judge must read real digits"
  assert os.path.exists(tmp_path / "classifier.npz")
  held, held_labels = judge.held_images, judge.held_labels
  # Real held-out digits as "samples": high accuracy, small distance.
  real = np.repeat(held[..., None], 3, axis=-1)
  os.makedirs(tmp_path / "samples" / "real")
  np.savez(tmp_path / "samples" / "real" / "samples_500.npz", arr_0=real, labels=held_labels)
  good = evaluate.run(c, str(tmp_path))
  assert good["class_accuracy"] == pytest.approx(acc)
  assert good["frechet_distance"] == pytest.approx(good["real_holdout_frechet_distance"])
  assert good["num_real_holdout"] == 500
  # Fewer samples: the floor is measured on as many held-out digits, so that the two
  # distances carry the same small-sample bias (a mixed-class subset of 200 sits near the
  # full floor; the first 200 stored digits, sorted by class, would not).
  np.savez(
    tmp_path / "samples" / "real" / "samples_500.npz", arr_0=real[:200], labels=held_labels[:200]
  )
  few = evaluate.run(c, str(tmp_path))
  assert few["num_real_holdout"] == 200
  assert few["real_holdout_frechet_distance"] > good["real_holdout_frechet_distance"]
  assert few["real_holdout_frechet_distance"] < 4 * good["real_holdout_frechet_distance"]
  # Noise images score badly.
  tok = GreyLevelTokenizer()
  noise = tok.decode(np.random.default_rng(0).integers(0, 16, (500, 256)))
  np.savez(
    tmp_path / "samples" / "real" / "samples_500.npz",
    arr_0=np.repeat(noise[..., None], 3, axis=-1),
    labels=held_labels,
  )
  bad = evaluate.run(c, str(tmp_path))
  assert bad["frechet_distance"] > 10 * good["frechet_distance"]
  assert bad["class_accuracy"] < 0.5
  # Float images are refused, not scored.
  with pytest.raises(ValueError, match="samples must be uint8"):
    judge.score(held.astype(np.float32), held_labels)
  # The job checks a sample batch for the judge as for FID: labels within the classes,
  # one per image, images (N, H, W, 3) and at least two.
  npz = tmp_path / "samples" / "real" / "samples_500.npz"
  bad_batches = [
    (dict(arr_0=real, labels=held_labels + 10), r"labels must be classes 0\.\.9, got \[10"),
    (dict(arr_0=real, labels=held_labels[:5]), "`labels` must be 500 integers"),
    (dict(arr_0=real[:0], labels=held_labels[:0]), "need at least 2 images, got 0"),
    (dict(arr_0=real[..., 0], labels=held_labels), r"must be \(N, H, W, 3\)"),
  ]
  for content, message in bad_batches:
    np.savez(npz, **content)
    with pytest.raises(ValueError, match=message):
      evaluate.run(c, str(tmp_path))


@pytest.mark.slow
def test_images_are_read_a_batch_at_a_time_with_the_same_features(tmp_path, inception_npz, caplog):
  """Sample and reference images are read from the .npz a batch at a time (memory does not
  grow with the number of images) and give the features of the whole array; scoring fewer
  images than the covariance has dimensions says that the FID is not comparable."""
  import logging

  from npp_jax.evaluation import sample_batches
  from npp_jax.infra import torch_io
  from npp_jax.models import inception_torch

  images = _images(10, 3)
  np.savez_compressed(tmp_path / "samples.npz", arr_0=images, labels=np.arange(10))
  lazy = sample_batches.NpzImages(str(tmp_path / "samples.npz"), "sample batch")
  assert len(lazy) == 10 and [len(b) for b in lazy.batches(4)] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(list(lazy.batches(4))), images)
  variables = inception_torch.variables_from_torch(torch_io.load_torch_checkpoint(inception_npz))
  extract = inception_fid.FeatureExtractor(variables, "adm", 4)
  for a, b in zip(extract(images), extract(lazy), strict=True):
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y)
  np.savez(tmp_path / "ref.npz", arr_0=_images(8, 1))
  c = _config(inception_npz, tmp_path / "samples.npz", tmp_path / "ref.npz")
  with caplog.at_level(logging.WARNING):
    result = evaluate.run(c, str(tmp_path))
  assert result["num_samples"] == 10
  assert "10 samples: FID and sFID from fewer than 2048 images" in caplog.text
  assert "8 reference images: FID and sFID from fewer than 2048" in caplog.text
  (tmp_path / "cut.npz").write_bytes((tmp_path / "samples.npz").read_bytes()[:-3000])
  with pytest.raises(ValueError, match="cut.npz"):
    evaluate.run(_config(inception_npz, tmp_path / "cut.npz", tmp_path / "ref.npz"), str(tmp_path))

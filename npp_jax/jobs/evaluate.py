"""`--config.mode=eval`: score a sample batch; writes WORKDIR/eval.json.

`eval.kind="inception"`: FID, sFID, Inception Score, precision and recall against an ADM
reference batch (`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`, `mu_s`, `sigma_s` and
images `arr_0`, or images only), with the FID InceptionV3 (pytorch-fid weights, given by
path) sharded over the devices. Reference features are cached in WORKDIR/eval_cache.
`eval.kind="mnist_classifier"`: the embedded demo's digit judge.
"""

import json
import logging
import time

import jax
import ml_collections

from npp_jax import config_lib, sharding
from npp_jax.data import datasets
from npp_jax.evaluation import digits, inception_fid, sample_batches
from npp_jax.infra import storage, torch_io
from npp_jax.models import inception_torch

log = logging.getLogger(__name__)


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores `eval.samples` (default: the newest WORKDIR/samples/samples_*.npz)."""
  storage.set_deadline(c.storage_deadline_s)
  config_lib.check_eval(c)
  result = _digits(c, workdir) if c.eval.kind == "mnist_classifier" else _inception(c, workdir)
  if jax.process_index() == 0:
    storage.write_text(
      storage.join(storage.absolute(workdir), "eval.json"), json.dumps(result, indent=1)
    )
  return result


def _inception(c: ml_collections.ConfigDict, workdir: str) -> dict:
  e = c.eval
  samples_path = e.samples or sample_batches.latest_samples(workdir)
  samples = sample_batches.NpzImages(samples_path, "sample batch")  # read a batch at a time
  variables = inception_torch.variables_from_torch(
    torch_io.load_torch_checkpoint(e.inception_checkpoint, trust=c.trust_checkpoint)
  )
  extract = inception_fid.FeatureExtractor(
    variables, e.preprocess, e.batch_size, sharding.make_mesh(c.mesh.to_dict())
  )
  t0 = time.perf_counter()
  ref = inception_fid.reference_statistics(
    e.reference, extract, storage.join(storage.absolute(workdir), "eval_cache"), e.preprocess
  )
  t1 = time.perf_counter()
  log.info("reference statistics took %.1f s", t1 - t0)
  result = inception_fid.adm_metrics(extract, samples, ref, e.is_split_size)
  log.info("sample metrics took %.1f s", time.perf_counter() - t1)
  log.info(
    "FID %.3f | sFID %.3f | IS %.2f | precision %s | recall %s",
    result["fid"],
    result["sfid"],
    result["inception_score"],
    result.get("precision"),
    result.get("recall"),
  )
  return {
    **result,
    "num_samples": len(samples),
    "samples": samples_path,
    "reference": e.reference,
    "preprocess": e.preprocess,
  }


def _digits(c: ml_collections.ConfigDict, workdir: str) -> dict:
  (train_dir, *_), heldout = datasets.locate(c, workdir)
  if heldout is None:
    raise ValueError(
      "the digit judge needs held-out digits: use the embedded digits (data.name=mnist) or "
      "set config.data.eval_path."
    )
  # The judge is an instrument: the same seed for every run, whatever config.seed is.
  judge = digits.DigitJudge.load_or_train(
    train_dir,
    heldout,
    c.tokenizer.levels,
    c.eval.judge_cache or storage.join(storage.absolute(workdir), "classifier.npz"),
    seed=0,
  )
  path = c.eval.samples or sample_batches.latest_samples(workdir)
  data = sample_batches.load_npz(path, "sample batch")
  if "arr_0" not in data or "labels" not in data:
    raise ValueError(f"{path} needs `arr_0` images and the requested `labels`.")
  images = sample_batches.check_images(data["arr_0"], f"sample batch {path}")
  labels = sample_batches.check_labels(data["labels"], len(images), 10, f"sample batch {path}")
  result = {**judge.score(images[..., 0], labels), "samples": path}
  log.info(
    "demo scores: generated digits read as the requested class %.1f%% of the time "
    "(classifier accuracy on real digits %.1f%%); Frechet distance in classifier "
    "features %.2f (%d real held-out digits: %.2f)",
    100 * result["class_accuracy"],
    100 * result["classifier_accuracy_on_real"],
    result["frechet_distance"],
    result["num_real_holdout"],
    result["real_holdout_frechet_distance"],
  )
  print(json.dumps({k: v for k, v in result.items() if k != "samples"}), flush=True)
  return result

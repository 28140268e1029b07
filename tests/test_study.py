"""`python -m npp_jax.study` end to end on a tiny setting: two schedules, one seed, a few steps."""

import json
import os

from npp_jax import config_lib, study

from .helpers import load_config_file


def _tiny_study(tmp_path):
  c = load_config_file("study_mnist")
  c.model.update(dim=32, n_layer=1, n_head=2, multiple_of=32)
  c.data.cache_dir = str(tmp_path / "data")
  c.train.update(epochs=2, max_steps=4, log_every_steps=2, eval_every_steps=2, eval_batches=1)
  c.sample.update(batch_size=16, png_per_class=1)
  c.study.update(patch_levels=(1, 2), seeds=(0,), num_images=16)
  config_lib.check_study(c)
  return c


def test_study_end_to_end_and_resumable(tmp_path):
  c = _tiny_study(tmp_path)
  root = tmp_path / "study"
  os.makedirs(root)
  result = study.run_study(c, str(root))
  saved = json.loads((root / "study.json").read_text())
  assert [r["name"] for r in saved["runs"]] == ["NTP-seed0", "NPP-2-seed0"]
  ntp, npp2 = saved["summary"]
  assert ntp["schedule"] == "NTP" and npp2["schedule"] == "NPP-2"
  # 4 steps at patch side 2 cost a fraction of 4 steps of tokens.
  assert npp2["flops_vs_ntp"] < 0.5 and ntp["flops_vs_ntp"] == 1.0
  for run in result["runs"]:
    assert [step for step, _, _ in run["curve"]] == [2, 4]
    assert 0.0 <= run["class_accuracy"] <= 1.0 and run["frechet_distance"] > 0
  table = (root / "study.md").read_text()
  assert table.startswith("| schedule |") and "| NPP-2 | 1 |" in table
  assert (root / "study.png").stat().st_size > 1000
  assert (root / "classifier.npz").exists(), "one judge for every run"
  # A rerun redoes nothing: the same runs, the same samples.
  npz = {r["name"]: _sample_file(root, r["name"]) for r in result["runs"]}
  stamps = {name: os.path.getmtime(path) for name, path in npz.items()}
  again = study.run_study(c, str(root))
  assert [r["steps"] for r in again["runs"]] == [4, 4]
  assert {name: os.path.getmtime(path) for name, path in npz.items()} == stamps


def _sample_file(root, name):
  samples = root / "runs" / name / "samples"
  (folder,) = os.listdir(samples)
  return samples / folder / "samples_16.npz"

"""`python -m npp_jax.study` end to end on a tiny setting, and the published study's plan."""

import json
import os
import shutil

import pytest

from npp_jax import config_lib, programs, study

from .helpers import load_config_file


def _tiny_study(tmp_path):
  c = load_config_file("study_mnist")
  # Digits as 8x8 tokens, not the demo's 16x16: a quarter of the work in every step.
  c.model.update(dim=32, n_layer=1, n_head=2, multiple_of=32, grid=8)
  c.data.cache_dir = str(tmp_path / "data")
  # 10 steps of 448 digits an epoch; NPP-2's stages end at epochs 1 and 2.
  c.train.update(epochs=2, global_batch_size=448, log_every_steps=5, eval_every_steps=5)
  c.train.update(eval_batches=1, ckpt_every_steps=100)
  c.sample.update(batch_size=16, png_per_class=1)
  c.study.update(patch_levels=(1, 2), seeds=(0,), num_images=16, quality_points=2)
  c.study.flops_matched_level = 2
  config_lib.check_study(c)
  return c


def test_study_plan_of_the_published_config():
  """34 epochs; NPP-3's stage ends among at least 6 quality points; NTP matched to NPP-3's
  FLOPs trains 19 epochs, within half an epoch's FLOPs of NPP-3's."""
  c = load_config_file("study_mnist")
  config_lib.check_study(c)
  runs = study.plan_runs(c)
  assert [r.name for r in runs[:4]] == ["NTP-seed0", "NPP-2-seed0", "NPP-3-seed0", runs[3].name]
  assert runs[3].name == "NTP-at-NPP-3-FLOPs-seed0" and len(runs) == 8
  assert {r.epochs for r in runs[:3]} == {34} and runs[3].epochs == 19
  npp3 = programs.plan_run(study.run_config(c, runs[2]), 1, None)
  assert npp3.stage_end_epochs == (8, 17, 34)
  points = study.quality_epochs(runs[2], c.study.quality_points, npp3.stage_end_epochs)
  assert {8, 17, 34} <= set(points) and len(points) >= 6
  ntp = programs.plan_run(study.run_config(c, runs[3]), 1, None)
  gap = abs(ntp.flops_until(ntp.total_steps) - npp3.flops_until(npp3.total_steps))
  assert gap <= ntp.stage_step_flops[0] / 2


@pytest.mark.slow
def test_study_end_to_end_resumable_and_rebuilt_from_records(tmp_path):
  c = _tiny_study(tmp_path)
  root = tmp_path / "study"
  os.makedirs(root)
  result = study.run_study(c, str(root))
  saved = json.loads((root / "study.json").read_text())
  names = ["NTP-seed0", "NPP-2-seed0", "NTP-at-NPP-2-FLOPs-seed0"]
  assert [r["name"] for r in saved["runs"]] == names
  ntp, npp2, matched = saved["runs"]
  assert [p["epoch"] for p in ntp["points"]] == [1, 2] == [p["epoch"] for p in npp2["points"]]
  assert [p["epoch"] for p in matched["points"]] == [1] and matched["epochs"] == 1
  for run in saved["runs"]:
    assert [p["step"] for p in run["points"]] == [10 * p["epoch"] for p in run["points"]]
    for p in run["points"]:
      assert 0.0 <= p["class_accuracy"] <= 1.0 and p["frechet_distance"] > 0
      assert 0.0 < p["heldout_ntp_loss"] < 10.0 and p["train_seconds"] > 0
    assert [s for s, _, _ in run["heldout_curve"]] == [5, 10, 15, 20][: 2 * run["epochs"]]
  # NTP for the FLOPs of NPP-2 (one epoch at 2x2, one of tokens) is one epoch of NTP.
  assert matched["points"][0]["train_flops"] == ntp["points"][0]["train_flops"]
  assert npp2["points"][-1]["train_flops"] < ntp["points"][-1]["train_flops"]
  table = {r["schedule"]: r for r in saved["summary"]}
  assert table["NTP"]["flops_vs_ntp"] == 1.0 and table["NPP-2"]["flops_vs_ntp"] < 0.7
  assert [(r["schedule"], r["epoch"]) for r in saved["over_training"]] == [
    ("NTP", 1),
    ("NTP", 2),
    ("NPP-2", 1),
    ("NPP-2", 2),
    ("NTP at NPP-2 FLOPs", 1),
  ]
  md = (root / "study.md").read_text()
  assert md.startswith("| schedule |") and "| NPP-2 | 1 | 2 |" in md and "| NPP-2 | 2 |" in md
  assert (root / "study.png").stat().st_size > 1000
  assert (root / "classifier.npz").exists(), "one judge for every run"
  assert result["runs"] == saved["runs"]

  # A rerun reads every record and redoes nothing: the same samples, untouched.
  stamps = _sample_stamps(root)
  assert len(stamps) == 5  # one .npz per quality point
  assert study.run_study(c, str(root)) == result
  # A run whose record was lost is rebuilt from its quality points, without sampling again.
  os.remove(root / "records" / "NPP-2-seed0.json")
  assert study.run_study(c, str(root)) == result
  assert _sample_stamps(root) == stamps

  # The records alone (kept elsewhere, e.g. in the repository) rebuild the summary exactly.
  kept = tmp_path / "kept"
  shutil.copytree(root / "records", kept)
  c.study.records = str(kept)
  again = tmp_path / "again"
  os.makedirs(again)
  study.run_study(c, str(again))
  for name in ("study.json", "study.md"):
    assert (again / name).read_text() == (root / name).read_text()
  assert not (again / "runs").exists(), "nothing trained"
  # The study section says which runs there are, not what a run is: one seed of the same
  # study reads the same record.
  c.study.seeds = (0, 1)
  c.study.patch_levels = (1,)
  c.study.flops_matched_level = 0
  assert study.run_record(c, study.plan_runs(c)[0], str(again), str(kept)) == ntp
  c.study.update(seeds=(0,), patch_levels=(1, 2), flops_matched_level=2)

  # Without training, the runs that have records are summarized and the others left out.
  os.remove(kept / "NPP-2-seed0.json")
  c.study.train = False
  partial = study.run_study(c, str(again))
  assert [r["name"] for r in partial["runs"]] == ["NTP-seed0", "NTP-at-NPP-2-FLOPs-seed0"]
  assert not (again / "runs").exists(), "nothing trained"
  # A record of other settings is refused, not retrained over.
  c.optim.lr = 2e-3
  with pytest.raises(ValueError, match=r"NTP-seed0.json was made with other settings .*optim.lr"):
    study.run_study(c, str(again))
  assert json.loads((kept / "NTP-seed0.json").read_text()) == ntp


def test_study_stops_when_a_run_is_stopped(tmp_path, monkeypatch):
  """A run stopped by SIGTERM (checkpoint saved) stops the study: nothing is sampled from
  the weights it stopped at, and no record is written."""
  c = _tiny_study(tmp_path)
  monkeypatch.setattr(study.train, "run", lambda r, workdir: {"stopped_by": "SIGTERM"})
  with pytest.raises(study.StoppedError, match="NTP-seed0 stopped by SIGTERM before step 10"):
    study.run_study(c, str(tmp_path / "study"))
  assert not list(tmp_path.glob("study/runs/*/samples")) and not list(
    tmp_path.glob("study/records/*")
  )


def _sample_stamps(root):
  found = sorted(root.glob("runs/*/samples/*/samples_16.npz"))
  return {str(p): os.path.getmtime(p) for p in found}

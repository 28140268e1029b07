"""`python -m npp_jax.study --config=configs/study_mnist.py --workdir=DIR`: NPP against NTP.

Trains the config once per schedule (`study.patch_levels`: 1 is plain next-token
prediction, 2 and 3 are NPP at `study.epoch_rate`) and seed (`study.seeds`) on the same
data and epochs, then samples and scores every final model with the config's judge. Each
run lives in DIR/runs/<schedule>-seed<k> and is resumed or skipped when done, so a rerun
only does what is missing. Writes DIR/study.json, DIR/study.md (mean and spread over seeds)
and DIR/study.png (the `plot` extra: held-out next-token loss against training FLOPs).
"""

import copy
import io
import json
import logging

import numpy as np
from absl import flags

from npp_jax import cli, config_lib, storage
from npp_jax.jobs import evaluate, sample, train

log = logging.getLogger("npp_jax.study")

SCHEDULE_NAMES = {1: "NTP", 2: "NPP-2", 3: "NPP-3", 4: "NPP-4"}


def run_config(c, patch_level: int, seed: int):
  """The config of one run: the study's config with this schedule and seed."""
  r = copy.deepcopy(c)
  r.train.patch_level = patch_level
  r.train.epoch_rate = c.study.epoch_rate
  r.seed = seed
  r.sample.seed = seed
  r.sample.num_images = c.study.num_images
  r.sample.batch_size = min(c.sample.batch_size, c.study.num_images)
  return r


def _curve(workdir: str) -> list[tuple[int, float, float]]:
  """(step, train_flops, held-out loss) of every evaluation of a run."""
  rows = _rows(workdir)
  return [(r["step"], r["train_flops"], r["eval/ntp_loss"]) for r in rows if "eval/ntp_loss" in r]


def _rows(workdir: str) -> list[dict]:
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_one(c, patch_level: int, seed: int, root: str) -> dict:
  """Trains, samples and judges one schedule and seed (each step skipped when done)."""
  name = f"{SCHEDULE_NAMES[patch_level]}-seed{seed}"
  workdir = storage.join(root, "runs", name)
  storage.makedirs(workdir)
  r = run_config(c, patch_level, seed)
  summary = train.run(r, workdir)
  out = sample.run(r, workdir)
  r.eval.samples = out["npz"]
  r.eval.judge_cache = storage.join(root, "classifier.npz")  # one judge for every run
  scores = evaluate.run(r, workdir)
  curve = _curve(workdir)
  last = _rows(workdir)[-1]
  return {
    "name": name,
    "schedule": SCHEDULE_NAMES[patch_level],
    "patch_level": patch_level,
    "seed": seed,
    "steps": summary["step"],
    "train_flops": last["train_flops"],
    "train_seconds": last["train_seconds"],
    "heldout_ntp_loss": curve[-1][2] if curve else None,
    "class_accuracy": scores.get("class_accuracy"),
    "frechet_distance": scores.get("frechet_distance"),
    "curve": curve,
  }


def summarize(runs: list[dict]) -> list[dict]:
  """Mean and standard deviation over seeds of every schedule's numbers."""
  out = []
  for schedule in dict.fromkeys(r["schedule"] for r in runs):
    mine = [r for r in runs if r["schedule"] == schedule]
    row = {"schedule": schedule, "seeds": len(mine)}
    for key in (
      "train_flops",
      "train_seconds",
      "heldout_ntp_loss",
      "class_accuracy",
      "frechet_distance",
    ):
      values = np.asarray([r[key] for r in mine if r[key] is not None], np.float64)
      row[key] = float(values.mean()) if len(values) else None
      row[f"{key}_std"] = float(values.std()) if len(values) else None
    out.append(row)
  ntp = next((r for r in out if r["schedule"] == "NTP"), None)
  for row in out:
    row["flops_vs_ntp"] = row["train_flops"] / ntp["train_flops"] if ntp else None
  return out


def markdown(table: list[dict]) -> str:
  """The summary as a markdown table (mean ± standard deviation over seeds)."""

  def pm(row, key, fmt):
    if row[key] is None:
      return "n/a"
    return f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}"

  lines = [
    "| schedule | seeds | training TFLOPs (x NTP) | wall clock (s) | held-out NTP loss | "
    "class accuracy | Fréchet distance |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in table:
    ratio = f" ({r['flops_vs_ntp']:.2f})" if r["flops_vs_ntp"] is not None else ""
    lines.append(
      f"| {r['schedule']} | {r['seeds']} | {r['train_flops'] / 1e12:.2f}{ratio} | "
      f"{pm(r, 'train_seconds', '.0f')} | {pm(r, 'heldout_ntp_loss', '.4f')} | "
      f"{pm(r, 'class_accuracy', '.3f')} | {pm(r, 'frechet_distance', '.2f')} |"
    )
  return "\n".join(lines) + "\n"


def plot(runs: list[dict], table: list[dict], path: str) -> bool:
  """Held-out loss against training FLOPs (one curve per run) and the final scores."""
  try:
    import matplotlib  # noqa: PLC0415 (the optional `plot` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    log.warning("matplotlib is not installed (pip install -e '.[plot]' in the clone): no %s", path)
    return False
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  names = list(dict.fromkeys(r["schedule"] for r in runs))
  colors = {n: f"C{i}" for i, n in enumerate(names)}
  for r in runs:
    if r["curve"]:
      _, flops, loss = zip(*r["curve"], strict=True)
      label = r["schedule"] if r["seed"] == min(x["seed"] for x in runs) else None
      ax1.plot(np.asarray(flops) / 1e12, loss, color=colors[r["schedule"]], label=label)
  ax1.set(xlabel="training TFLOPs", ylabel="held-out next-token loss", title="Held-out loss")
  ax1.legend()
  for r in runs:
    if r["class_accuracy"] is not None:
      ax2.scatter(r["train_flops"] / 1e12, r["class_accuracy"], color=colors[r["schedule"]])
  ax2.set(xlabel="training TFLOPs", ylabel="judge class accuracy", title="Final samples")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=100, format="png")
  storage.write_bytes(path, buf.getvalue())
  plt.close(fig)
  return True


def run_study(c, root: str) -> dict:
  """Every run of the study, then study.json, study.md and study.png in `root`."""
  runs = [run_one(c, level, seed, root) for level in c.study.patch_levels for seed in c.study.seeds]
  table = summarize(runs)
  result = {"runs": runs, "summary": table, "epochs": c.train.epochs}
  storage.write_text(storage.join(root, "study.json"), json.dumps(result, indent=1))
  storage.write_text(storage.join(root, "study.md"), markdown(table))
  plot(runs, table, storage.join(root, "study.png"))
  log.info("study:\n%s", markdown(table))
  return result


def main(argv):
  del argv
  c = flags.FLAGS.config
  config_lib.check_study(c)
  root = storage.absolute(flags.FLAGS.workdir)
  storage.makedirs(root)
  cli.log_to_workdir(root, "study", 0)
  run_study(c, root)


def run():
  """Console entry point (`npp-jax-study`)."""
  cli.define_config_flags("Directory of the study.")
  cli.run(main)


if __name__ == "__main__":
  run()

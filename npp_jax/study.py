"""`python -m npp_jax.study --config=configs/study_mnist.py --workdir=DIR`: NPP against NTP.

Trains the config once per schedule (`study.patch_levels`: 1 is plain next-token
prediction, 2 and 3 are NPP at `study.epoch_rate`) and seed (`study.seeds`) on the same
data and epochs, plus NTP trained for the FLOPs one NPP schedule spends
(`study.flops_matched_level`). Quality is tracked over training: at `study.quality_points`
epochs spread over each run, the stage ends among them, the run's current weights sample
`study.num_images` images (a fixed set of labels per seed) for the config's judge, beside
the held-out next-token loss, training FLOPs and wall clock.

Each run trains in DIR/runs/<name> (resumed where it stopped; the quality points done are
kept in its points.json). A finished run leaves a record, `<name>.json` in `study.records`
(default DIR/records): its settings, every quality point and its held-out loss curve, a
few kilobytes. A run whose record exists is not trained again (`study.train=False`
trains nothing and summarizes the runs that have records), so the study can be done
in several sittings and the records kept (in the repository) rebuild the summary exactly;
a record made with other settings is refused, never overwritten (keys a newer npp_jax
added are not compared: their defaults keep old behaviour). Writes DIR/study.json,
DIR/study.md (tables, mean and spread over seeds) and DIR/study.png (the `plot` extra:
quality against epochs, training FLOPs and wall clock).
"""

import copy
import dataclasses
import io
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from npp_jax import cli, config_lib, programs
from npp_jax.data import datasets
from npp_jax.data.records import DatasetInfo
from npp_jax.infra import storage
from npp_jax.jobs import evaluate, sample, train

log = logging.getLogger("npp_jax.study")

SCHEDULE_NAMES = {1: "NTP", 2: "NPP-2", 3: "NPP-3", 4: "NPP-4"}
# Config keys that do not change a run's numbers: where things are and how fast they are
# read (another machine, another checkout), and the study section, which says which runs
# and points there are (a run's own schedule, seed and samples are in its train and sample
# keys). A record stays valid when they change.
NOT_SETTINGS = (
  ("data", "cache_dir"),
  ("data", "path"),
  ("data", "eval_path"),
  ("data", "worker_count"),
  ("data", "prefetch_buffer_size"),
  ("eval", "judge_cache"),
  ("eval", "samples"),
  ("train", "max_steps"),
  ("study",),
  ("storage_deadline_s",),
)
# What a quality point records, in the order the tables show it.
QUALITY_KEYS = ("heldout_ntp_loss", "class_accuracy", "frechet_distance")


class StoppedError(Exception):
  """A run's training was stopped (SIGTERM, preemption) and saved: the study stops too."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the study: a schedule, a seed and its length."""

  schedule: str
  patch_level: int
  epochs: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.schedule.replace(' ', '-').replace(',', '')}-seed{self.seed}"


def matched_name(level: int) -> str:
  """The schedule name of NTP trained for the FLOPs of NPP at `level`."""
  return f"NTP at {SCHEDULE_NAMES[level]} FLOPs"


def matched_epochs(c: ml_collections.ConfigDict, level: int) -> int:
  """Epochs of NTP whose training FLOPs are nearest those of NPP at `level` for
  `train.epochs` (the FLOPs per epoch do not depend on the dataset's size)."""
  npp_plan = programs.plan_run(_schedule_config(c, level, c.train.epochs), 1, None)
  ntp_plan = programs.plan_run(_schedule_config(c, 1, c.train.epochs), 1, None)
  return max(1, round(npp_plan.flops_until(npp_plan.total_steps) / ntp_plan.stage_step_flops[0]))


def plan_runs(c: ml_collections.ConfigDict) -> list[RunSpec]:
  """Every run, a seed at a time (a study stopped half way has whole seeds to compare):
  each schedule, then NTP for the FLOPs of `study.flops_matched_level`."""
  st = c.study
  schedules = [(SCHEDULE_NAMES[level], level, c.train.epochs) for level in st.patch_levels]
  if st.flops_matched_level:
    level = st.flops_matched_level
    schedules.append((matched_name(level), 1, matched_epochs(c, level)))
  return [RunSpec(*schedule, seed) for seed in st.seeds for schedule in schedules]


def _schedule_config(c: ml_collections.ConfigDict, level: int, epochs: int):
  r = copy.deepcopy(c)
  r.train.update(patch_level=level, epoch_rate=c.study.epoch_rate, epochs=epochs)
  return r


def run_config(c: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
  """The config of one run: the study's config with this schedule, length and seed."""
  r = _schedule_config(c, spec.patch_level, spec.epochs)
  r.seed = spec.seed
  r.sample.seed = spec.seed  # the labels drawn: the same at every quality point of a run
  r.sample.num_images = c.study.num_images
  r.sample.batch_size = min(c.sample.batch_size, c.study.num_images)
  return r


def settings(r: ml_collections.ConfigDict) -> dict:
  """What determines a run's numbers: its config without NOT_SETTINGS."""
  d = json.loads(r.to_json())
  for path in NOT_SETTINGS:
    parent = d
    for key in path[:-1]:
      parent = parent.get(key, {})
    parent.pop(path[-1], None)
  return d


def quality_epochs(spec: RunSpec, points: int, stage_end_epochs: tuple[int, ...]) -> list[int]:
  """`points` epochs spread evenly over the run, and every stage end."""
  spread = {round(spec.epochs * (i + 1) / points) for i in range(points)}
  return sorted((spread | set(stage_end_epochs)) - {0})


def _rows(workdir: str) -> list[dict]:
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _heldout_curve(workdir: str, last_step: int) -> list[list[float]]:
  """[step, training FLOPs, held-out loss] of every held-out evaluation up to `last_step`
  (a row logged again after a resume counts once)."""
  by_step = {
    r["step"]: r for r in _rows(workdir) if "eval/ntp_loss" in r and r["step"] <= last_step
  }
  return [[s, by_step[s]["train_flops"], by_step[s]["eval/ntp_loss"]] for s in sorted(by_step)]


def _quality_point(r: ml_collections.ConfigDict, workdir: str, epoch: int, step: int) -> dict:
  """Trains to `step` (resuming), samples from those weights and judges the samples."""
  r = copy.deepcopy(r)
  r.train.max_steps = step  # the schedule (and its learning rates) stays the whole run's
  stopped_by = train.run(r, workdir)["stopped_by"]
  if stopped_by:
    raise StoppedError(f"{workdir} stopped by {stopped_by} before step {step}")
  out = sample.run(r, workdir)
  if f"/step{step}-" not in out["dir"]:  # the newest checkpoint must be this point's
    raise RuntimeError(f"{workdir}: sampled {out['dir']}, expected the weights of step {step}.")
  r.eval.samples = out["npz"]
  scores = evaluate.run(r, workdir)
  row = [x for x in _rows(workdir) if x["step"] == step and "eval/ntp_loss" in x][-1]
  return {
    "epoch": epoch,
    "step": step,
    "train_flops": row["train_flops"],
    "train_seconds": row["train_seconds"],
    "heldout_ntp_loss": row["eval/ntp_loss"],
    "class_accuracy": scores["class_accuracy"],
    "frechet_distance": scores["frechet_distance"],
    "real_holdout_frechet_distance": scores["real_holdout_frechet_distance"],
  }


def _steps_per_epoch(r: ml_collections.ConfigDict, workdir: str) -> tuple[int, tuple[int, ...]]:
  """Steps per epoch and stage-end epochs of a run (preparing its dataset if needed)."""
  data_dirs, _ = datasets.locate(r, workdir)
  plan = train.plan_run(r, jax.device_count(), DatasetInfo.load(data_dirs[0]))
  return plan.steps_per_epoch, plan.stage_end_epochs


def train_run(c: ml_collections.ConfigDict, spec: RunSpec, root: str) -> dict:
  """Trains one run through its quality points (those done are kept in its points.json);
  returns its record."""
  workdir = storage.join(root, "runs", spec.name)
  storage.makedirs(workdir)
  r = run_config(c, spec)
  r.data.cache_dir = c.data.cache_dir or storage.join(root, "data")  # one copy of the digits
  r.eval.judge_cache = storage.join(root, "classifier.npz")  # one judge for every run
  spe, stage_ends = _steps_per_epoch(r, workdir)
  done_path = storage.join(workdir, "points.json")
  mine = settings(r)
  points = []
  if storage.exists(done_path):
    done = json.loads(storage.read_text(done_path))
    _check_settings(done["settings"], mine, done_path)
    points = done["points"]
  for epoch in quality_epochs(spec, c.study.quality_points, stage_ends):
    if any(p["epoch"] == epoch for p in points):
      continue
    p = _quality_point(r, workdir, epoch, epoch * spe)
    points.append(p)
    storage.write_text(done_path, json.dumps({"settings": mine, "points": points}, indent=1))
    log.info(
      "%s: epoch %d/%d, held-out loss %.4f, judge accuracy %.3f, Frechet distance %.2f",
      *(spec.name, epoch, spec.epochs, p["heldout_ntp_loss"]),
      *(p["class_accuracy"], p["frechet_distance"]),
    )
  return {
    "name": spec.name,
    **dataclasses.asdict(spec),
    "steps_per_epoch": spe,
    "stage_end_epochs": list(stage_ends),
    "points": points,
    "heldout_curve": _heldout_curve(workdir, spec.epochs * spe),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "settings": mine,
  }


def run_record(c: ml_collections.ConfigDict, spec: RunSpec, root: str, records: str) -> dict | None:
  """The run's record: read from `records` when it was finished before, else trained
  (None, with `study.train=False`, for a run without a record)."""
  path = storage.join(records, f"{spec.name}.json")
  mine = settings(run_config(c, spec))
  if storage.exists(path):
    record = json.loads(storage.read_text(path))
    _check_settings(record["settings"], mine, path)
    log.info("%s: finished before, read from %s", spec.name, path)
    return record
  if not c.study.train:
    log.warning("%s: no record in %s; left out (study.train=False)", spec.name, records)
    return None
  record = train_run(c, spec, root)
  storage.write_text(path, json.dumps(record, indent=1))
  return record


def _check_settings(there: dict, here: dict, path: str) -> None:
  """Refuses a record (or a run's quality points) made with other settings. A key only one
  side has is no difference: a newer npp_jax adds keys whose defaults keep old behaviour."""
  difference = _first_difference(there, here)
  if difference:
    raise ValueError(
      f"the study record {path} was made with other settings ({difference}); set "
      "--config.study.records to another folder (and --workdir), or move the record away "
      "to train the run again."
    )


def _first_difference(there: Any, here: Any, key: str = "config") -> str | None:
  if isinstance(there, dict) and isinstance(here, dict):
    for k in sorted(set(there) & set(here)):
      found = _first_difference(there[k], here[k], f"{key}.{k}")
      if found:
        return found
    return None
  return None if there == here else f"{key} is {there!r} there, {here!r} here"


def _final(record: dict) -> dict:
  return record["points"][-1]


def summarize(records: list[dict]) -> list[dict]:
  """Mean and standard deviation over seeds of every schedule's final numbers."""
  out = []
  for schedule in dict.fromkeys(r["schedule"] for r in records):
    mine = [r for r in records if r["schedule"] == schedule]
    row = {"schedule": schedule, "seeds": len(mine), "epochs": mine[0]["epochs"]}
    for key in ("train_flops", "train_seconds", *QUALITY_KEYS):
      values = np.asarray([_final(r)[key] for r in mine], np.float64)
      row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
    out.append(row)
  ntp = next((r for r in out if r["schedule"] == "NTP"), None)
  for row in out:
    row["flops_vs_ntp"] = row["train_flops"] / ntp["train_flops"] if ntp else None
  return out


def over_training(records: list[dict]) -> list[dict]:
  """Every schedule's quality points: mean and standard deviation over seeds per epoch."""
  out = []
  for schedule in dict.fromkeys(r["schedule"] for r in records):
    mine = [r for r in records if r["schedule"] == schedule]
    epochs = sorted({p["epoch"] for r in mine for p in r["points"]})
    for epoch in epochs:
      at = [p for r in mine for p in r["points"] if p["epoch"] == epoch]
      row = {"schedule": schedule, "epoch": epoch, "seeds": len(at)}
      for key in ("train_flops", "train_seconds", *QUALITY_KEYS):
        values = np.asarray([p[key] for p in at], np.float64)
        row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
      out.append(row)
  return out


def _pm(row: dict, key: str, fmt: str) -> str:
  """Mean ± standard deviation over seeds; the value alone for one seed."""
  if row["seeds"] == 1:
    return f"{row[key]:{fmt}}"
  return f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}"


def markdown(table: list[dict], curve: list[dict]) -> str:
  """The final numbers and the quality over training, as markdown tables (mean ± standard
  deviation over seeds)."""
  lines = [
    "| schedule | seeds | epochs | training TFLOPs (x NTP) | wall clock (s) | held-out NTP loss "
    "| class accuracy | Fréchet distance |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in table:
    ratio = f" ({r['flops_vs_ntp']:.2f})" if r["flops_vs_ntp"] is not None else ""
    lines.append(
      f"| {r['schedule']} | {r['seeds']} | {r['epochs']} | {r['train_flops'] / 1e12:.2f}{ratio} | "
      f"{_pm(r, 'train_seconds', '.0f')} | {_pm(r, 'heldout_ntp_loss', '.4f')} | "
      f"{_pm(r, 'class_accuracy', '.3f')} | {_pm(r, 'frechet_distance', '.2f')} |"
    )
  lines += [
    "",
    "| schedule | epoch | training TFLOPs | wall clock (s) | held-out NTP loss | class accuracy "
    "| Fréchet distance |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in curve:
    lines.append(
      f"| {r['schedule']} | {r['epoch']} | {r['train_flops'] / 1e12:.2f} | "
      f"{_pm(r, 'train_seconds', '.0f')} | {_pm(r, 'heldout_ntp_loss', '.4f')} | "
      f"{_pm(r, 'class_accuracy', '.3f')} | {_pm(r, 'frechet_distance', '.2f')} |"
    )
  return "\n".join(lines) + "\n"


def plot(curve: list[dict], path: str) -> bool:
  """Judge accuracy, Fréchet distance and held-out loss against epochs, training FLOPs and
  wall clock: one curve per schedule (mean over seeds, the band one standard deviation)."""
  try:
    import matplotlib  # noqa: PLC0415 (the optional `plot` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    log.warning("matplotlib is not installed (pip install -e '.[plot]' in the clone): no %s", path)
    return False
  xs = (("epoch", "epochs", 1.0), ("train_flops", "training TFLOPs", 1e-12))
  xs += (("train_seconds", "training wall clock (s)", 1.0),)
  ys = (("class_accuracy", "judge class accuracy"), ("frechet_distance", "Fréchet distance"))
  ys += (("heldout_ntp_loss", "held-out next-token loss"),)
  fig, axes = plt.subplots(len(ys), len(xs), figsize=(13, 10), sharex="col", sharey="row")
  schedules = list(dict.fromkeys(r["schedule"] for r in curve))
  for i, schedule in enumerate(schedules):
    rows = [r for r in curve if r["schedule"] == schedule]
    for (xkey, xlabel, scale), col in zip(xs, axes.T, strict=True):
      x = np.asarray([r[xkey] for r in rows]) * scale
      for (ykey, ylabel), ax in zip(ys, col, strict=True):
        y, s = (np.asarray([r[k] for r in rows]) for k in (ykey, f"{ykey}_std"))
        ax.plot(x, y, "o-", color=f"C{i}", label=schedule, markersize=3)
        ax.fill_between(x, y - s, y + s, color=f"C{i}", alpha=0.2)
        ax.set(xlabel=xlabel if ax is col[-1] else None, ylabel=ylabel if xkey == "epoch" else None)
  axes[1, 0].set_yscale("log")
  axes[0, 0].legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=90, format="png")
  storage.write_bytes(path, buf.getvalue())
  plt.close(fig)
  return True


def run_study(c: ml_collections.ConfigDict, root: str) -> dict:
  """Every run of the study (or its record), then study.json, study.md and study.png."""
  records_dir = (
    storage.absolute(c.study.records) if c.study.records else storage.join(root, "records")
  )
  storage.makedirs(records_dir)
  records = [run_record(c, spec, root, records_dir) for spec in plan_runs(c)]
  records = [r for r in records if r is not None]
  if not records:
    raise ValueError(f"no run of the study has a record in {records_dir}: nothing to summarize.")
  table, curve = summarize(records), over_training(records)
  result = {"runs": records, "summary": table, "over_training": curve}
  storage.write_text(storage.join(root, "study.json"), json.dumps(result, indent=1))
  storage.write_text(storage.join(root, "study.md"), markdown(table, curve))
  plot(curve, storage.join(root, "study.png"))
  log.info("study:\n%s", markdown(table, curve))
  return result


def main(argv):
  del argv
  c = flags.FLAGS.config
  config_lib.check_study(c)
  root = storage.absolute(flags.FLAGS.workdir)
  storage.makedirs(root)
  cli.log_to_workdir(root, "study", 0)
  try:
    run_study(c, root)
  except StoppedError as e:
    log.warning("%s; run the same command to go on where it stopped", e)


def run():
  """Console entry point (`npp-jax-study`)."""
  cli.define_config_flags("Directory of the study.")
  cli.run(main)


if __name__ == "__main__":
  run()

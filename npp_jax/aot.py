"""Compile every program a job runs for a named topology, with no accelerator, data or weights.

python -m npp_jax.aot --config=configs/l.py --topology=v5p:4x4x4 [--programs=train,sample]
    [--fit] [--config.a.b=v ...]

Programs: the train step of every stage of the config's schedule (`train`), the held-out
eval step (`eval`), the sampling decode loop at `sample.batch_size` with the config's
guidance (`sample`), the VQ encoder at `extract.batch_size` x `extract.image_size`
(`extract`, VQ tokenizers) and the FID Inception at `eval.batch_size` (`inception`, when
`eval.kind` is inception). Each is built by the function the job itself calls, over the
compile-only chips of `--topology` (see npp_jax/accelerators/topologies.py), and compiled
by the real TPU or GPU compiler. One JSON line per program, then a table: memory per
chip, whether it fits (with 5% headroom), FLOPs (the compiled program's matmuls, loop
bodies multiplied out) beside the model's, the collectives, and a roofline step time
(FLOPs at the chip's peak, bytes at its HBM bandwidth, collectives over its links; an
estimate, not a measurement). `--fit` searches, per stage, the largest global batch that
fits and the cheapest overrides that make the recipe's batch fit.
"""

import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import flags

# Compile-only: no backend but the CPU is started (a TPU VM's chips may be busy training;
# a CPU machine has none). Set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several checks may run at once
# libtpu otherwise probes this machine as a TPU host (metadata server, worker names) and
# prints warnings when it is not one; the abstract topology needs none of that.
for _key, _value in (
  ("TPU_SKIP_MDS_QUERY", "1"),
  ("TPU_WORKER_HOSTNAMES", "localhost"),
  ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
):
  os.environ.setdefault(_key, _value)

import jax  # noqa: E402

from npp_jax import cli, config_lib, programs, sampling, sharding, tokenizers  # noqa: E402
from npp_jax.accelerators import hardware, hlo_ops, topologies  # noqa: E402
from npp_jax.evaluation import inception_fid  # noqa: E402
from npp_jax.models import gpt_flops  # noqa: E402

PROGRAMS = ("train", "eval", "sample", "extract", "inception")
log = logging.getLogger("npp_jax.aot")


def _define_flags() -> None:
  cli.define_config_flags(None)
  flags.DEFINE_string(
    "topology", None, "TPU slice (v5e:4x4, v5p:4x4x4, ...) or GPUs (h100:8, h200:8, a100:8)."
  )
  flags.mark_flag_as_required("topology")
  flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile: {PROGRAMS}.")
  flags.DEFINE_bool("fit", False, "Search batches and overrides that fit each stage.")
  flags.DEFINE_bool(
    "require_fit", False, "Exit with status 3 when a program does not fit or compile."
  )


@dataclasses.dataclass
class Program:
  """One program to compile: its name, what it runs on, and how to trace it."""

  program: str
  lower: Callable[[], jax.stages.Lowered]
  global_batch: int
  model_flops: float  # per execution, all chips
  info: dict = dataclasses.field(default_factory=dict)
  mesh: Any = None  # when the job lays its devices out otherwise (sampling)


def train_programs(c, mesh) -> list[Program]:
  """Every stage's train step (ImageNet's size for the schedule's step count)."""
  p = programs.TrainPrograms(c, mesh, programs.IMAGENET_TRAIN_IMAGES)
  out = []
  for stage, side in enumerate(p.plan.patch_sides):
    info = {"patch_side": side, "stage": stage, "stage_epochs": p.plan.stage_epochs[stage]}
    info |= {"steps_per_epoch": p.plan.steps_per_epoch}
    out.append(
      Program(
        "train",
        lambda side=side: p.lower_step(side),
        p.global_batch,
        gpt_flops.train_step_flops(p.cfg, side, p.global_batch),
        info,
      )
    )
  return out


def eval_program(c, mesh) -> Program:
  p = programs.TrainPrograms(c, mesh, None)
  flops = gpt_flops.forward_flops(p.cfg, p.cfg.seq_len) * p.global_batch
  return Program("eval", p.lower_eval, p.global_batch, flops)


def sample_program(c, mesh) -> Program:
  cfg = config_lib.sampling_gpt_config(c)
  s = c.sample
  settings = dict(
    cfg_scale=s.cfg_scale,
    cfg_interval=s.cfg_interval,
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
  )
  mesh = sampling.sampling_mesh(c.mesh.to_dict(), cfg, mesh.devices.flat)
  rows = s.batch_size * (2 if s.cfg_scale > 1.0 else 1)
  flops = sum(gpt_flops.decode_step_flops(cfg, rows) for _ in range(cfg.seq_len))
  info = {"cfg_scale": s.cfg_scale, "precision": s.precision, "token_steps": cfg.seq_len}
  return Program(
    "sample",
    lambda: sampling.lower(cfg, mesh, s.batch_size, **settings),
    s.batch_size,
    flops,
    info,
    mesh,
  )


def extract_program(c, mesh) -> Program:
  vq = tokenizers.vq_config(c)
  e = c.extract
  info = {"image_size": e.image_size, "precision": c.tokenizer.precision}
  batch = tokenizers.encode_batch(e.batch_size, mesh.size)
  return Program(
    "extract",
    lambda: tokenizers.lower_encoder(vq, c.tokenizer.precision, mesh, batch, e.image_size),
    batch,
    0.0,
    info,
  )


def inception_program(c, mesh) -> Program:
  size = c.model.grid * tokenizers.vq_config(c).downsample
  info = {"image_size": size, "preprocess": c.eval.preprocess}
  return Program(
    "inception",
    lambda: inception_fid.lower_features(c.eval.preprocess, mesh, c.eval.batch_size, size),
    c.eval.batch_size,
    0.0,
    info,
  )


def job_programs(c, mesh, which) -> list[Program]:
  """The programs of `which` that the config has (extract and inception need a VQ
  tokenizer and the Inception judge)."""
  out: list[Program] = []
  if "train" in which:
    out += train_programs(c, mesh)
  if "eval" in which:
    out.append(eval_program(c, mesh))
  if "sample" in which:
    out.append(sample_program(c, mesh))
  if "extract" in which and c.tokenizer.name == "vq":
    out.append(extract_program(c, mesh))
  if "inception" in which and c.eval.kind == "inception" and c.tokenizer.name == "vq":
    out.append(inception_program(c, mesh))
  return out


def analyse(prog: Program, topology: str, mesh) -> dict[str, Any]:
  """Compiles `prog` and reads its memory, cost, collectives and a roofline time."""
  mesh = prog.mesh or mesh
  device = mesh.devices.flat[0]
  chip = hardware.chip(device)
  row: dict[str, Any] = {"program": prog.program, **prog.info, "topology": topology}
  row |= {"chips": mesh.size, "mesh": dict(mesh.shape), "global_batch": prog.global_batch}
  hbm = None if chip is None else chip.hbm_gib
  row["hbm_gib"] = None if hbm is None else round(hbm, 1)
  t0 = time.perf_counter()
  notes: list[str] = []
  try:
    compiled = programs.compile_program(prog.lower(), notes)
  except programs.CompilerOutOfMemoryError as e:
    # libtpu refuses what does not fit instead of returning it: a row that does not fit,
    # with the size the compiler asked for (temporaries, or all it counted).
    gib = lambda n: None if n is None else round(n / hardware.GIB, 3)
    row |= {"fits": False, "compiler_refused": str(e), "compiler_required_gib": gib(e.required)}
    row |= {"compiler_available_gib": gib(e.available), "flops_per_chip": None}
    row["model_flops_per_chip"] = prog.model_flops / mesh.size if prog.model_flops else None
    row["compile_sec"] = round(time.perf_counter() - t0, 1)
    return row
  except jax.errors.JaxRuntimeError as e:
    # A compiler fault is a finding for this program, not the end of the check.
    row |= {"fits": None, "compile_error": str(e).splitlines()[0][:400], "flops_per_chip": None}
    row["compile_sec"] = round(time.perf_counter() - t0, 1)
    return row
  seconds = time.perf_counter() - t0
  if notes:
    row["compiler_options"] = notes
  mem = programs.memory_per_chip(compiled)
  if mem is not None:
    row["memory_per_chip_gib"] = {k: round(v / hardware.GIB, 3) for k, v in mem.items()}
  row["fits"] = (
    None
    if mem is None or hbm is None
    else bool(mem["total"] <= programs.HEADROOM * hbm * hardware.GIB)
  )
  row |= _cost(compiled, prog, chip, mesh.size)
  row["compile_sec"] = round(seconds, 1)
  return row


def _cost(compiled, prog: Program, chip, chips: int) -> dict[str, Any]:
  """FLOPs, bytes, loops and collectives of a compiled program, the compiler's own
  estimate, and a roofline time on `chip` (when its data sheet is known)."""
  cost = hlo_ops.program_cost(compiled.as_text())
  row: dict[str, Any] = {"flops_per_chip": cost.matmul_flops}
  row["model_flops_per_chip"] = prog.model_flops / chips if prog.model_flops else None
  row["bytes_per_chip"] = cost.bytes_accessed
  row["loops"] = dict(cost.loops)
  if cost.unknown_trip_counts:
    row["loops_with_unknown_trip_count"] = cost.unknown_trip_counts
  row["collectives"] = cost.collective_summary()
  row["collectives_in_loops"] = sum(col.count for col in cost.collectives if col.in_loop)
  row |= _compiler_estimate(compiled)
  if chip is not None:
    work, comm = cost.roofline_seconds(
      chip.peak_bf16_tflops * 1e12, chip.hbm_gb_per_s * 1e9, chip.interconnect_gb_per_s * 1e9
    )
    row["est_step_ms"] = round(1e3 * (work + comm), 3)
    row["est_comm_ms"] = round(1e3 * comm, 3)
    row["estimate"] = "roofline"
    if prog.program == "sample":
      row["est_images_per_sec"] = round(prog.global_batch / (work + comm), 1)
    if prog.model_flops:
      row["est_mfu"] = round(
        prog.model_flops / chips / (chip.peak_bf16_tflops * 1e12) / (work + comm), 4
      )
  return row


def _compiler_estimate(compiled) -> dict[str, Any]:
  """The compiler's own figures where it gives them: they count a loop body once, and
  libtpu's optimal_seconds adds -1 s per custom call it cannot model (ConcatBitcast):
  reported with that count, never used for the estimate."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (GPU compile-only clients have none)
    ca = None
  ca = ca[0] if isinstance(ca, list) and ca else ca
  if not ca:
    return {}
  out = {"compiler_flops_loops_once": ca.get("flops")}
  if "optimal_seconds" in ca:
    unmodelled = len(re.findall(r'custom_call_target="ConcatBitcast"', compiled.as_text()))
    out["compiler_optimal_seconds"] = ca["optimal_seconds"]
    out["compiler_unmodelled_custom_calls"] = unmodelled
    if "while" not in compiled.as_text():  # a loop-free program: the corrected figure holds
      out["compiler_optimal_seconds_corrected"] = ca["optimal_seconds"] + unmodelled
  return out


def schedule_estimate(rows: list[dict]) -> dict[str, Any] | None:
  """The whole NPP schedule's estimated wall clock over next-token training's for the same
  epochs (all at the token stage), beside the model-FLOP ratio."""
  train = [r for r in rows if r["program"] == "train"]
  token = next((r for r in train if r["patch_side"] == 1), None)
  if not train or token is None or any("est_step_ms" not in r for r in train):
    return None  # a stage was not compiled or not estimated: no honest ratio
  epochs = sum(r["stage_epochs"] for r in train)
  npp_time = sum(r["stage_epochs"] * r["est_step_ms"] for r in train)
  npp_flops = sum(r["stage_epochs"] * r["model_flops_per_chip"] for r in train)
  spe = token["steps_per_epoch"]
  return {
    "program": "schedule",
    "topology": token["topology"],
    "npp_over_ntp_time": round(npp_time / (epochs * token["est_step_ms"]), 3),
    "npp_over_ntp_flops": round(npp_flops / (epochs * token["model_flops_per_chip"]), 3),
    "npp_days": round(npp_time * spe / 1e3 / 86400, 2),
    "ntp_days": round(epochs * token["est_step_ms"] * spe / 1e3 / 86400, 2),
    "estimate": "roofline",
  }


def fit_stage(c, devices, side: int, limit: int) -> dict[str, Any]:
  """The largest global batch (a multiple of the data-parallel size) whose stage `side`
  fits, and the first overrides, cheapest first, that make the recipe's batch fit."""
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  dp = sharding.data_parallel_size(mesh)

  def fits_at(batch: int) -> bool:
    trial = programs.with_overrides(
      c, {"train.global_batch_size": batch, "train.grad_accum_steps": 1}
    )
    p = programs.TrainPrograms(trial, mesh, None)
    return programs.compiles_within(p.lower_step(side), limit) is not None

  # From the recipe's batch: doubled while it fits (up to 4x), else halved until it does;
  # then bisected between the last fit and the first failure, in multiples of dp.
  recipe = c.train.global_batch_size
  if fits_at(recipe):
    lo, hi = recipe, None
    while lo < 4 * recipe and fits_at(2 * lo):
      lo *= 2
    hi = 2 * lo if lo < 4 * recipe else None
  else:
    lo, hi = recipe // 2 // dp * dp, recipe
    while lo >= dp and not fits_at(lo):
      lo, hi = lo // 2 // dp * dp, lo
  while lo >= dp and hi is not None and hi - lo > dp:
    mid = (lo + hi) // 2 // dp * dp
    if mid in (lo, hi):
      break
    lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
  lo = max(lo, 0)
  out: dict[str, Any] = {"program": "fit", "patch_side": side, "max_global_batch": lo}
  if hi is None:
    out["max_global_batch_searched_up_to"] = lo
  if lo >= recipe:
    out["recipe_batch_fits"] = True
    return out
  out["recipe_batch_fits"] = False
  found = programs.first_fitting(c, devices, side, limit, None)
  if found:
    out["overrides"] = programs.overrides_text(found[0])
    out["memory_per_chip_gib"] = round(
      programs.memory_per_chip(found[1])["total"] / hardware.GIB, 3
    )
  return out


def table(rows: list[dict]) -> str:
  """The rows as a fixed-width table for people."""
  head = ("program", "side", "batch", "GiB/chip", "HBM", "fits", "TFLOP/chip", "model", "ms", "MFU")
  lines = ["  ".join(f"{h:>10}" for h in head)]
  for r in rows:
    if r["program"] in ("schedule", "fit"):
      continue
    mem = r.get("memory_per_chip_gib", {}).get("total")
    if mem is None and r.get("compiler_required_gib") is not None:
      mem = f">{r['compiler_required_gib']:.2f}"  # refused by the compiler
    elif mem is not None:
      mem = f"{mem:.2f}"
    cells = (
      r["program"],
      r.get("patch_side", ""),
      r["global_batch"],
      "?" if mem is None else mem,
      r.get("hbm_gib") or "?",
      "ERROR" if "compile_error" in r else {True: "yes", False: "NO", None: "?"}[r["fits"]],
      "?" if r["flops_per_chip"] is None else f"{r['flops_per_chip'] / 1e12:.2f}",
      "" if not r.get("model_flops_per_chip") else f"{r['model_flops_per_chip'] / 1e12:.2f}",
      r.get("est_step_ms", "?"),
      "" if "est_mfu" not in r else f"{r['est_mfu']:.1%}",
    )
    lines.append("  ".join(f"{str(x):>10}" for x in cells))
  for r in rows:
    if r["program"] == "schedule":
      lines.append(
        f"NPP schedule / NTP, same epochs: time {r['npp_over_ntp_time']} (estimated), "
        f"FLOPs {r['npp_over_ntp_flops']}; {r['npp_days']} vs {r['ntp_days']} days"
      )
    if r["program"] == "fit":
      fix = "" if r["recipe_batch_fits"] else f"; recipe batch: {r.get('overrides', 'none found')}"
      lines.append(f"fit: patch side {r['patch_side']}: largest batch {r['max_global_batch']}{fix}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  fv = flags.FLAGS
  c, topology = fv.config, fv.topology
  which = [p.strip() for p in fv.programs if p.strip()]
  unknown = sorted(set(which) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"--programs: unknown {unknown}; choose from {PROGRAMS}.")
  devices = topologies.devices(topology)
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  log.info(
    "compiling for %s: %d chips (%s), mesh %s",
    topology,
    len(devices),
    devices[0].device_kind,
    dict(mesh.shape),
  )
  rows = []
  for prog in job_programs(c, mesh, which):
    row = analyse(prog, topology, mesh)
    print(json.dumps(row), flush=True)
    rows.append(row)
  sched = schedule_estimate(rows)
  if sched:
    print(json.dumps(sched), flush=True)
    rows.append(sched)
  if fv.fit:
    limit = programs.memory_limit(c, devices[0])
    for side in programs.plan_run(c, len(devices), None).patch_sides:
      row = fit_stage(c, devices, side, limit)
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(table(rows), file=sys.stderr)
  for r in rows:
    if "compile_error" in r:
      print(f"{r['program']} {r.get('patch_side', '')}: {r['compile_error']}", file=sys.stderr)
  too_big = [r for r in rows if r.get("fits") is False or "compile_error" in r]
  if fv.require_fit and too_big:
    names = ", ".join(f"{r['program']} (patch side {r.get('patch_side', '-')})" for r in too_big)
    print(f"error: does not fit or compile for {topology}: {names}; see --fit", file=sys.stderr)
    sys.exit(3)


def run():
  """Console entry point (`npp-jax-aot`)."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()

"""Benchmarks (random weights): `python -m npp_jax.bench WHAT --config=configs/b.py ...`.

sample: images/s and ms per token step of `sampling.generate` with the config's guidance,
        after warm-up; `--max_batch` also searches the largest batch that fits (doubling
        until out of memory).
train:  ms per train step and images/s for one NPP stage (`--patch_side`); with
        `--real_data=DIR` also fed by the input pipeline from the config's dataset (the
        input stall is the relative difference).
schedule: the whole NPP schedule of the config (`train.patch_level`, `epochs`,
        `epoch_rate`) against next-token training for the same epochs: each stage's step
        timed, weighted by its epochs; wall-clock and FLOP ratios.
tokenizer: encode and decode images/s of the config's VQ tokenizer at `--image_size`.
eval:   FID Inception feature extraction images/s (256 px uint8 -> 299, with the config's
        `eval.preprocess`).
Settings come from the config (`--config.sample.cfg_scale=1.75`, ...). Each result is
printed as one JSON line; BENCHMARKS.md records them.
"""

import copy
import functools
import itertools
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from npp_jax import config_lib, npp, programs, sampling, sharding, tokenizers, train_step
from npp_jax.accelerators import hardware, hlo_ops
from npp_jax.data import datasets, pipeline
from npp_jax.data.records import DatasetInfo
from npp_jax.evaluation import inception_fid
from npp_jax.models import gpt_flops, inception, vqgan
from npp_jax.models.gpt import GPT

WHAT = ("train", "sample", "tokenizer", "eval", "schedule", "extract")


def _machine() -> dict:
  """The devices a row ran on, and XLA_FLAGS when set (they change what is measured)."""
  d = jax.devices()[0]
  row = {"device": f"{jax.device_count()}x {getattr(d, 'device_kind', d.platform)}"}
  xla_flags = os.environ.get("XLA_FLAGS", "").strip()
  return row | ({"xla_flags": xla_flags} if xla_flags else {})


def _model_settings(cfg) -> dict:
  """The model settings a variant row differs in."""
  return {
    "dtype": cfg.dtype,
    "attention": cfg.attention,
    "scan_unroll": cfg.scan_unroll,
    "remat": cfg.remat,
  }


def _op_counts(hlo_text: str) -> dict:
  """The compiled step's operations outside fusions (see hlo_ops); a text it cannot read
  is reported in the row instead of losing the row's timings."""
  try:
    return {"hlo_ops": hlo_ops.op_counts(hlo_text)}
  except (ValueError, StopIteration) as e:
    return {"hlo_ops": None, "hlo_ops_error": repr(e)[:200]}


def random_params(cfg, key=0):
  """Random params with a non-zero output head (zero heads give uniform logits)."""
  init = jax.jit(
    lambda k: GPT(cfg).init(k, jnp.zeros((1, cfg.seq_len), jnp.int32), jnp.zeros((1,), jnp.int32))[
      "params"
    ]
  )
  params = train_step.unboxed(init(jax.random.key(key)))
  params["output"] = 0.02 * jax.random.normal(jax.random.key(key + 1), params["output"].shape)
  return params


def bench_sample(c, batch: int, repeats: int, mesh) -> dict:
  cfg = config_lib.sampling_gpt_config(c)
  params = jax.device_put(random_params(cfg), sharding.replicated(mesh))
  labels = np.arange(batch) % cfg.num_classes
  run = functools.partial(
    sampling.generate,
    params,
    cfg,
    labels,
    cfg_scale=c.sample.cfg_scale,
    temperature=c.sample.temperature,
    top_k=c.sample.top_k,
    top_p=c.sample.top_p,
    mesh=mesh,
  )
  t0 = time.perf_counter()
  jax.block_until_ready(run(jax.random.key(0)))
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(r + 1)))
    times.append(time.perf_counter() - t0)
  t = float(np.median(times))
  return {
    "bench": "sample",
    "model": c.model.preset,
    "batch": batch,
    "cfg_scale": c.sample.cfg_scale,
    **_model_settings(cfg),
    "sec_per_batch": round(t, 4),
    "images_per_sec": round(batch / t, 1),
    "ms_per_token_step": round(1e3 * t / cfg.seq_len, 3),
    # The decoding steps of a batch (guidance doubles the rows), over the measured time.
    **_utilisation(_sample_flops(cfg, batch, c.sample.cfg_scale) / t),
    "first_call_sec": round(compile_s, 1),
    **_machine(),
  }


def _real_batches(c, cfg, batch: int, steps: int, mesh, cache_dir: str):
  """An iterator of global batches from the config's dataset through the trainer's grain
  pipeline (the embedded digits are built under `cache_dir` on first use)."""
  dirs, _ = datasets.locate(c, cache_dir)
  info = DatasetInfo.load(dirs[0])
  ds = pipeline.train_dataset(
    dirs,
    vocab_size=cfg.vocab_size,
    num_classes=cfg.num_classes,
    grid=cfg.grid,
    global_batch=batch,
    steps_per_epoch=pipeline.steps_per_epoch(info.num_records, batch),
    num_steps=steps,
    seed=c.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  batch_sh = sharding.batch_sharding(mesh)
  for local in pipeline.to_iterator(ds, c.data.worker_count, c.data.prefetch_buffer_size):
    yield sharding.global_batch(local, batch_sh)


def bench_train(
  c, batch: int, patch_side: int, repeats: int, mesh, real_data_dir: str = ""
) -> dict:
  """The trainer's own step (`programs.TrainPrograms`) timed on a constant random batch;
  with `real_data_dir`, also on batches read through the input pipeline each step, whose
  extra time is the input stall."""
  c = copy.deepcopy(c)
  c.train.global_batch_size = batch
  p = programs.TrainPrograms(c, mesh, None)
  state = p.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  data = {
    "tokens": rng.integers(0, p.cfg.vocab_size, (batch, p.cfg.seq_len), dtype=np.int32),
    "label": rng.integers(0, p.cfg.num_classes, batch, dtype=np.int32),
  }
  data = jax.device_put(data, p.batch_sharding)
  t0 = time.perf_counter()
  compiled = p.lower_step(patch_side).compile()
  compile_s = time.perf_counter() - t0
  state, t = _seconds_per_step(compiled, state, itertools.repeat(data), 3, repeats)
  real = {}
  if real_data_dir:
    batches = _real_batches(c, p.cfg, batch, repeats + 1, mesh, real_data_dir)
    state, t_real = _seconds_per_step(compiled, state, batches, 1, repeats)
    real = {
      "ms_per_step_real_data": round(1e3 * t_real, 2),
      "input_stall": round(t_real / t - 1.0, 4),
    }
  return {
    "bench": "train",
    "model": c.model.preset,
    "batch": batch,
    "patch_side": patch_side,
    "seq_len": (p.cfg.grid // patch_side) ** 2,
    **_model_settings(p.cfg),
    "ms_per_step": round(1e3 * t, 2),
    "images_per_sec": round(batch / t, 1),
    **_utilisation(gpt_flops.train_step_flops(p.cfg, patch_side, batch) / t),
    **real,
    "compile_sec": round(compile_s, 1),
    **_op_counts(compiled.as_text()),
    **_machine(),
  }


def _seconds_per_step(compiled, state, batches, warmup: int, repeats: int) -> tuple[Any, float]:
  """(state, mean seconds per step of `repeats` steps after `warmup` untimed ones)."""
  for b in itertools.islice(batches, warmup):
    state, m = compiled(state, b)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in itertools.islice(batches, repeats):
    state, m = compiled(state, b)
  jax.block_until_ready(m)
  return state, (time.perf_counter() - t0) / repeats


def bench_schedule(c, batch: int, repeats: int, mesh, report=lambda row: None) -> dict:
  """NPP's whole-schedule training time over NTP's (every epoch at patch side 1); each
  patch side's `bench train` row goes to `report` as it is measured."""
  cfg = config_lib.gpt_config(c)
  sides = npp.patch_sides(c.train.patch_level)
  ends = npp.stage_boundaries(c.train.epochs, c.train.patch_level, c.train.epoch_rate)
  epochs = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
  ms = {}
  for s in sorted({*sides, 1}, reverse=True):
    row = bench_train(c, batch, s, repeats, mesh)
    report(row)
    ms[s] = row["ms_per_step"]
  flops = {s: gpt_flops.train_step_flops(cfg, s, batch) for s in ms}
  total = ends[-1]
  return {
    "bench": "schedule",
    "model": c.model.preset,
    "batch": batch,
    "patch_sides": list(sides),
    "epochs_per_stage": epochs,
    "ms_per_step": {str(s): v for s, v in ms.items()},
    "wall_clock_ratio": round(
      sum(e * ms[s] for s, e in zip(sides, epochs, strict=True)) / (total * ms[1]), 4
    ),
    "flop_ratio": round(
      sum(e * flops[s] for s, e in zip(sides, epochs, strict=True)) / (total * flops[1]), 4
    ),
    **_machine(),
  }


def _utilisation(flops_per_sec: float) -> dict:
  """Achieved model TFLOP/s, and MFU against the devices' bf16 peak where it is known."""
  out = {"model_tflops_per_sec": round(flops_per_sec / 1e12, 4)}
  mfu = hardware.mfu(flops_per_sec)
  if mfu is not None:
    out["mfu"] = round(mfu, 4)
  return out


def _sample_flops(cfg, batch: int, cfg_scale: float) -> int:
  rows = 2 * batch if cfg_scale > 1.0 else batch
  return cfg.seq_len * gpt_flops.decode_step_flops(cfg, rows)


def bench_tokenizer(c, batch: int, image_size: int, repeats: int) -> dict:
  cfg = config_lib.vq_config(c)
  tok = tokenizers.VQTokenizer(cfg, random_vq_params(cfg, 0), precision=c.tokenizer.precision)
  x = jax.random.uniform(jax.random.key(1), (batch, image_size, image_size, 3), minval=-1.0)
  codes = jax.block_until_ready(tok.encode(x))
  jax.block_until_ready(tok.decode(codes))
  out = {
    "bench": "tokenizer",
    "model": c.tokenizer.preset,
    "batch": batch,
    "image_size": image_size,
    **_machine(),
  }
  for name, fn, arg in (("encode", tok.encode, x), ("decode", tok.decode, codes)):
    t0 = time.perf_counter()
    for _ in range(repeats):
      r = fn(arg)
    jax.block_until_ready(r)
    t = (time.perf_counter() - t0) / repeats
    out[f"{name}_images_per_sec"] = round(batch / t, 2)
  return out


def _photo_folder(root: str, images: int, classes: int = 4) -> str:
  """`images` JPEGs of 500x375 px (ImageNet's typical size; smooth random content) in
  `classes` class folders."""
  from PIL import Image  # noqa: PLC0415

  rng = np.random.default_rng(0)
  for i in range(images):
    folder = os.path.join(root, f"class{i % classes}")
    os.makedirs(folder, exist_ok=True)
    small = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    small.resize((500, 375), Image.BICUBIC).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
  return root


def bench_extract(c, config_file: str, overrides: list[str], images: int) -> dict:
  """Extraction as the command runs it: `python -m npp_jax.main --config.mode=extract` in a
  subprocess over `images` photo-sized JPEGs, with a random-weight tokenizer of the
  config's preset and the config's extract settings (default shard size: every image in
  one shard). Images/s from start to end (start-up and compile included) and the
  subprocess's peak resident memory."""
  import resource  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  from npp_jax.models import params_io  # noqa: PLC0415

  cfg = config_lib.vq_config(c)
  with tempfile.TemporaryDirectory(prefix="npp_bench_extract_") as tmp:
    folder = _photo_folder(os.path.join(tmp, "images"), images)
    params_io.save_params(os.path.join(tmp, "vq"), random_vq_params(cfg), cfg)
    cmd = [sys.executable, "-m", "npp_jax.main", f"--config={config_file}", *overrides]
    cmd += ["--config.mode=extract", f"--workdir={tmp}/wd", f"--config.extract.data_dir={folder}"]
    cmd += [f"--config.tokenizer.checkpoint={tmp}/vq", f"--config.model.num_classes={4}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode:
      raise RuntimeError(f"extraction failed:\n{out.stderr[-3000:]}")
    report = json.loads(pathlib.Path(tmp, "wd", "codes", "extract_report.json").read_text())
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
  e = c.extract
  return {
    "bench": "extract",
    "tokenizer": c.tokenizer.preset,
    "images": report["images"],
    "variants_per_image": 10 if e.ten_crop else 2,
    "image_size": e.image_size,
    "images_per_shard": e.images_per_shard,
    "encoder_batch": tokenizers.encode_batch(e.batch_size, jax.local_device_count()),
    "seconds": round(seconds, 1),
    "images_per_sec": round(report["images"] / seconds, 2),
    "peak_rss_gib": round(peak / hardware.GIB, 2),
    **_machine(),
  }


def random_vq_params(cfg, key=1):
  """Small random values in every VQ parameter (a benchmark needs no trained weights)."""
  abstract = vqgan.abstract_params(cfg)
  keys = iter(jax.random.split(jax.random.key(key), len(jax.tree.leaves(abstract))))
  return jax.tree.map(lambda a: 0.02 * jax.random.normal(next(keys), a.shape), abstract)


def bench_eval(batch: int, repeats: int, mesh, preprocess: str) -> dict:
  abstract = inception.abstract_variables()
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))
  variables = jax.tree.map(lambda a: 0.05 * jax.random.normal(next(keys), a.shape), abstract)
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  extract = inception_fid.FeatureExtractor(variables, preprocess, batch, mesh)
  images = np.random.default_rng(0).integers(0, 256, (extract.batch, 256, 256, 3), np.uint8)
  list(extract(images, "warm-up"))
  t0 = time.perf_counter()
  for _ in range(repeats):
    list(extract(images, "bench"))
  t = (time.perf_counter() - t0) / repeats
  return {
    "bench": "eval",
    "batch": extract.batch,
    "image_size": 256,
    "preprocess": preprocess,
    "images_per_sec": round(extract.batch / t, 1),
    **_machine(),
  }


def _is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e) or "OOM" in str(e)


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags beside `--config`."""
  flags.DEFINE_integer("batch", 32, "global batch", flag_values=fv)
  flags.DEFINE_integer("patch_side", 1, "NPP patch side of the train step", flag_values=fv)
  flags.DEFINE_integer("image_size", 256, "tokenizer benchmark resolution", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "timed repetitions", flag_values=fv)
  flags.DEFINE_bool("max_batch", False, "also find the largest batch (sample)", flag_values=fv)
  flags.DEFINE_integer("images", 64, "photo-sized JPEGs to extract (extract)", flag_values=fv)
  flags.DEFINE_string(
    "real_data",
    "",
    "train: also time steps fed by the input pipeline from the config's dataset; the value "
    "is a directory for the embedded digits' cache",
    flag_values=fv,
  )


def run(what: str, fv: flags.FlagValues, argv: list[str]) -> int:
  """Measures `what` (WHAT) with the parsed flags; `argv` gives `extract` the command
  line's config overrides for its subprocess. Returns the exit status."""
  c = fv.config
  mesh = sharding.make_mesh(c.mesh.to_dict())
  if what == "extract":
    from ml_collections import config_flags  # noqa: PLC0415

    config_file = config_flags.get_config_filename(fv["config"])
    overrides = [a for a in argv[2:] if a.startswith("--config.")]
    print(json.dumps(bench_extract(c, config_file, overrides, fv.images)), flush=True)
    return 0
  if what == "eval":
    print(json.dumps(bench_eval(fv.batch, fv.repeats, mesh, c.eval.preprocess)), flush=True)
    return 0
  if what == "tokenizer":
    print(json.dumps(bench_tokenizer(c, fv.batch, fv.image_size, fv.repeats)), flush=True)
    return 0
  if what == "schedule":
    report = lambda row: print(json.dumps(row), flush=True)
    report(bench_schedule(c, fv.batch, fv.repeats, mesh, report))
    return 0
  if what == "train":
    result = bench_train(c, fv.batch, fv.patch_side, fv.repeats, mesh, fv.real_data)
    print(json.dumps(result), flush=True)
    return 0
  print(json.dumps(bench_sample(c, fv.batch, fv.repeats, mesh)), flush=True)
  if fv.max_batch:
    _max_sample_batch(c, fv.batch * 2, mesh)
  return 0


def _max_sample_batch(c, batch: int, mesh) -> None:
  """Doubles the sampling batch from `batch` until it runs out of memory, printing a row
  for each batch that ran."""
  while True:
    try:
      best = bench_sample(c, batch, 2, mesh)
    except Exception as e:  # noqa: BLE001
      if not _is_oom(e):
        raise
      return
    print(json.dumps({**best, "search": "max_batch"}), flush=True)
    batch *= 2

"""Ahead-of-time checks on real TPU and GPU compilers, from shapes alone (no accelerator).

The TPU tests need libtpu (`make install-aot`; CI installs it and sets NPP_REQUIRE_AOT=1),
the GPU test the CUDA plugin (compile-only: no GPU, driver or CUDA libraries).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import pytest

from npp_jax import config_lib, programs, sampling, sharding
from npp_jax.accelerators import hardware, hlo_ops, topologies
from npp_jax.jobs import train
from npp_jax.models import gpt_flops
from tests.helpers import tiny_config, write_random_dataset

REQUIRED = os.environ.get("NPP_REQUIRE_AOT") == "1"


def _devices(name):
  try:
    return topologies.devices(name)
  except ValueError as e:
    if REQUIRED:
      raise
    pytest.skip(f"no compiler for {name}: {e}")


def tiny(**overrides):
  c = config_lib.get_config("tiny")
  c.model.dtype = "bfloat16"
  c.train.update(epochs=10, global_batch_size=16)
  c.sample.batch_size = 8
  return programs.with_overrides(c, overrides)


def _cost(lowered):
  compiled = lowered.compile()
  return compiled, hlo_ops.program_cost(compiled.as_text())


@pytest.mark.slow
def test_aot_command_tiny_on_v5e():
  """Every program of the tiny config on v5e:2x2 through the command, one JSON line each."""
  _devices("v5e:2x2")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "npp_jax.aot", "--config=configs/tiny.py", "--topology=v5e:2x2"]
  cmd += ["--programs=train,eval,sample,extract", "--config.model.dtype=bfloat16"]
  # A narrow VQ tokenizer on small images keeps the encoder's compile short.
  cmd += [
    "--config.tokenizer.ch=32",
    "--config.extract.image_size=32",
    "--config.extract.batch_size=8",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  names = [(r["program"], r.get("patch_side")) for r in rows]
  assert names == [
    ("train", 4),
    ("train", 2),
    ("train", 1),
    ("eval", None),
    ("sample", None),
    ("extract", None),
    ("schedule", None),
  ]
  for r in rows[:-1]:
    assert r["chips"] == 4 and r["hbm_gib"] == 16.0 and r["fits"] is True, r
    assert r["memory_per_chip_gib"]["total"] > 0 and r["est_step_ms"] > 0
    assert r["compile_sec"] >= 0 and r["estimate"] == "roofline"
  for r in rows[:4]:
    # The compiled matmuls, loop bodies multiplied out, are the model's FLOPs.
    assert r["flops_per_chip"] == pytest.approx(r["model_flops_per_chip"], rel=0.02), r
  sched = rows[-1]
  assert sched["npp_over_ntp_flops"] == pytest.approx(0.58, abs=0.01)
  assert 0 < sched["npp_over_ntp_time"] < 1
  assert "NPP schedule / NTP" in out.stderr and "     train" in out.stderr  # the table


def test_loop_bodies_are_multiplied_out():
  """Our count of the rolled layer scan equals the compiler's own count of the same step
  with the scan unrolled (where the compiler sees every layer), within its elementwise
  extras; the compiler's count of the rolled step sees one layer."""
  devices = _devices("v5e:2x2")
  rolled = programs.TrainPrograms(tiny(), sharding.make_mesh({"data": -1}, devices), None)
  c_unrolled = tiny(**{"model.scan_unroll": 2})
  unrolled = programs.TrainPrograms(c_unrolled, sharding.make_mesh({"data": -1}, devices), None)
  comp_r, cost_r = _cost(rolled.lower_step(1))
  comp_u, cost_u = _cost(unrolled.lower_step(1))
  assert not cost_u.loops and [t for _, t in cost_r.loops] == [2, 2]
  assert cost_r.matmul_flops == cost_u.matmul_flops
  model = gpt_flops.train_step_flops(rolled.cfg, 1, 16) / 4
  assert cost_r.matmul_flops == pytest.approx(model, rel=0.01)
  compiler_unrolled = comp_u.cost_analysis()["flops"]
  # dim 64: elementwise work (which we do not count) is a fifth of the compiler's.
  assert cost_r.matmul_flops <= compiler_unrolled <= 1.3 * cost_r.matmul_flops
  assert comp_r.cost_analysis()["flops"] < 0.8 * cost_r.matmul_flops  # one layer counted
  # Bytes: ours count what each top-level operation reads and writes in HBM; libtpu's
  # count of the loop-free program is about twice that (0.50 measured: it also counts
  # accesses inside fusions). Ours never exceeds it.
  ratio = cost_u.bytes_accessed / comp_u.cost_analysis()["bytes accessed"]
  assert 0.4 <= ratio <= 1.0, ratio


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
def test_gradient_reduction_dtype(grad_dtype):
  """Weight gradients cross chips in float32 by default (as the reference's DDP reduces
  them); `model.grad_dtype=bfloat16` reduces them in bf16."""
  devices = _devices("v5e:2x2")
  p = programs.TrainPrograms(
    tiny(**{"model.grad_dtype": grad_dtype}), sharding.make_mesh({"data": -1}, devices), None
  )
  _, cost = _cost(p.lower_step(1))
  dtypes = set(cost.collective_summary()["all-reduce"]["dtypes"])
  if grad_dtype == "float32":
    assert "bf16" not in dtypes and "f32" in dtypes
  else:
    assert "bf16" in dtypes
  reduced = sum(c.bytes * c.count for c in cost.collectives if c.kind == "all-reduce")
  weights = sum(x.size for x in jax.tree.leaves(p.abstract_state.params))
  per_weight = {"float32": 4, "bfloat16": 2}[grad_dtype]
  # Every weight's gradient is reduced once (plus a few scalars).
  assert reduced >= weights * per_weight * 0.45


def test_guided_decode_loop_exchanges_no_rows():
  """With guidance on a data-parallel mesh each chip holds both halves of its rows:
  the decode loop has no collective at all (before: 17 collective-permutes in it)."""
  devices = _devices("v5e:2x2")
  c = tiny()
  cfg = config_lib.sampling_gpt_config(c)
  mesh = sharding.make_mesh({"data": -1}, devices)
  _, cost = _cost(sampling.lower(cfg, mesh, 8, cfg_scale=2.0))
  assert max(t for _, t in cost.loops) == cfg.seq_len - 1  # the token loop, multiplied out
  assert not [c for c in cost.collectives if c.kind == "collective-permute"]
  assert not [c for c in cost.collectives if c.in_loop]


@pytest.mark.slow
def test_gpt_b_token_stage_on_v5e_memory_matches_an_independent_count():
  """GPT-B's token stage at the recipe batch on v5e:2x2: the arguments are the state
  (params and two Adam moments, float32, replicated) and this chip's quarter of the
  batch; the step does not fit a 16 GiB chip (it needs about 16.5 GiB), and says so."""
  devices = _devices("v5e:2x2")
  c = config_lib.get_config("B")
  p = programs.TrainPrograms(c, sharding.make_mesh(c.mesh.to_dict(), devices), None)
  compiled, cost = _cost(p.lower_step(1))
  mem = programs.memory_per_chip(compiled)
  n = sum(x.size for x in jax.tree.leaves(p.abstract_state.params))
  state = 3 * 4 * n + 8  # params, mu, nu; step and the optimizer's count
  batch = 256 // 4 * (256 + 1) * 4
  assert state + batch <= mem["argument"] <= 1.01 * (state + batch)
  assert mem["output"] < 0.01 * state  # the state is donated: updated in place
  assert mem["total"] > 16 * hardware.GIB * programs.HEADROOM
  assert not programs.fits(compiled, programs.memory_limit(c, devices[0]))
  model = gpt_flops.train_step_flops(p.cfg, 1, 256) / 4
  assert cost.matmul_flops == pytest.approx(model, rel=0.06)
  assert "bf16" not in cost.collective_summary()["all-reduce"]["dtypes"]


def test_3b_samples_on_v5e_4x4():
  """GPT-3B's sampler with guidance on 16 v5e chips, laid out as the sample job lays it
  out: its weights (18.6 GB with their bf16 copy, whole float32 weights alone 12.4 GB)
  split over tensor groups of 4, rows over the 4 groups. It fits a chip's 16 GiB, and the
  decode loop moves activations and logits, never the weights (the recipe's FSDP mesh
  all-gathered 812 GB of weights per batch)."""
  devices = _devices("v5e:4x4")
  c = config_lib.get_config("3B")
  c.update_from_flattened_dict({"mesh.data": 1, "mesh.fsdp": -1})
  cfg = config_lib.sampling_gpt_config(c)
  mesh = sampling.sampling_mesh(c.mesh.to_dict(), cfg, devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 4}
  lowered = sampling.lower(cfg, mesh, c.sample.batch_size, cfg_scale=c.sample.cfg_scale)
  compiled = lowered.compile()
  mem = programs.memory_per_chip(compiled)
  assert mem["total"] <= programs.HEADROOM * 16 * hardware.GIB, mem
  assert mem["argument"] < 3.5 * hardware.GIB  # float32 weights split 4 ways, not whole
  cols = hlo_ops.program_cost(compiled.as_text()).collective_summary()
  assert set(cols) == {"all-reduce", "all-gather"}, cols
  assert cols["all-gather"]["bytes"] < hardware.GIB  # logits of the vocabulary shards
  assert cols["all-reduce"]["count"] >= 2 * cfg.n_layer * (cfg.seq_len - 1)  # per layer


def test_sampling_mesh_splits_weights_only_as_far_as_a_chip_needs():
  """GPT-XL's weights (4.6 GB with their bf16 copy) on 80 GB H100s: data-parallel, not the
  recipe's FSDP (which all-gathers every layer at every token step); GPT-3B's (18.6 GB)
  on 16 GiB v5e chips: the fewest tensor devices that bring them to half a chip (4), data-
  parallel over the rest; CPUs (memory unknown): the config's mesh."""
  xl = config_lib.get_config("XL")
  xl.mesh.update(data=1, fsdp=-1)
  mesh = sampling.sampling_mesh(
    xl.mesh.to_dict(), config_lib.sampling_gpt_config(xl), _devices("h100:8")
  )
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  big = config_lib.get_config("3B")
  big.mesh.update(data=1, fsdp=-1)
  mesh = sampling.sampling_mesh(
    big.mesh.to_dict(), config_lib.sampling_gpt_config(big), _devices("v5e:4x4")
  )
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 4}
  mesh = sampling.sampling_mesh(big.mesh.to_dict(), config_lib.sampling_gpt_config(big))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_gpu_compile_only_h100():
  """8 compile-only H100s: the tiny train step compiles, memory is reported, gradients
  cross GPUs in float32."""
  devices = _devices("h100:8")
  assert devices[0].device_kind.startswith("NVIDIA H100") and len(devices) == 8
  assert hardware.chip(devices[0]).name == "H100"
  p = programs.TrainPrograms(
    tiny(**{"train.global_batch_size": 16}), sharding.make_mesh({"data": -1}, devices), None
  )
  compiled, cost = _cost(p.lower_step(1))
  assert programs.memory_per_chip(compiled)["total"] > 0
  dtypes = set(cost.collective_summary()["all-reduce"]["dtypes"])
  assert "bf16" not in dtypes and "f32" in dtypes
  assert cost.matmul_flops == pytest.approx(gpt_flops.train_step_flops(p.cfg, 1, 16) / 8, rel=0.02)


def test_unknown_topology_is_one_line():
  with pytest.raises(ValueError, match="is not a topology"):
    topologies.devices("v9z")
  with pytest.raises(ValueError, match="use <gpu>:<chips>"):
    topologies.devices("h100:x")


def test_trainer_refuses_a_stage_that_does_not_fit(tmp_path):
  """A stage whose compiled step needs more memory than the device allows is refused in
  one line before the first step, naming an override that fits (found by compiling)."""
  write_random_dataset(tmp_path / "codes")
  c = tiny_config(tmp_path / "codes", **{"train.patch_level": 1})
  devices = jax.devices()
  full = programs.TrainPrograms(c, sharding.make_mesh(c.mesh.to_dict(), devices), None)
  fsdp_c = programs.with_overrides(c, {"mesh.fsdp": -1, "mesh.data": 1})
  fsdp = programs.TrainPrograms(fsdp_c, sharding.make_mesh(fsdp_c.mesh.to_dict(), devices), None)
  need = programs.memory_per_chip(full.lower_step(1).compile())["total"]
  need_fsdp = programs.memory_per_chip(fsdp.lower_step(1).compile())["total"]
  assert need_fsdp < need
  limit = (need + need_fsdp) / 2 / hardware.GIB
  c.train.device_memory_gib = limit
  with pytest.raises(programs.ProgramTooLargeError) as e:
    train.run(c, str(tmp_path / "wd"))
  msg = str(e.value)
  assert "\n" not in msg and "patch side 1" in msg
  assert "--config.mesh.fsdp=-1 --config.mesh.data=1 fits" in msg
  assert not (tmp_path / "wd" / "checkpoints").exists() or not any(
    d.isdigit() for d in os.listdir(tmp_path / "wd" / "checkpoints")
  )


def test_trainer_refuses_a_stage_the_compiler_refuses_for_memory(tmp_path, monkeypatch):
  """On a TPU the compiler itself refuses a stage over HBM: the trainer turns that into the
  same one-line refusal, with the sizes libtpu named and an override that compiles."""
  write_random_dataset(tmp_path / "codes")
  c = tiny_config(tmp_path / "codes", **{"train.patch_level": 1})
  real, calls = programs.compile_program, []

  def refuse_first(lowered, notes=None):
    calls.append(lowered)
    if len(calls) == 1:
      raise programs.CompilerOutOfMemoryError("Ran out of memory", 20 << 30, 15 << 30)
    return real(lowered, notes)

  monkeypatch.setattr(programs, "compile_program", refuse_first)
  with pytest.raises(programs.ProgramTooLargeError) as e:
    train.run(c, str(tmp_path / "wd"))
  msg = str(e.value)
  assert "\n" not in msg and "needs 20.00 GiB per chip but cpu allows 15.00 GiB" in msg
  assert "--config.mesh.fsdp=-1 --config.mesh.data=1 fits" in msg and len(calls) == 2


def test_a_program_libtpu_refuses_for_memory_is_a_row_that_does_not_fit():
  """libtpu fails the compile of a program over the chip's HBM (the tiny model at batch
  65,536 on v5e:2x2 asks 18.8 GiB of temporaries) instead of returning one: that becomes
  CompilerOutOfMemoryError with the sizes it names, and aot writes a row that does not fit
  (and no schedule ratio over the stages it could not estimate) instead of stopping."""
  from npp_jax import aot  # noqa: PLC0415

  devices = _devices("v5e:2x2")
  c = tiny(**{"train.global_batch_size": 65536, "train.patch_level": 1})
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  with pytest.raises(programs.CompilerOutOfMemoryError) as e:
    programs.compile_program(programs.TrainPrograms(c, mesh, None).lower_step(1))
  assert e.value.required > e.value.available > 15 * hardware.GIB, str(e.value)
  assert "\n" not in str(e.value)
  [prog] = aot.train_programs(c, mesh)
  row = aot.analyse(prog, "v5e:2x2", mesh)
  assert row["fits"] is False and row["hbm_gib"] == 16.0
  assert row["compiler_required_gib"] == pytest.approx(e.value.required / hardware.GIB, rel=1e-3)
  assert aot.schedule_estimate([row]) is None
  assert ">18." in aot.table([row]) and "NO" in aot.table([row])


@pytest.mark.parametrize(
  ("message", "required", "available"),
  [
    (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (18.80G) exceeds available HBM (15.75G).",
      18.80,
      15.75,
    ),
    (
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Used 20.50G of 15.48G hbm.",
      20.5,
      15.48,
    ),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.", None, None),
  ],
)
def test_compiler_out_of_memory_wordings(message, required, available):
  class Lowered:
    def compile(self):
      raise jax.errors.JaxRuntimeError(message + "\nmore detail")

  with pytest.raises(programs.CompilerOutOfMemoryError) as e:
    programs.compile_program(Lowered())
  gib = lambda n: None if n is None else round(n / hardware.GIB, 2)
  assert (gib(e.value.required), gib(e.value.available)) == (required, available)
  assert str(e.value) == message


class _Text:
  """A lowered program, equal to another with the same program text (a cache key)."""

  def __init__(self, lowered):
    self.lowered, self.text = lowered, lowered.as_text()

  def __hash__(self):
    return hash(self.text)

  def __eq__(self, other):
    return self.text == other.text

  def compile(self, **kw):
    return self.lowered.compile(**kw)


@pytest.mark.slow
def test_fit_finds_the_largest_batch_and_an_override_that_fits(monkeypatch):
  """`--fit` on 8 compile-only H100s (the search is the same for every backend; GPU
  compiles are the quickest) with a memory limit between the recipe's batch (64) and half
  of it: the largest batch found fits and the next multiple of the data-parallel size does
  not (the search is exact), and the recipe's batch is made to fit by FSDP over the data
  axis, the cheapest override."""
  from npp_jax import aot  # noqa: PLC0415

  devices = _devices("h100:8")
  # Wide enough that the optimizer state, which FSDP divides, outweighs the activations.
  wide = {"model.dim": 512, "model.n_head": 8, "model.vocab_size": 4096}
  c = tiny(**wide, **{"model.preset": config_lib.CUSTOM, "train.patch_level": 1})
  c.train.global_batch_size = 64

  # A program is compiled once, whether the search or this test asks for it first.
  compile_once = functools.cache(programs.compile_program)
  monkeypatch.setattr(programs, "compile_program", lambda lowered: compile_once(_Text(lowered)))

  def need(batch):
    cfg = programs.with_overrides(c, {"train.global_batch_size": batch})
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), devices)
    lowered = programs.TrainPrograms(cfg, mesh, None).lower_step(1)
    return programs.memory_per_chip(programs.compile_program(lowered))["total"]

  limit = (need(64) + need(32)) // 2
  row = aot.fit_stage(c, devices, 1, limit)
  assert row["recipe_batch_fits"] is False
  assert row["overrides"] == "--config.mesh.fsdp=-1 --config.mesh.data=1"
  assert row["memory_per_chip_gib"] * hardware.GIB <= limit
  best = row["max_global_batch"]
  assert 32 <= best < 64 and best % 8 == 0
  assert need(best) <= limit < need(best + 8)


def test_a_compiler_fault_is_a_row_not_the_end_of_the_check():
  """A program the compiler fails is an error row and the check goes on; XLA GPU's Triton
  tiling fault (GPT-3B's attention output projection on compile-only H100s) is retried
  with cuBLAS GEMMs and the row says so."""
  from npp_jax import aot  # noqa: PLC0415

  class Lowered:
    def __init__(self, error):
      self.error, self.options = error, []

    def compile(self, compiler_options=None):
      self.options.append(compiler_options)
      if compiler_options is None or "tile" not in self.error:
        raise jax.errors.JaxRuntimeError(f"INTERNAL: {self.error}\nhlo: ...")
      return jax.jit(lambda x: x).lower(1.0).compile()

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
  broken = Lowered("a fault of the compiler")
  row = aot.analyse(aot.Program("train", lambda: broken, 256, 1e12, {"patch_side": 1}), "cpu", mesh)
  assert row["compile_error"] == "INTERNAL: a fault of the compiler"
  assert row["fits"] is None and row["patch_side"] == 1 and broken.options == [None]
  assert "ERROR" in aot.table([row])
  tiling = Lowered("Couldn't find output tile sizes that satisfy hlo: %dot.98 = ...")
  row = aot.analyse(aot.Program("train", lambda: tiling, 256, 1e12, {"patch_side": 1}), "cpu", mesh)
  assert "compile_error" not in row and tiling.options == [None, programs.CUBLAS_GEMMS]
  assert row["compiler_options"] == ["xla_gpu_enable_triton_gemm=False"]

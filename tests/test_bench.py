"""The benchmark command runs (smoke test; its numbers go to BENCHMARKS.md, not to tests)."""

import json
import subprocess
import sys

import pytest


def _bench(*args):
  res = subprocess.run(
    [sys.executable, "-m", "npp_jax.bench", *args], capture_output=True, text=True, timeout=600
  )
  assert res.returncode == 0, res.stderr
  return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_bench_train_and_sample():
  (row,) = _bench(
    "train",
    "--config=configs/tiny.py",
    "--batch=8",
    "--patch_side=2",
    "--repeats=1",
    "--config.model.dtype=float32",
  )
  assert row["seq_len"] == 16 and row["ms_per_step"] > 0 and row["model_tflops_per_sec"] > 0
  (row,) = _bench("sample", "--config=configs/tiny.py", "--batch=8", "--repeats=1")
  assert row["images_per_sec"] > 0 and row["cfg_scale"] == 1.5


def test_bench_extract_runs_the_extraction_command():
  """`bench extract` runs the extraction command on generated photo-sized JPEGs with a
  narrow random VQ-16 and reports its throughput and the subprocess's peak memory."""
  (row,) = _bench(
    "extract",
    "--config=configs/extract_256.py",
    "--images=6",
    "--config.tokenizer.ch=32",
    "--config.tokenizer.z_channels=64",
    "--config.extract.image_size=64",
    "--config.model.grid=4",
  )
  assert row["images"] == 6 and row["variants_per_image"] == 10 and row["image_size"] == 64
  assert row["images_per_shard"] == 1024 and row["encoder_batch"] % 8 == 0
  assert row["images_per_sec"] > 0 and 0.2 < row["peak_rss_gib"] < 3


def test_bench_rejects_an_unknown_benchmark():
  res = subprocess.run(
    [sys.executable, "-m", "npp_jax.bench", "speed", "--config=configs/tiny.py"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 2 and "must be one of" in res.stderr
  assert "Traceback" not in res.stderr


def test_bench_train_with_real_data_reports_the_input_stall(tmp_path):
  (row,) = _bench(
    "train",
    "--config=configs/mnist.py",
    "--batch=16",
    "--patch_side=4",
    "--repeats=3",
    f"--real_data={tmp_path}",
  )
  assert row["ms_per_step_real_data"] > 0 and "input_stall" in row
  assert "mfu" not in row  # no known peak for a CPU: MFU is left out, not guessed
  assert (tmp_path / "data").is_dir()  # the embedded digits were built there


@pytest.mark.slow
def test_accelerator_script_runs_every_benchmark_on_tiny_shapes(tmp_path):
  """launch/bench_accelerator.sh (the device run of BENCHMARKS.md), checked on the CPU."""
  import os

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
  res = subprocess.run(
    ["bash", "launch/bench_accelerator.sh"],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
  assert "jax" in rows[0] and not any("failed" in r for r in rows)
  # The schedule's own train rows (patch sides 4, 2, 1), GPT-"L"'s, then sampling: B, L,
  # B with bf16 weights, B unrolled (no GPU: no cuDNN or command-buffer rows).
  benches = [r["bench"] for r in rows[1:]]
  assert benches == ["train"] * 3 + ["schedule", "train"] + ["sample"] * 4, benches
  assert [r["patch_side"] for r in rows[1:4]] == [4, 2, 1]
  assert [r["dtype"] for r in rows[-4:]] == ["float32", "float32", "bfloat16", "float32"]
  assert all(r["hlo_ops"]["fusion"] > 0 for r in rows[1:] if r["bench"] == "train")
  (schedule,) = [r for r in rows[1:] if r["bench"] == "schedule"]
  # The FLOP ratio of the tiny schedule from the FLOP counter; wall clock measured.
  assert 0.3 < schedule["flop_ratio"] < 1.0 and schedule["wall_clock_ratio"] > 0

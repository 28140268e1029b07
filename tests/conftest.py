"""Test set-up: 8 fake CPU devices (before jax is imported), float32, golden-file paths."""

import os

# XLA's CPU compiler at optimisation level 1, with its older fusion emitters: compiling
# was half the suite's CPU time, and this halves it (a tiny train step 2.15 -> 1.15 s) at
# about the same run time (a sampling loop 0.78 s against 0.71; level 0 would compile in
# 0.54 s but decode 4x slower). The suite passed with XLA's defaults just before; the test
# of XLA's default fusions compiles with the defaults (test_hlo_ops.py), and libtpu's
# analysis of the tiny config is unchanged. Workers with their own device count add these.
os.environ.setdefault(
  "NPP_TEST_XLA_FLAGS", "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
)
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
  + [os.environ["NPP_TEST_XLA_FLAGS"]]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, every xdist worker and subprocess: the
# many tests that compile the same small programs load them instead. Jobs run through
# `python -m npp_jax.main` keep it too (config.compile_cache="" uses a cache JAX was given);
# tests of the workdir's own cache take the variable out of the job's environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", f"/tmp/npp_jax_test_compile_cache_{os.getuid()}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# One BLAS thread per process (before numpy loads OpenBLAS; subprocesses inherit it): two
# test workers already share the two cores, and OpenBLAS threads that wait for a busy core
# spin: an eval job with two 2048 x 2048 scipy.linalg.sqrtm (FID's, before it used
# eigenvalues) took 75 CPU-s beside a worker's XLA threads, 13 s alone.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import importlib  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  return GOLDEN


@pytest.fixture(scope="session")
def gpt_io():
  with np.load(GOLDEN / "gpt_tiny_io.npz") as z:
    return {k: z[k] for k in z.files}


def _require(module: str, flag: str):
  """Imports an optional module; skips locally when absent, fails when CI sets `flag`=1."""
  try:
    return importlib.import_module(module)
  except ImportError:
    if os.environ.get(flag) == "1":
      raise
    pytest.skip(f"{module} not installed (CI installs it and sets {flag}=1)")


def require_torch():
  """PyTorch (the `torch` extra), demanded in CI by NPP_REQUIRE_TORCH=1."""
  return _require("torch", "NPP_REQUIRE_TORCH")


def require_tfds():
  """tensorflow_datasets (the `data` extra), demanded in CI by NPP_REQUIRE_TF=1."""
  return _require("tensorflow_datasets", "NPP_REQUIRE_TF")


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first: xdist hands tests out in this order, so each long run
  starts early beside the others and the short tests fill the gaps at the end, rather than
  one long run going on alone after the rest have finished."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order

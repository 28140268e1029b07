"""Test set-up: 8 fake CPU devices (before jax is imported), float32, golden-file paths."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def require_torch():
  """Imports torch; skips locally when absent, fails when CI demands it (NPP_REQUIRE_TORCH=1)."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    if os.environ.get("NPP_REQUIRE_TORCH") == "1":
      raise
    pytest.skip("torch not installed (CI installs it and sets NPP_REQUIRE_TORCH=1)")
  return torch


def require_tfds():
  """Imports tensorflow_datasets (the `data` extra); skips locally when absent, fails when
  CI demands it (NPP_REQUIRE_TF=1)."""
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415
  except ImportError:
    if os.environ.get("NPP_REQUIRE_TF") == "1":
      raise
    pytest.skip("tensorflow-datasets not installed (CI installs the `data` extra)")
  return tfds

"""notebooks/quickstart.ipynb runs end to end on a local kernel, with small parameters.

The parameters cell (tagged `parameters`) is replaced, as papermill would, so that the
digits train for 3 epochs with a small model, and the "released weights" are the test
suite's: the reference GPT-tiny `.pt`, the tiny VQ tokenizer and Inception weights with
the real architectures (random values). Every cell must run without an error; the loss
curve, the digit grid and the ImageNet-class grid must be drawn, and FID computed.
"""

import json
import os

import nbclient
import nbformat
import numpy as np
import pytest

from .conftest import require_torch
from .manifest_weights import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _small_parameters(tmp_path) -> str:
  golden = os.path.join(ROOT, "tests", "golden")
  np.savez(tmp_path / "vq.npz", **generate(os.path.join(golden, "vq_tiny_manifest.json")))
  inception = generate(os.path.join(golden, "inception_fid_random_manifest.json"))
  np.savez(tmp_path / "inception.npz", **inception)
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
  # The golden GPT-tiny with the golden tokenizer (VQ-16 at width 32, 64 codes).
  (tmp_path / "released.py").write_text(RELEASED_CONFIG)
  workdir = tmp_path / "run"
  return f"""
EPOCHS = 3
MODEL_DIM = 32
N_LAYER = 1
BATCH = 64
CLASSES = (0, 1, 2)
PER_CLASS = 4
NUM_SAMPLES = 48
SAMPLE_BATCH = 16
CFG_SCALE = 2.0
WORKDIR = {str(workdir)!r}
INSTALL = False
REPO = ""
GPT_CHECKPOINT = {os.path.join(golden, "gpt_tiny.pt")!r}
GPT_CONFIG = {str(tmp_path / "released.py")!r}
VQ_CHECKPOINT = {str(tmp_path / "vq.npz")!r}
IMAGENET_CLASSES = (1, 2)
IMAGENET_SAMPLES = 16
FID_REFERENCE = {str(tmp_path / "ref.npz")!r}
INCEPTION_CHECKPOINT = {str(tmp_path / "inception.npz")!r}
"""


RELEASED_CONFIG = """
from npp_jax import config_lib


def get_config():
  c = config_lib.get_config("tiny")
  c.model.dtype = "float32"
  c.tokenizer.update(name="vq", preset="VQ-16", ch=32, z_channels=64)
  c.sample.batch_size = 16
  c.eval.batch_size = 16  # Inception on 16 images at a time, not the default 256
  return c
"""


def _outputs(cell, kind):
  return [o for o in cell.get("outputs", []) if kind in o.get("data", {})]


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []))


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Committed without outputs, so the repository carries no stale results.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  names = {line.split("=")[0].strip() for line in params[0].source.splitlines() if "=" in line}
  require_torch()  # the .pt checkpoint
  small = _small_parameters(tmp_path)
  assert names == {line.split("=")[0].strip() for line in small.splitlines() if "=" in line}
  params[0].source = small

  # Run where a user's notebook would: a folder of its own (the converted weights and runs
  # land there), with the configs of the checkout (npp_jax itself is installed).
  home = tmp_path / "home"
  home.mkdir()
  os.symlink(os.path.join(ROOT, "configs"), home / "configs")
  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(home)}}
  )
  client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  setup, train, curve, sample, release, fid = code[1:]
  assert "runtime: cpu" in _text(setup)
  assert "finished at step" in _text(train)
  assert _outputs(curve, "image/png"), "the loss curve was not drawn"
  assert _outputs(sample, "image/png"), "the sample grid was not shown"
  assert "read as the requested class" in _text(sample)
  assert _outputs(release, "image/png"), "the released model's class grid was not shown"
  fid_scores = json.loads((home / "runs" / "released" / "eval.json").read_text())
  assert fid_scores["num_samples"] == 16 and fid_scores["fid"] > 0
  assert '"fid"' in _text(fid)
  assert (home / "converted" / "gpt" / "model_config.json").exists()
  scores = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert 0.0 <= scores["class_accuracy"] <= 1.0
  assert (tmp_path / "run" / "samples.png").exists()

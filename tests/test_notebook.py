"""notebooks/quickstart.ipynb runs end to end on a local kernel, with small parameters.

The parameters cell (tagged `parameters`) is replaced, as papermill would, so that the
digits train for 3 epochs with a small model; every cell must run without an error, the
loss curve and the sample grid must be drawn, and the released-weights sections must skip.
"""

import json
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _small_parameters(workdir) -> str:
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
GPT_CHECKPOINT = "/nonexistent/c2i_B_256.pt"
GPT_CONFIG = "configs/b.py"
VQ_CHECKPOINT = "/nonexistent/vq_ds16_c2i.pt"
IMAGENET_CLASSES = (207,)
IMAGENET_SAMPLES = 0
FID_REFERENCE = "/nonexistent/ref.npz"
INCEPTION_CHECKPOINT = "/nonexistent/inception.pth"
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
  small = _small_parameters(tmp_path / "run")
  assert names == {line.split("=")[0].strip() for line in small.splitlines() if "=" in line}
  params[0].source = small

  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  setup, train, curve, sample, release, fid = code[1:]
  assert "runtime: cpu" in _text(setup)
  assert "finished at step" in _text(train)
  assert _outputs(curve, "image/png"), "the loss curve was not drawn"
  assert _outputs(sample, "image/png"), "the sample grid was not shown"
  assert "read as the requested class" in _text(sample)
  assert "skipped:" in _text(release) and "skipped:" in _text(fid)
  scores = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert 0.0 <= scores["class_accuracy"] <= 1.0
  assert (tmp_path / "run" / "samples.png").exists()

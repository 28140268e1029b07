"""The README's ImageNet path, run command by command as printed, on real photographs.

The block after `<!-- imagenet-path` in README.md is split into its commands; each runs as
printed, in a fresh folder with `configs/` beside it, with two kinds of change only:
- the outside files' names replaced by the test's stand-ins (a VQ checkpoint in the
  released layout with the real architecture at width 32 and random values, an ImageFolder
  of real photographs, a reference batch of the same photographs, Inception weights of the
  real architecture with random values);
- size flags appended (`SIZES`): 64-pixel images, a 2-layer GPT of width 32, 8 samples.
The sample and eval commands get nothing but sizes: the model and the tokenizer must come
from the run.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from .conftest import require_torch
from .manifest_weights import generate

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"

# The photographs: (class folder, package, file). Classes sort to labels 0, 1, 2.
PHOTOS = (
  ("motorcycle", "skimage", "motorcycle_left.png"),
  ("motorcycle", "skimage", "motorcycle_right.png"),
  ("space", "skimage", "rocket.jpg"),
  ("space", "skimage", "astronaut.png"),
  ("space", "skimage", "hubble_deep_field.jpg"),
  ("space", "skimage", "moon.png"),  # greyscale
  ("still_life", "skimage", "coffee.png"),
  ("still_life", "skimage", "chelsea.png"),
  ("still_life", "sklearn", "china.jpg"),
  ("still_life", "sklearn", "flower.jpg"),
)
TINY_VQ = ["--config.tokenizer.ch=32", "--config.tokenizer.z_channels=64"]
TINY_GPT = [
  "--config.model.preset=custom",
  "--config.model.dim=32",
  "--config.model.n_layer=2",
  "--config.model.n_head=2",
  "--config.model.multiple_of=32",
  "--config.model.dtype=float32",
]
# Size flags appended per step; nothing else changes.
SIZES = {
  "convert": [*TINY_VQ, "--config.model.vocab_size=64"],
  "extract": [*TINY_VQ, "--config.model.vocab_size=64", "--config.extract.image_size=64"],
  "train": [
    *TINY_GPT,
    "--config.model.vocab_size=64",
    "--config.model.grid=4",
    "--config.model.num_classes=3",
    "--config.train.global_batch_size=8",
    "--config.train.epochs=4",
    "--config.train.log_every_steps=1",
  ],
  "sample": ["--config.sample.num_images=8", "--config.sample.batch_size=8"],
  "eval": [],
}


def readme_commands() -> list[list[str]]:
  """The commands of the README's ImageNet-path block, continuation lines joined."""
  text = (ROOT / "README.md").read_text()
  block = re.search(r"<!-- imagenet-path.*?-->\n```bash\n(.*?)```", text, re.S)
  assert block, "README.md has no imagenet-path block"
  joined = re.sub(r"\\\n\s*", "", block.group(1))
  return [shlex.split(line) for line in joined.splitlines() if line.startswith("python")]


def _photo(package: str, name: str) -> pathlib.Path:
  if package == "skimage":
    skimage = pytest.importorskip("skimage", reason="the test extra ships scikit-image")
    return pathlib.Path(skimage.__file__).parent / "data" / name
  sklearn = pytest.importorskip("sklearn", reason="mlxtend (the demo extra) needs scikit-learn")
  return pathlib.Path(sklearn.__file__).parent / "datasets" / "images" / name


def _stand_ins(tmp: pathlib.Path) -> dict[str, str]:
  """The outside files' names -> the test's files."""
  torch = require_torch()
  from PIL import Image  # noqa: PLC0415

  folder = tmp / "imagenet" / "train"
  for cls, package, name in PHOTOS:
    (folder / cls).mkdir(parents=True, exist_ok=True)
    shutil.copy(_photo(package, name), folder / cls / name)
  data = _photo("sklearn", "china.jpg").read_bytes()
  (folder / "still_life" / "truncated.jpg").write_bytes(data[: len(data) // 3])
  vq = {k: torch.from_numpy(v) for k, v in generate(GOLDEN / "vq_tiny_manifest.json").items()}
  torch.save({"model": vq}, tmp / "vq_released.pt")  # LlamaGen's layout
  inception = generate(GOLDEN / "inception_fid_random_manifest.json")
  torch.save({k: torch.from_numpy(v) for k, v in inception.items()}, tmp / "inception.pth")
  ref = [np.asarray(Image.open(_photo(p, n)).convert("RGB").resize((64, 64))) for _, p, n in PHOTOS]
  np.savez(tmp / "reference.npz", arr_0=np.stack(ref))
  return {
    "vq_ds16_c2i.pt": str(tmp / "vq_released.pt"),
    "/data/imagenet/train": str(folder),
    "VIRTUAL_imagenet256_labeled.npz": str(tmp / "reference.npz"),
    "pt_inception-2015-12-05-6726825d.pth": str(tmp / "inception.pth"),
  }


def _substitute(arg: str, names: dict[str, str]) -> str:
  """An outside file's name (alone or as a flag's value) -> the test's stand-in."""
  key, eq, value = arg.rpartition("=")
  return f"{key}={names[value]}" if eq and value in names else names.get(arg, arg)


def _step(argv: list[str]) -> str:
  if argv[2] == "npp_jax.convert":
    return "convert"
  modes = [a.split("=", 1)[1] for a in argv if a.startswith("--config.mode=")]
  if modes:
    return modes[0]
  return "extract" if any("extract" in a for a in argv if a.startswith("--config=")) else "train"


@pytest.mark.slow
def test_readme_imagenet_path_runs_as_printed_on_real_photos(tmp_path):
  commands = readme_commands()
  assert [_step(c) for c in commands] == ["convert", "extract", "train", "sample", "eval"]
  names = _stand_ins(tmp_path)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  os.symlink(ROOT / "configs", cwd / "configs")
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  outputs = {}
  for argv in commands:
    step = _step(argv)
    cmd = [sys.executable, *(_substitute(a, names) for a in argv[1:]), *SIZES[step]]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (step, res.stderr[-3000:])
    outputs[step] = res.stderr

  # 1. The converted tokenizer.
  assert json.loads((cwd / "converted" / "vq16" / "vq_config.json").read_text())["ch"] == 32
  # 2. Codes of the nine readable photos (ten crops each), the truncated one reported.
  codes = cwd / "runs" / "extract_256" / "codes"
  info = json.loads((codes / "dataset.json").read_text())
  assert info["num_records"] == 10 and info["n_aug"] == 10 and info["grid"] == 4
  assert info["class_names"] == ["motorcycle", "space", "still_life"]
  report = json.loads((codes / "extract_report.json").read_text())
  assert report["skipped"] == 1 and "truncated.jpg" in json.dumps(report["skipped_images"])
  # 3. Training through the three stages, its log kept in the workdir.
  run = cwd / "runs" / "b"
  assert "finished at step 4" in outputs["train"], outputs["train"][-2000:]
  assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())[-1] == 4
  logs = sorted(p.name.split("-")[0] for p in (run / "logs").iterdir())
  assert logs == ["eval", "sample", "train"], logs
  # 4. Sampled from the run alone: the model and the VQ came from what the run stored.
  assert "taking from the run in" in outputs["sample"], outputs["sample"][-2000:]
  assert "tokenizer.checkpoint=" in outputs["sample"]
  (folder,) = (run / "samples").iterdir()
  with np.load(folder / "samples_8.npz") as z:
    assert z["arr_0"].shape == (8, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    assert set(z["labels"].tolist()) <= {0, 1, 2}
  from PIL import Image  # noqa: PLC0415

  width, height = Image.open(folder / "samples.png").size
  assert height == 3 * 66 + 2 and width > 8 * 66 + 2  # three labelled class rows
  # 5. Every metric, with the warning that 8 samples make no meaningful FID.
  result = json.loads((run / "eval.json").read_text())
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert np.isfinite(result[key]), (key, result)
  assert "8 samples: FID and sFID from fewer than 2048 images" in outputs["eval"]

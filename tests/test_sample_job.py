"""`mode=sample`: PNG grid, ADM-format npz, resume without redoing batches, weight sources."""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from npp_jax import run_config
from npp_jax.infra import torch_io
from npp_jax.jobs import sample, train
from npp_jax.models import gpt_torch, params_io
from npp_jax.models.gpt import GPTConfig

from .helpers import convert_tiny_vq, shared_once, tiny_config, write_random_dataset


def _sample_config(data_dir, **overrides):
  c = tiny_config(data_dir, **{"train.max_steps": 3, **overrides})
  c.tokenizer.update(name="grey", levels=64)  # renders the 64 token ids as grey levels
  c.sample.update(
    num_images=40, batch_size=16, png_per_class=2, png_classes=(1, 2, 3), cfg_scale=1.5
  )
  return c


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """(data, workdir) of one run of `_sample_config` trained for 3 steps, made once for the
  test session; a test copies the workdir (`_own_copy`) before it samples into it."""

  def build(root):
    write_random_dataset(root / "data")
    train.run(_sample_config(root / "data"), str(root / "wd"))

  root = shared_once(tmp_path_factory, "trained-tiny-run", build)
  return root / "data", root / "wd"


def _own_copy(trained_run, tmp_path):
  data, wd = trained_run
  shutil.copytree(wd, tmp_path / "wd")
  return data, tmp_path / "wd"


def test_sample_job_writes_png_and_npz_and_resumes(tmp_path, trained_run):
  data, wd = _own_copy(trained_run, tmp_path)
  c = _sample_config(data)
  out = sample.run(c, str(wd))
  png = np.asarray(Image.open(out["png"]).convert("L"))
  # 2 columns x 3 class rows of 8x8 + borders, after a strip with each row's label.
  margin = png.shape[1] - (2 * 10 + 2)
  assert png.shape[0] == 3 * 10 + 2 and margin > 0
  assert png[:, :margin].min() < 128  # the labels are written
  with np.load(out["npz"]) as z:
    arr, labels, tokens = z["arr_0"], z["labels"], z["tokens"]
  assert arr.shape == (40, 8, 8, 3) and arr.dtype == np.uint8
  assert labels.shape == (40,) and set(labels.tolist()) <= set(range(10))
  assert tokens.shape == (40, 64)
  parts_dir = pathlib.Path(out["dir"]) / "parts"
  assert out["dir"].startswith(str(wd / "samples" / "step3-raw-cfg1.5-topk0-topp1.0-temp1.0-seed0"))
  # One part file per batch and host (here one host: "000of001").
  parts = [f"part-0000{b}-000of001.npz" for b in range(3)]
  assert sorted(os.listdir(parts_dir)) == parts
  assert os.path.exists(wd / "samples.png")

  # A crash that lost the last batch and the final file: only that batch is redone.
  os.remove(parts_dir / parts[2])
  os.remove(out["npz"])
  stamp = os.path.getmtime(parts_dir / parts[0])
  out2 = sample.run(c, str(wd))
  assert os.path.getmtime(parts_dir / parts[0]) == stamp
  with np.load(out2["npz"]) as z:
    np.testing.assert_array_equal(z["arr_0"], arr)
    np.testing.assert_array_equal(z["labels"], labels)

  # A part left by an interrupted run with 4 hosts (an incomplete set) is not mixed in.
  np.savez(
    parts_dir / "part-00000-003of004.npz",
    rows=np.arange(4),
    tokens=np.zeros((4, 64), np.int32),
    images=np.zeros((4, 8, 8, 3), np.uint8),
    labels=labels[:4],
  )
  os.remove(out["npz"])
  out3 = sample.run(c, str(wd))
  with np.load(out3["npz"]) as z:
    np.testing.assert_array_equal(z["arr_0"], arr)


def test_a_run_is_sampled_without_its_model_flags(tmp_path, caplog, monkeypatch):
  """mode=sample on a training workdir takes the model and data from the run's checkpoint
  (the data path recorded absolute, so sampling from another directory finds it); a flag
  that contradicts the run is refused, one that only changes how it runs is taken."""
  data = tmp_path / "data"
  write_random_dataset(data)
  wd = tmp_path / "wd"
  monkeypatch.chdir(tmp_path)
  trained = _sample_config("data", **{"model.n_layer": 3, "model.n_head": 4})  # relative
  train.run(trained, str(wd))
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")

  def fresh():
    c = _sample_config("")  # no data path and the default 2-layer model: none of the run's
    c.mode = "sample"
    return c

  c = fresh()
  caplog.set_level("INFO")
  changed = run_config.adopt(c, str(wd), {"mode": "sample"})
  assert sorted(changed) == ["data.path=" + repr(str(data)), "model.n_head=4", "model.n_layer=3"]
  assert (c.model.n_layer, c.model.n_head, c.data.path) == (3, 4, str(data))
  out = sample.run(c, str(wd))
  assert os.path.exists(out["npz"])
  assert "could not be restored" not in caplog.text  # orbax's warning about the data item

  with pytest.raises(ValueError, match=r"--config.model.n_layer=2 contradicts the run in .*"):
    run_config.adopt(fresh(), str(wd), {"model.n_layer": 2})
  c = fresh()
  c.model.attention = "cudnn"
  run_config.adopt(c, str(wd), {"model.attention": "cudnn"})
  assert c.model.attention == "cudnn" and c.model.n_layer == 3
  c = fresh()
  c.sample.checkpoint = "elsewhere"  # other weights: the config's model is meant
  assert run_config.adopt(c, str(wd), {}) == [] and c.model.n_layer == 2


def test_the_tokenizer_comes_from_the_extraction(tmp_path):
  """A run trained on extracted codes names no VQ checkpoint; the extraction recorded it."""
  codes = tmp_path / "codes"
  codes.mkdir()
  tok = {"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 64, "codebook_embed_dim": 8}
  tok |= {"checkpoint": "/models/vq16", "precision": "float32"}
  (codes / "extract_settings.json").write_text(json.dumps({"tokenizer": tok}))
  run = {"tokenizer.name": "vq", "tokenizer.checkpoint": "", "data.path": f"{codes},other"}
  got = run_config._extraction_tokenizer(run)
  assert got == {
    "tokenizer.preset": "VQ-16",
    "tokenizer.ch": 32,
    "tokenizer.z_channels": 64,
    "tokenizer.codebook_embed_dim": 8,
    "tokenizer.precision": "float32",
    "tokenizer.checkpoint": "/models/vq16",
  }
  assert run_config._extraction_tokenizer({**run, "data.path": str(tmp_path / "none")}) == {}


def test_grid_rows_carry_class_names(tmp_path):
  from npp_jax.data.records import DatasetInfo  # noqa: PLC0415

  c = _sample_config(tmp_path)
  info = DatasetInfo(num_records=0, grid=8, vocab_size=64, num_classes=3, n_aug=1, tokenizer="vq")
  dataclasses.replace(info, class_names=("cat", "dog", "owl")).save(str(tmp_path))
  assert sample.class_names(c, 3) == ["0 cat", "1 dog", "2 owl"]
  assert sample.class_names(c, 4) == ["0", "1", "2", "3"]  # another dataset: numbers only


def _digest(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_samples_are_bound_to_their_settings(tmp_path, trained_run):
  data, wd = _own_copy(trained_run, tmp_path)
  c = _sample_config(data)
  first = sample.run(c, str(wd))
  kept = _digest(first["npz"])
  with np.load(first["npz"]) as z:
    labels = z["labels"]
  seen = {first["dir"]}
  for key, value in (
    ("cfg_scale", 3.0),
    ("temperature", 0.7),
    ("top_k", 5),
    ("top_p", 0.9),
    ("batch_size", 8),
    ("seed", 1),
    ("precision", "bfloat16"),
    ("scan_unroll", 2),
  ):
    other = _sample_config(data)
    other.sample[key] = value
    out = sample.run(other, str(wd))
    assert out["dir"] not in seen, key  # sampled afresh into a folder of its own
    seen.add(out["dir"])
    stored = json.loads((pathlib.Path(out["dir"]) / "settings.json").read_text())
    assert value in (stored["sampler"].get(key), stored.get(key), stored["model"].get(key)) or (
      key == "precision"
    )
    with np.load(out["npz"]) as z:
      assert len(z["arr_0"]) == 40
      if key == "seed":
        assert not np.array_equal(z["labels"], labels), "sample.seed draws the labels"
    assert _digest(first["npz"]) == kept, f"{key} overwrote the first samples"
  # The same settings again: nothing is redone or rewritten.
  again = sample.run(c, str(wd))
  assert again["npz"] == first["npz"] and _digest(first["npz"]) == kept
  # A folder whose settings.json says otherwise is refused.
  settings = pathlib.Path(first["dir"]) / "settings.json"
  settings.write_text(settings.read_text().replace('"seed": 0', '"seed": 9'))
  with pytest.raises(ValueError, match="holds samples of other settings"):
    sample.run(c, str(wd))


def test_bad_sample_settings_fail_before_sampling(tmp_path, trained_run):
  data, wd = _own_copy(trained_run, tmp_path)
  for key, value, message in (
    ("num_images", -5, "num_images=-5 must be >= 0"),
    ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("png_per_class", 0, "png_per_class=0 must be >= 1"),
    ("batch_size", 12, "batch_size=12 must be a multiple of the 8"),
    ("scan_unroll", 0, "config.sample.scan_unroll=0 must be an int >= 1"),
  ):
    c = _sample_config(data)
    c.sample[key] = value
    with pytest.raises(ValueError, match=message):
      sample.run(c, str(wd))


def test_sampling_checkpoints_damaged_or_of_another_model(tmp_path, caplog):
  data = tmp_path / "data"
  write_random_dataset(data)
  wd = tmp_path / "wd"
  c = _sample_config(data, **{"train.max_steps": 8, "train.ckpt_every_steps": 4})
  train.run(c, str(wd))
  c.sample.num_images = 0
  # A model of another shape: one line, no Flax shape error.
  other = _sample_config(data)
  other.model.dim = 64
  other.sample.num_images = 0
  with pytest.raises(ValueError, match="holds a model of another shape than config.model"):
    sample.run(other, str(wd))
  # The newest checkpoint damaged: the previous one is used (and nothing is moved).
  for root, _, names in os.walk(wd / "checkpoints" / "8" / "state"):
    for n in names:
      if not n.startswith("_"):
        pathlib.Path(root, n).write_bytes(b"garbage")
  with caplog.at_level("WARNING"):
    out = sample.run(c, str(wd))
  assert "checkpoint 8" in caplog.text and "damaged" in caplog.text
  assert os.path.basename(out["dir"]).startswith("step6-raw")  # checkpoints 4, 6 (stage end), 8
  assert os.path.isdir(wd / "checkpoints" / "8")


def test_sample_from_converted_dir_and_pt(tmp_path, golden_dir):
  data = tmp_path / "data"
  write_random_dataset(data)
  cfg = GPTConfig.preset("tiny", dtype="float32")
  c = _sample_config(data)
  c.model.update(dim=64, n_head=4, multiple_of=256)
  c.sample.num_images = 0
  sd = torch_io.load_torch_checkpoint(str(golden_dir / "gpt_tiny_weights.npz"))
  params_io.save_params(str(tmp_path / "conv"), gpt_torch.params_from_torch(sd, cfg), cfg)
  c.sample.checkpoint = str(tmp_path / "conv")
  a = sample.run(c, str(tmp_path / "a"))
  assert os.path.exists(a["png"]) and "npz" not in a
  c.sample.checkpoint = ""
  c.train.init_from = str(golden_dir / "gpt_tiny_weights.npz")  # used when nothing is trained
  b = sample.run(c, str(tmp_path / "b"))
  np.testing.assert_array_equal(np.asarray(Image.open(a["png"])), np.asarray(Image.open(b["png"])))


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  data = tmp_path / "data"
  write_random_dataset(data)
  with pytest.raises(FileNotFoundError, match="no training checkpoint"):
    sample.run(_sample_config(data), str(tmp_path / "empty"))
  c = _sample_config(data)
  c.tokenizer.name = "vq"
  with pytest.raises(ValueError, match="tokenizer.checkpoint is empty"):
    sample.run(c, str(tmp_path / "empty"))


def test_sample_decodes_with_the_vq_tokenizer(tmp_path, golden_dir):
  """A GPT over a 4x4 grid of a 64-code VQ tokenizer: samples come out as 64x64 RGB images."""

  vq_dir = convert_tiny_vq(tmp_path, golden_dir)
  data = tmp_path / "data"
  write_random_dataset(data, grid=4)
  c = _sample_config(data)
  c.model.grid = 4
  c.train.patch_level = 2
  c.tokenizer.update(name="vq", checkpoint=str(vq_dir))
  c.sample.num_images = 8
  train.run(c, str(tmp_path / "wd"))
  out = sample.run(c, str(tmp_path / "wd"))
  width, height = Image.open(out["png"]).size
  assert height == 3 * 66 + 2 and width > 2 * 66 + 2  # a label strip on the left
  with np.load(out["npz"]) as z:
    assert z["arr_0"].shape == (8, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    assert z["arr_0"].std() > 0

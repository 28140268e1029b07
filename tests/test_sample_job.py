"""`mode=sample`: PNG grid, ADM-format npz, resume without redoing batches, weight sources."""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from npp_jax import params_io, torch_io
from npp_jax.jobs import sample, train
from npp_jax.models import gpt_torch
from npp_jax.models.gpt import GPTConfig

from .helpers import convert_tiny_vq, tiny_config, write_random_dataset


def _sample_config(data_dir, **overrides):
  c = tiny_config(data_dir, **{"train.max_steps": 3, **overrides})
  c.tokenizer.update(name="grey", levels=64)  # renders the 64 token ids as grey levels
  c.sample.update(
    num_images=40, batch_size=16, png_per_class=2, png_classes=(1, 2, 3), cfg_scale=1.5
  )
  return c


def test_sample_job_writes_png_and_npz_and_resumes(tmp_path):
  data = tmp_path / "data"
  write_random_dataset(data)
  wd = tmp_path / "wd"
  c = _sample_config(data)
  train.run(c, str(wd))
  out = sample.run(c, str(wd))
  png = Image.open(out["png"])
  assert png.size == (2 * 10 + 2, 3 * 10 + 2)  # 2 columns x 3 class rows of 8x8 + borders
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


def _digest(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_samples_are_bound_to_their_settings(tmp_path):
  data = tmp_path / "data"
  write_random_dataset(data)
  wd = tmp_path / "wd"
  c = _sample_config(data)
  train.run(c, str(wd))
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


def test_bad_sample_settings_fail_before_sampling(tmp_path):
  data = tmp_path / "data"
  write_random_dataset(data)
  wd = tmp_path / "wd"
  train.run(_sample_config(data), str(wd))
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
  assert Image.open(out["png"]).size == (2 * 66 + 2, 3 * 66 + 2)
  with np.load(out["npz"]) as z:
    assert z["arr_0"].shape == (8, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    assert z["arr_0"].std() > 0

"""PyTorch checkpoint conversion: formats, wrappers, exact round trips, the CLI, clear errors."""

import argparse
import builtins
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax.infra import torch_io
from npp_jax.models import gpt_torch, params_io
from npp_jax.models.gpt import GPT, GPTConfig

from .conftest import require_torch

TINY = GPTConfig.preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def sd(golden_dir):
  return torch_io.load_torch_checkpoint(str(golden_dir / "gpt_tiny_weights.npz"))


def test_round_trip_is_exact(sd):
  back = gpt_torch.params_to_torch(gpt_torch.params_from_torch(sd, TINY), TINY)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_round_trip_gqa():
  cfg = GPTConfig.preset("tiny", dtype="float32", n_kv_head=2)
  shapes = gpt_torch.torch_shapes(cfg)
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  assert shapes["layers.0.attention.wqkv.weight"] == ((4 + 2 * 2) * 16, 64)
  back = gpt_torch.params_to_torch(gpt_torch.params_from_torch(sd, cfg), cfg)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_torch_round_trip_through_pt_file(tmp_path, sd):
  torch = require_torch()
  params = gpt_torch.params_from_torch(sd, TINY)
  out = {k: torch.from_numpy(v) for k, v in gpt_torch.params_to_torch(params, TINY).items()}
  out["freqs_cis"] = torch.zeros(65, 8, 2)  # buffers of the reference are ignored
  path = tmp_path / "ckpt.pt"
  torch.save({"model": out, "steps": 3}, path)
  again = torch_io.load_torch_checkpoint(str(path))
  assert set(again) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(again[k], sd[k])


class _RunsCode:
  """A pickle that creates a file when it is loaded."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_pt_that_runs_code_is_refused(tmp_path, sd):
  torch = require_torch()
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pt"
  weights = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save({"model": weights, "extra": _RunsCode(marker)}, path)
  with pytest.raises(torch_io.UnsafeCheckpointError, match=r"system.*--trust_checkpoint"):
    torch_io.load_torch_checkpoint(str(path))
  assert not marker.exists(), "loading ran code from the file"
  # The CLI says so in one line; nothing is written.
  cmd = [sys.executable, "-m", "npp_jax.convert", "gpt", f"--checkpoint={path}"]
  cmd += ["--config=configs/tiny.py", f"--out={tmp_path / 'out'}"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and "--trust_checkpoint" in res.stderr
  assert not marker.exists() and not (tmp_path / "out").exists()
  # Released checkpoints pickle their argparse arguments: those load without trust.
  torch.save({"model": weights, "args": argparse.Namespace(gpt_model="GPT-B")}, path)
  assert set(torch_io.load_torch_checkpoint(str(path))) == set(sd)
  # Trust is explicit.
  torch.save({"model": weights, "extra": _RunsCode(marker)}, path)
  torch_io.load_torch_checkpoint(str(path), trust=True)
  assert marker.exists()


def test_pt_bf16_tensors_load_as_float32(tmp_path, sd):
  torch = require_torch()
  path = tmp_path / "bf16.pt"
  torch.save({"module": {k: torch.from_numpy(v).bfloat16() for k, v in sd.items()}}, path)
  got = torch_io.load_torch_checkpoint(str(path))
  assert got["norm.weight"].dtype == np.float32
  np.testing.assert_allclose(got["output.weight"], sd["output.weight"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "bare", "ddp", "compiled"])
def test_checkpoint_wrappers_are_unwrapped(sd, wrap):
  if wrap == "ddp":
    obj = {"model": {"module." + k: v for k, v in sd.items()}}
  elif wrap == "compiled":
    obj = {"_orig_mod." + k: v for k, v in sd.items()}
  elif wrap == "bare":
    obj = dict(sd)
  else:
    obj = {wrap: dict(sd), "steps": 10}
  got = torch_io.unwrap_state_dict(obj)
  assert set(got) == set(sd)


def test_safetensors_and_npz(tmp_path, sd):
  from safetensors.numpy import save_file

  save_file(sd, str(tmp_path / "w.safetensors"))
  got = torch_io.load_torch_checkpoint(str(tmp_path / "w.safetensors"))
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])


def test_wrong_size_checkpoint_names_the_fit(sd):
  with pytest.raises(ValueError) as err:
    gpt_torch.params_from_torch(sd, GPTConfig.preset("B"))
  msg = str(err.value)
  assert "checkpoint does not fit the model (preset 'B'" in msg
  assert "missing: layers.10." in msg or "missing: layers.2" in msg
  assert (
    "wrong shape: cls_embedding.embedding_table.weight: checkpoint (11, 64), model (1001, 768)"
    in msg
  )
  assert "the checkpoint looks like: preset 'tiny': dim=64, n_layer=2, n_head=4" in msg
  assert "vocab_size=64, num_classes=10" in msg


def test_missing_and_unexpected_keys_are_listed(sd):
  broken = dict(sd)
  del broken["norm.weight"]
  broken["extra.weight"] = np.zeros(3)
  with pytest.raises(ValueError, match=r"missing: norm.weight[\s\S]*unexpected: extra.weight"):
    gpt_torch.params_from_torch(broken, TINY)


def test_missing_corrupt_and_unknown_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
    torch_io.load_torch_checkpoint(str(tmp_path / "nope.pt"))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"this is not a zip file")
  with pytest.raises(ValueError, match="corrupt or truncated"):
    torch_io.load_torch_checkpoint(str(bad))
  with pytest.raises(ValueError, match="unknown checkpoint format '.h5'"):
    (tmp_path / "x.h5").write_bytes(b"")
    torch_io.load_torch_checkpoint(str(tmp_path / "x.h5"))


def test_truncated_pt_file(tmp_path, golden_dir):
  require_torch()
  data = (golden_dir / "gpt_tiny.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="cut.pt.*corrupt or truncated"):
    torch_io.load_torch_checkpoint(str(tmp_path / "cut.pt"))


def test_a_damaged_pt_is_named_for_what_it_is(tmp_path, golden_dir, sd):
  """Truncated, bit-flipped, legacy-format truncated and non-torch files each say what is
  wrong with them and never suggest turning the pickle safety check off."""
  torch = require_torch()
  data = (golden_dir / "gpt_tiny.pt").read_bytes()
  flipped = bytearray(data)
  flipped[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
  legacy = tmp_path / "legacy.pt"
  torch.save(
    {k: torch.from_numpy(v) for k, v in sd.items()}, legacy, _use_new_zipfile_serialization=False
  )
  cases = {
    "cut.pt": (data[: len(data) - 100], "truncated or corrupt PyTorch archive"),
    "flipped.pt": (bytes(flipped), "fails its checksum"),
    "text.pt": (b"<html>Not Found</html>" * 10, "not a PyTorch file"),
    "legacy_cut.pt": (legacy.read_bytes()[:300], "damaged PyTorch pickle|corrupt or truncated"),
  }
  for name, (content, message) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
      torch_io.load_torch_checkpoint(str(tmp_path / name))
    assert "trust" not in str(e.value) and name in str(e.value), str(e.value)
  assert set(torch_io.load_torch_checkpoint(str(legacy))) == set(sd)  # intact legacy loads


def test_pt_without_torch_names_the_extra(monkeypatch, golden_dir):
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  monkeypatch.delitem(sys.modules, "torch", raising=False)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'. in the npp_jax clone"):
    torch_io.load_torch_checkpoint(str(golden_dir / "gpt_tiny.pt"))


def test_cli_writes_orbax_params_that_load(tmp_path, golden_dir, gpt_io):
  out = tmp_path / "conv"
  cmd = [
    sys.executable,
    "-m",
    "npp_jax.convert",
    "gpt",
    f"--checkpoint={golden_dir / 'gpt_tiny_weights.npz'}",
    "--config=configs/tiny.py",
    f"--out={out}",
  ]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "converted" in res.stdout
  cfg = params_io.load_model_config(str(out))
  assert cfg == TINY
  params = params_io.load_params(str(out), cfg)
  logits = GPT(cfg).apply(
    {"params": params}, jnp.asarray(gpt_io["idx"]), jnp.asarray(gpt_io["cond"]), patch_side=2
  )
  want = gpt_io["train_logits_p2"]
  assert np.abs(np.asarray(logits) - want).max() < 1e-5 * np.abs(want).max()  # as in test_gpt
  # A second conversion into the same place is refused rather than overwriting.
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and "already exists" in res.stderr
  # Params converted for one size are refused for another.
  with pytest.raises(ValueError, match="do not fit the requested model"):
    params_io.load_params(str(out), GPTConfig.preset("tiny", dim=128))


def test_cli_reports_wrong_size_cleanly(tmp_path, golden_dir):
  cmd = [
    sys.executable,
    "-m",
    "npp_jax.convert",
    "gpt",
    f"--checkpoint={golden_dir / 'gpt_tiny_weights.npz'}",
    "--config=configs/b.py",
    f"--out={tmp_path / 'o'}",
  ]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2
  assert "error: checkpoint does not fit the model" in res.stderr
  assert "Traceback" not in res.stderr


def test_an_output_folder_holding_another_model_is_not_overwritten(tmp_path, sd):
  """A folder that holds only another model's config (a foreign or half-written output) is
  refused without force; with force, what was there is replaced, not mixed."""
  from npp_jax.models.gpt import GPTConfig

  cfg = GPTConfig.preset("tiny", dtype="float32")
  params = gpt_torch.params_from_torch(sd, cfg)
  out = tmp_path / "out"
  out.mkdir()
  (out / params_io.VQ_CONFIG_FILE).write_text('{"ch": 128}')
  with pytest.raises(FileExistsError, match="vq_config.json already exists; pass force"):
    params_io.save_params(str(out), params, cfg)
  assert (out / params_io.VQ_CONFIG_FILE).read_text() == '{"ch": 128}'
  params_io.save_params(str(out), params, cfg, force=True)
  assert sorted(p.name for p in out.iterdir()) == ["model_config.json", "params"]

"""The VQ tokenizer: golden parity, the converter and its errors, decoding samples with it."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import config_lib, tokenizers
from npp_jax.models import vqgan, vqgan_torch
from npp_jax.models.vqgan import VQConfig, VQModel

from .helpers import convert_tiny_vq
from .manifest_weights import generate

TINY_VQ = VQConfig.preset("VQ-16", ch=32, z_channels=64, codebook_size=64, codebook_embed_dim=8)


@pytest.fixture(scope="module")
def vq_sd(golden_dir):
  return generate(golden_dir / "vq_tiny_manifest.json")


@pytest.fixture(scope="module")
def vq_io(golden_dir):
  with np.load(golden_dir / "vq_tiny_io.npz") as z:
    return {k: z[k] for k in z.files}


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def rel(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_golden_parity(vq_sd, vq_io):
  params = vqgan_torch.params_from_torch(vq_sd, TINY_VQ)
  model = VQModel(TINY_VQ)
  x = jnp.asarray(nhwc(vq_io["x"]))
  out = model.apply({"params": params}, x, method=VQModel.encode_all)
  np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(2, -1), vq_io["indices"])
  # Bounds about 20x the measured float32 error (in brackets).
  assert rel(out["encoder_out"], nhwc(vq_io["encoder_out"])) < 3e-5  # (1.4e-6)
  assert rel(out["h"], nhwc(vq_io["h"])) < 4e-5  # (1.8e-6)
  assert rel(out["z_q"], nhwc(vq_io["z_q"])) < 2e-6  # (8.5e-8)
  assert rel(out["margin"].reshape(2, -1), vq_io["code_margin"]) < 8e-5  # (3.6e-6)
  dec = model.apply(
    {"params": params}, jnp.asarray(vq_io["indices"].reshape(2, 4, 4)), method=VQModel.decode_codes
  )
  assert rel(dec, nhwc(vq_io["decode_code"])) < 5e-5  # (2.4e-6)
  assert rel(model.apply({"params": params}, x), nhwc(vq_io["recon"])) < 5e-5  # (2.4e-6)


def test_vq8_and_vq16_shapes():
  for name, f in (("VQ-16", 16), ("VQ-8", 8)):
    cfg = VQConfig.preset(name, ch=32, z_channels=32, codebook_size=16)
    assert cfg.downsample == f
    params = vqgan.abstract_params(cfg)
    assert params["quantize"]["embedding"].shape == (16, 8)


def test_wrong_size_checkpoint_is_refused(vq_sd):
  with pytest.raises(ValueError) as err:
    vqgan_torch.params_from_torch(vq_sd, VQConfig.preset("VQ-16"))
  msg = str(err.value)
  assert "checkpoint does not fit the VQ tokenizer (ch=128" in msg
  assert "wrong shape: decoder.conv_blocks_0.attn_0.k.bias: checkpoint (128,), model (512,)" in msg
  assert "the checkpoint's codebook is (64, 8)" in msg
  assert "the checkpoint has ch=32, z_channels=64: set --config.tokenizer.ch=32" in msg
  broken = dict(vq_sd)
  del broken["quant_conv.bias"]
  with pytest.raises(ValueError, match="missing: quant_conv.bias"):
    vqgan_torch.params_from_torch(broken, TINY_VQ)
  with pytest.raises(ValueError, match="unknown tokenizer preset"):
    VQConfig.preset("VQ-32")


def test_cli_and_loader(tmp_path, golden_dir, vq_sd, vq_io):
  out = convert_tiny_vq(tmp_path, golden_dir)
  assert os.path.exists(out / "vq_config.json")
  c = config_lib.get_config("tiny")
  c.model.update(vocab_size=64, grid=4)
  c.tokenizer.update(name="vq", checkpoint=str(out))
  cfg, params = tokenizers.load_vq(c)
  assert cfg == TINY_VQ
  tok = tokenizers.VQTokenizer(cfg, params)
  hlo = tok._encode.lower(tok.params, jnp.zeros((1, 64, 64, 3))).as_text()
  assert "precision HIGHEST" in hlo, "extraction runs at float32 precision on every platform"
  fast = tokenizers.VQTokenizer(cfg, params, precision="default")
  assert (
    "precision HIGHEST" not in fast._encode.lower(fast.params, jnp.zeros((1, 64, 64, 3))).as_text()
  )
  codes = tok.encode(jnp.asarray(nhwc(vq_io["x"])))
  np.testing.assert_array_equal(np.asarray(codes).reshape(2, -1), vq_io["indices"])
  images = tokenizers.decoder(c)(vq_io["indices"])
  assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
  want = np.clip(nhwc(vq_io["decode_code"]) * 127.5 + 128, 0, 255).astype(np.uint8)
  assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
  # The .pt-style path (a file, converted on the fly) gives the same tokenizer.
  c.tokenizer.checkpoint = str(tmp_path / "vq.npz")
  c.tokenizer.update(preset="VQ-16")
  with pytest.raises(ValueError, match="do not fit|does not fit"):
    tokenizers.load_vq(c)  # without the converted config the preset's width (128) is assumed
  c.tokenizer.update(ch=32, z_channels=64)  # ... unless the config says otherwise
  assert tokenizers.load_vq(c)[0] == TINY_VQ
  c.model.vocab_size = 32
  c.tokenizer.checkpoint = str(out)
  with pytest.raises(ValueError, match="codebook has 64 codes but the GPT's vocabulary is 32"):
    tokenizers.load_vq(c)

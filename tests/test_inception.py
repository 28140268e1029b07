"""The FID InceptionV3 against pytorch-fid's outputs; both preprocessings; weight errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax.models import inception, inception_torch

from .manifest_weights import generate


@pytest.fixture(scope="module")
def variables(golden_dir):
  return inception_torch.variables_from_torch(
    generate(golden_dir / "inception_fid_random_manifest.json")
  )


@pytest.fixture(scope="module")
def io(golden_dir):
  with np.load(golden_dir / "inception_fid_random_io.npz") as z:
    return {k: z[k] for k in z.files}


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def rel(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_outputs_match_pytorch_fid(variables, io):
  x = inception.preprocess_pytorch_fid(jnp.asarray(nhwc(io["images_uint8"])))
  assert x.shape == (2, 299, 299, 3)
  assert rel(x[:, :32, :32], nhwc(io["preprocessed_tl"])) < 8e-6  # (3.7e-7)
  assert rel(x[:, -32:, -32:], nhwc(io["preprocessed_br"])) < 8e-6  # (3.2e-7)
  out = jax.jit(inception.InceptionV3().apply)(variables, x)
  # Bounds about 20x the measured float32 error (in brackets).
  assert rel(out["pool3"], io["pool3"]) < 6e-6  # (2.9e-7)
  assert rel(out["logits"], io["logits"]) < 1e-5  # (5.0e-7)
  assert rel(out["logits_nobias"], io["logits_nobias"]) < 1e-5  # (4.9e-7)
  assert rel(out["mixed_6_conv"], nhwc(io["mixed_6d_branch1x1"])) < 3e-5  # (1.4e-6)
  assert out["sfid_spatial"].shape == (2, 2023)
  assert rel(out["sfid_spatial"], io["sfid_spatial"]) < 3e-5  # (1.5e-6)


def np_tf1_bilinear(img, out):
  """TF1 ResizeBilinear, align_corners=False, no half-pixel centres: src = dst * in / out."""
  h, w, c = img.shape
  res = np.zeros((out, out, c))
  for i in range(out):
    y = i * h / out
    y0 = int(np.floor(y))
    y1, fy = min(y0 + 1, h - 1), y - y0
    for j in range(out):
      x = j * w / out
      x0 = int(np.floor(x))
      x1, fx = min(x0 + 1, w - 1), x - x0
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      res[i, j] = top * (1 - fy) + bottom * fy
  return res


def test_adm_resize_matches_tf1_rule():
  img = np.random.default_rng(0).integers(0, 256, (1, 13, 17, 3)).astype(np.float64)
  got = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(img), 40))[0]
  np.testing.assert_allclose(got, np_tf1_bilinear(img[0], 40), rtol=1e-5, atol=1e-3)
  x = np.asarray(inception.preprocess_adm(jnp.asarray(img.astype(np.uint8))))
  np.testing.assert_allclose(x[0, 0, 0], (img[0, 0, 0] - 128) / 128, rtol=1e-6)
  assert x.shape == (1, 299, 299, 3)


def test_wrong_weights_are_refused(golden_dir):
  sd = generate(golden_dir / "inception_fid_random_manifest.json")
  del sd["fc.bias"]
  sd["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 3, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    inception_torch.variables_from_torch(sd)
  assert "missing: fc.bias" in str(err.value)
  assert "wrong shape: Mixed_5b.branch1x1.conv.kernel" in str(err.value)

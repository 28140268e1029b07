"""Outside files are checked against a known SHA-256 before use: a `.sha256` beside the
file, or the digest prefix in a torch-hub-style name."""

import hashlib

import numpy as np
import pytest

from npp_jax.infra import digests, torch_io


def test_a_sidecar_digest_is_checked_before_the_file_is_read(tmp_path):
  path = tmp_path / "weights.npz"
  np.savez(path, w=np.arange(6, dtype=np.float32))
  good = hashlib.sha256(path.read_bytes()).hexdigest()
  assert digests.expected(str(path)) is None
  digests.check(str(path), "checkpoint")  # no digest known: nothing read

  (tmp_path / "weights.npz.sha256").write_text(f"{good}  weights.npz\n")
  assert torch_io.load_torch_checkpoint(str(path))["w"].tolist() == [0, 1, 2, 3, 4, 5]

  (tmp_path / "weights.npz.sha256").write_text(f"{'0' * 64}  weights.npz\n")
  with pytest.raises(digests.DigestMismatchError) as e:
    torch_io.load_torch_checkpoint(str(path))
  msg = str(e.value)
  assert "\n" not in msg and good in msg and "download it again" in msg, msg

  (tmp_path / "weights.npz.sha256").write_text("not a digest\n")
  with pytest.raises(ValueError, match=r"does not start with a SHA-256 .*sha256sum weights.npz"):
    digests.check(str(path), "checkpoint")


def test_torch_hub_names_carry_the_digest_prefix(tmp_path):
  data = b"inception weights"
  prefix = hashlib.sha256(data).hexdigest()[:8]
  good = tmp_path / f"pt_inception-2015-12-05-{prefix}.pth"
  good.write_bytes(data)
  assert digests.expected(str(good)) == (prefix, "the file's name (torch hub's convention)")
  digests.check(str(good), "Inception checkpoint")
  bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"  # the real file's name, other bytes
  bad.write_bytes(data)
  with pytest.raises(digests.DigestMismatchError, match="not the 6726825d of the file's name"):
    digests.check(str(bad), "Inception checkpoint")
  for name in ("c2i_B_256.pt", "model-1.pt", "vq_ds16_c2i.pt"):  # no digest in these names
    assert digests.expected(str(tmp_path / name)) is None

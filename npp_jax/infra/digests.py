"""Checks an outside file (released weights, a reference batch) against its SHA-256.

A digest is known in two ways:
- `FILE.sha256` beside the file, as `sha256sum FILE > FILE.sha256` writes it (record one
  when you download a file whose publisher states no digest);
- torch hub's naming convention `NAME-<hex>.pth`: the name carries the first hex digits of
  the SHA-256 (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`).

Without one nothing is read; with one the file is hashed (streamed) before it is used and
a mismatch is one line naming the file and both digests.
"""

import hashlib
import logging
import os
import re
import time

from npp_jax.infra import storage

log = logging.getLogger(__name__)

# torch.hub's HASH_REGEX, with at least 8 digits so that `model-1.pt` names no digest.
_NAME_DIGEST = re.compile(r"-([a-f0-9]{8,64})\.")


class DigestMismatchError(ValueError):
  """The file's SHA-256 is not the one recorded for it."""


def expected(path: str) -> tuple[str, str] | None:
  """(the known digest or its first digits, where it is recorded), or None."""
  sidecar = path + ".sha256"
  if storage.exists(sidecar):
    words = storage.read_text(sidecar).split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
      raise ValueError(
        f"{sidecar} does not start with a SHA-256 (64 hex digits): write it with "
        f"`sha256sum {storage.basename(path)} > {storage.basename(sidecar)}` or delete it."
      )
    return words[0].lower(), sidecar
  if match := _NAME_DIGEST.search(storage.basename(path)):
    return match.group(1), "the file's name (torch hub's convention)"
  return None


def sha256(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with storage.as_path(path).open("rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def check(path: str, what: str) -> None:
  """Raises DigestMismatchError unless `path` has its known SHA-256 (no-op when none is
  known, or `path` is a folder)."""
  want = expected(path)
  if want is None or storage.isdir(path):
    return
  digest, source = want
  t0 = time.perf_counter()
  got = sha256(path)
  if not got.startswith(digest):
    raise DigestMismatchError(
      f"{what} {path} has SHA-256 {got}, not the {digest} of {source}: the download is "
      "damaged or another file; download it again."
    )
  log.info(
    "%s %s matches its SHA-256 (%s; %.1f s)",
    what,
    os.path.basename(path),
    source,
    time.perf_counter() - t0,
  )

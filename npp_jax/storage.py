"""One path abstraction for local folders and cloud buckets (`gs://...`), over etils.epath.

Every file npp_jax reads or writes goes through here (orbax and ArrayRecord reads reach
`gs://` through their own tensorstore / riegeli clients). Paths stay strings; local ones
are made absolute, URLs are left as they are, so no `gs:` folder appears on a local disk.
Writes are all-or-nothing: a local file is written under a temporary name and renamed; a
cloud object only appears when its upload completes.
"""

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

# One client for `gs://` whatever else is installed: epath would switch to TensorFlow's
# file system whenever TensorFlow is importable (the `data` extra), which reads other
# credentials and settings than gcsfs. An explicit EPATH_USE_TF still wins.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402


def _fresh_listings() -> None:
  """Bucket listings are read fresh every time: gcsfs caches them per process forever by
  default, and other hosts write parts and checkpoints that a cached listing would miss."""
  try:
    import fsspec  # noqa: PLC0415 (comes with etils[epath] / gcsfs)
  except ImportError:
    return
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_fresh_listings()


def is_remote(path: str) -> bool:
  """True for URLs (`gs://bucket/...`, `s3://...`), False for local paths."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL unchanged (without a trailing slash)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return os.path.join(os.fspath(path), *parts)


def basename(path: str) -> str:
  return os.path.basename(os.fspath(path).rstrip("/"))


def as_path(path: str) -> epath.Path:
  return epath.Path(absolute(path))


def exists(path: str) -> bool:
  return as_path(path).exists()


def isdir(path: str) -> bool:
  return as_path(path).is_dir()


def listdir(path: str) -> list[str]:
  """Names in a folder (empty when the folder does not exist)."""
  p = as_path(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def files_under(path: str) -> list[str]:
  """Every file below a folder, folder by folder in sorted order, names sorted in each."""
  found = []
  # fsspec's walk names bucket folders without their `gs://`: put it back.
  scheme = absolute(path).split("://")[0] + "://" if is_remote(path) else ""
  for folder, _, names in sorted(as_path(path).walk(), key=lambda w: os.fspath(w[0])):
    folder = os.fspath(folder)
    folder = scheme + folder if scheme and not folder.startswith(scheme) else folder
    found += [join(folder, n) for n in sorted(names)]
  return found


def makedirs(path: str) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def mtime(path: str) -> float:
  return float(as_path(path).stat().mtime)


def size(path: str) -> int:
  return int(as_path(path).stat().length)


def read_bytes(path: str) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: str) -> str:
  return as_path(path).read_text()


@contextlib.contextmanager
def _writing(path: str) -> Iterator[Any]:
  """A binary file to write `path` through, all or nothing: readers see the old file or
  the new one; an error inside the block leaves the old one (or none)."""
  if is_remote(path):
    # An object appears when its upload is committed at close; fsspec commits at close
    # even when the block raises, so a failed write is discarded instead.
    f = as_path(path).open("wb")
    try:
      yield f
    except BaseException:
      _abandon(f)
      raise
    f.close()
    return
  path = absolute(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _abandon(f: Any) -> None:
  """Drops a half-written upload so that nothing is committed."""
  discard = getattr(f, "discard", None)
  if discard is not None:
    discard()  # cancels a started multi-part upload
  # fsspec commits what it buffered on close, also from __del__: mark it closed instead.
  with contextlib.suppress(AttributeError):
    f.closed = True


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` all at once: readers see the old file or the new one, never a part."""
  with _writing(path) as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def append_text(path: str, text: str) -> None:
  """Appends to a log-like file (a cloud object is rewritten whole: objects cannot grow)."""
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)
    return
  with open(absolute(path), "a") as f:
    f.write(text)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """An uncompressed `.npz`, written all at once (locally streamed to the file; for a
  bucket built in memory first: zip needs a seekable file, an upload is not one)."""
  if is_remote(path):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())
    return
  with _writing(path) as f:
    np.savez(f, **arrays)


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an `.npz` (pickled objects refused)."""
  data = io.BytesIO(read_bytes(path)) if is_remote(path) else absolute(path)
  with np.load(data, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def copy(src: str, dst: str) -> None:
  """Copies a file, streamed (between a bucket and the local disk, either way)."""
  _copy_stream(as_path(src), as_path(dst))


def remove(path: str) -> None:
  """Deletes a file or a whole folder; nothing when it is absent."""
  p = as_path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def move(src: str, dst: str) -> None:
  """Moves a file or folder (on a bucket: copy, then delete)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.move(absolute(src), absolute(dst))
    return
  s, d = as_path(src), as_path(dst)
  if s.is_dir():
    for f in files_under(src):
      _copy_stream(epath.Path(f), d / os.path.relpath(f, absolute(src)))
    s.rmtree()
  else:
    _copy_stream(s, d)
    s.unlink()


def _copy_stream(src: epath.Path, dst: epath.Path) -> None:
  # Streams through this process: epath's own copy goes through the source's backend,
  # which for a local source would treat a `gs://` destination as a local folder name.
  dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open("rb") as a, _writing(os.fspath(dst)) as b:
    shutil.copyfileobj(a, b, 1 << 24)


@contextlib.contextmanager
def local_copy_for_writing(path: str) -> Iterator[str]:
  """A local file name to write `path` through, for writers that only take local paths
  (ArrayRecord): on a bucket the file is uploaded when the block ends without error."""
  if not is_remote(path):
    yield absolute(path)
    return
  with tempfile.TemporaryDirectory(prefix="npp_jax_upload_") as tmp:
    local = os.path.join(tmp, basename(path))
    yield local
    _copy_stream(epath.Path(local), as_path(path))

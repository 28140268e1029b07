"""One path abstraction for local folders and cloud buckets (`gs://...`), over etils.epath.

Every file npp_jax reads or writes goes through here (orbax and ArrayRecord reads reach
`gs://` through their own tensorstore / riegeli clients). Paths stay strings; local ones
are made absolute, URLs are left as they are, so no `gs:` folder appears on a local disk.
Writes are all-or-nothing: a local file is written under a temporary name and renamed; a
cloud object only appears when its upload completes.
"""

import contextlib
import errno
import functools
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
log = logging.getLogger(__name__)
# gcsfs logs every exhausted retry with its traceback (dozens of lines per operation);
# bounded() below logs the retries in a line each and ends in one StorageError line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

# How long one operation on a bucket may take, retries included, before the job stops:
# gcsfs retries a lost connection for about a minute and tensorstore for longer, and a
# bucket that is gone for good must end the job, not hang it (`set_deadline`).
DEADLINE_S = 300.0
# Errors that say what is wrong with the request, not that storage is unreachable.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)
_PERMANENT += (NotADirectoryError,)


class StorageError(OSError):
  """A bucket operation that did not succeed within the deadline (one line: the path, the
  operation and the cause)."""


_failed: list[str] = []  # the first StorageError's text: later operations fail at once
_local = threading.local()  # `inside`: in a bounded operation's thread (no nested deadline)


def failed() -> bool:
  """True once a bucket operation failed past its deadline (the job is stopping)."""
  return bool(_failed)


def set_deadline(seconds: float) -> None:
  """Starts a job's storage: the time one bucket operation may take (retries included)
  before StorageError, and no failure remembered from an earlier job in this process (a
  notebook reruns a job once the bucket is back)."""
  global DEADLINE_S
  if not seconds > 0:
    raise ValueError(f"storage deadline {seconds} must be > 0 seconds.")
  DEADLINE_S = float(seconds)
  _failed.clear()


def disk_full(e: BaseException) -> bool:
  """True for an error that says a disk is full (ENOSPC, in Python's or tensorstore's words),
  on `e` or on what it was raised from (not on an error it was merely raised while
  handling: a rescue attempt after a full disk fails for its own reasons)."""
  while e is not None:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e = e.__cause__
  return False


def _cause(e: BaseException) -> str:
  text = " ".join(str(e).split())
  name = type(e).__name__
  if "Cannot connect" in text or isinstance(e, ConnectionError) or "Connect" in name:
    return f"the storage endpoint is unreachable ({name}: {text[:200]})"
  return f"{name}: {text[:300]}"


def _run_with_deadline(fn: Callable[[], Any], deadline_s: float) -> Any:
  """fn() in a daemon thread, waited for `deadline_s` (TimeoutError after): a client that
  hangs forever cannot hang the job, and a daemon thread never holds up its exit."""
  box: dict[str, Any] = {}

  def target():
    _local.inside = True
    try:
      box["value"] = fn()
    except BaseException as e:  # noqa: BLE001 (handed to the caller)
      box["error"] = e

  thread = threading.Thread(target=target, daemon=True, name="npp_jax-storage")
  thread.start()
  thread.join(deadline_s)
  if thread.is_alive():
    raise TimeoutError(f"no answer in {deadline_s:.0f} s")
  if "error" in box:
    raise box["error"]
  return box.get("value")


def bounded(op: str, retry: bool = True) -> Callable:
  """Gives a storage function on a bucket path (its first argument) a deadline and retries
  with backoff; a failure past the deadline is one StorageError. Local paths run as is."""

  def wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(path, *args, **kwargs):
      remote = is_remote(path) or any(isinstance(a, str) and is_remote(a) for a in args)
      if not remote or getattr(_local, "inside", False):
        return fn(path, *args, **kwargs)
      if _failed:
        raise StorageError(f"storage failed earlier ({_failed[0]}); not trying {op} {path}")
      start, delay = time.monotonic(), 1.0
      while True:
        left = DEADLINE_S - (time.monotonic() - start)
        try:
          return _run_with_deadline(lambda: fn(path, *args, **kwargs), max(left, 0.1))
        except (*_PERMANENT, StorageError):
          raise
        except (OSError, TimeoutError) as e:
          spent = time.monotonic() - start
          if not retry or spent + delay >= DEADLINE_S:
            text = f"{op} {path} failed after {spent:.0f} s: {_cause(e)}"
            _failed.append(text)
            raise StorageError(text) from None
          log.warning("storage: %s %s: %s; retrying in %.0f s", op, path, _cause(e), delay)
          time.sleep(delay)
          delay = min(2 * delay, 30.0)

    return run

  return wrap


def call_with_deadline(op: str, path: str, fn: Callable[[], Any]) -> Any:
  """fn() (which reaches `path` through a client of its own, e.g. ArrayRecord's) within the
  deadline when `path` is a bucket; StorageError after it. No retry: fn may not be
  repeatable (it advances an iterator). A local path runs fn directly: no thread is started
  where no deadline is needed (the trainer calls this every step)."""
  return bounded(op, retry=False)(lambda _path: fn())(path)


def check_writable(path: str) -> None:
  """Before any work: a bucket folder must exist and take a write, within the deadline;
  otherwise one line naming the bucket and what is wrong."""
  if not is_remote(path):
    return
  probe = join(absolute(path), ".npp_jax_write_check")
  bucket = absolute(path).split("://", 1)[1].split("/", 1)[0]
  try:
    write_text(probe, "npp_jax checks that it can write here before it starts\n")
    remove(probe)
  except FileNotFoundError:
    raise StorageError(
      f"cannot write to {path}: the bucket {bucket!r} does not exist; create it or fix the path"
    ) from None
  except PermissionError as e:
    raise StorageError(
      f"cannot write to {path}: permission denied on bucket {bucket!r} ({_cause(e)}); "
      "check the credentials or the bucket's access"
    ) from None


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


@bounded("check")
def exists(path: str) -> bool:
  return as_path(path).exists()


@bounded("check")
def isdir(path: str) -> bool:
  return as_path(path).is_dir()


@bounded("list")
def listdir(path: str) -> list[str]:
  """Names in a folder (empty when the folder does not exist)."""
  p = as_path(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


@bounded("list")
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


@bounded("create folder")
def makedirs(path: str) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


@bounded("stat")
def mtime(path: str) -> float:
  return float(as_path(path).stat().mtime)


@bounded("stat")
def size(path: str) -> int:
  return int(as_path(path).stat().length)


@bounded("read")
def read_bytes(path: str) -> bytes:
  return as_path(path).read_bytes()


@bounded("read")
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
    with _disk_full_named(path), open(tmp, "wb") as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def _disk_full_named(path: str) -> Iterator[None]:
  """A full disk as one StorageError naming the file that did not fit."""
  try:
    yield
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise StorageError(f"write {path} failed: the disk is full") from None


def _abandon(f: Any) -> None:
  """Drops a half-written upload so that nothing is committed."""
  discard = getattr(f, "discard", None)
  if discard is not None:
    discard()  # cancels a started multi-part upload
  # fsspec commits what it buffered on close, also from __del__: mark it closed instead.
  with contextlib.suppress(AttributeError):
    f.closed = True


@bounded("write")
def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` all at once: readers see the old file or the new one, never a part."""
  with _writing(path) as f:
    f.write(data)


@bounded("write")
def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


@bounded("append")
def append_text(path: str, text: str) -> None:
  """Appends to a log-like file (a cloud object is rewritten whole: objects cannot grow)."""
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)
    return
  with _disk_full_named(path), open(absolute(path), "a") as f:
    f.write(text)


@bounded("write")
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


@bounded("read")
def load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an `.npz` (pickled objects refused)."""
  data = io.BytesIO(read_bytes(path)) if is_remote(path) else absolute(path)
  with np.load(data, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


@bounded("copy")
def copy(src: str, dst: str) -> None:
  """Copies a file, streamed (between a bucket and the local disk, either way)."""
  _copy_stream(as_path(src), as_path(dst))


@bounded("remove")
def remove(path: str) -> None:
  """Deletes a file or a whole folder; nothing when it is absent."""
  p = as_path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


@bounded("move", retry=False)
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
    copy(local, path)

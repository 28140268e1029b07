"""gcp-storage-emulator with object downloads as real GCS serves them, for the tests.

The emulator's downloads carry no `x-goog-generation` header and ignore
`ifGenerationMatch` / `ifGenerationNotMatch`; tensorstore (orbax's OCDBT checkpoints)
reads an object's generation from that header and revalidates cached objects with those
conditions, and fails with "Malformed StorageGeneration" without them. This wraps the
download handler (before the server's routes bind it) and runs the emulator's own CLI:
`python tests/gcs_emulator.py start --host=127.0.0.1 --port=P --default-bucket=B`.

Its files are also written as a bucket keeps them through a crash (a temporary file renamed
into place): the tests kill the emulator to take storage away, and a kill while it rewrote
its `.meta` index left that empty, so the restarted emulator could not start.
"""

import os
import sys
import tempfile
from http import HTTPStatus

from gcp_storage_emulator import storage as emulator_storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return _download(request, response, storage, *args, **kwargs)
  generation = str(obj["generation"])
  query = request.query
  if query.get("ifGenerationNotMatch", [None])[0] == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  if query.get("ifGenerationMatch", [generation])[0] != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _download(request, response, storage, *args, **kwargs)


objects.download = download

_write_bytes = emulator_storage._FileStore.write_bytes


def write_bytes(self, rel, content):
  if self._use_memory:
    return _write_bytes(self, rel, content)
  path = self._disk_path(rel)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Beside the store, not in it: the emulator lists its folders.
  fd, tmp = tempfile.mkstemp(dir=self._root.parent, prefix=".write-")
  with os.fdopen(fd, "wb") as f:
    f.write(content)
  os.replace(tmp, path)
  return None


emulator_storage._FileStore.write_bytes = write_bytes

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # noqa: E402 (after the patch)

  main(sys.argv[1:])

"""gcp-storage-emulator with object downloads as real GCS serves them, for the tests.

The emulator's downloads carry no `x-goog-generation` header and ignore
`ifGenerationMatch` / `ifGenerationNotMatch`; tensorstore (orbax's OCDBT checkpoints)
reads an object's generation from that header and revalidates cached objects with those
conditions, and fails with "Malformed StorageGeneration" without them. This wraps the
download handler (before the server's routes bind it) and runs the emulator's own CLI:
`python tests/gcs_emulator.py start --host=127.0.0.1 --port=P --default-bucket=B`.
"""

import sys
from http import HTTPStatus

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

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # noqa: E402 (after the patch)

  main(sys.argv[1:])

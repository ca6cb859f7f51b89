"""`python tests/helpers/gcs_emulator.py start ...`: gcp-storage-emulator, answering downloads as GCS does.

GCS sends an object's generation with its bytes (`x-goog-generation`, `x-goog-metageneration`); the
emulator (2026.7) leaves them out. tensorstore reads them from every download and fails without them
("Malformed StorageGeneration") as soon as it re-reads an object it wrote, e.g. an OCDBT manifest while
several of a checkpoint's arrays are written at once. This adds the two headers from the object's own
metadata, as the real service does; everything else is the emulator unchanged.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the emulator already answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routing table from `objects`

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

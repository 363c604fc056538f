"""Search with an uploaded file (bytes from a client): decoded with the ingest pixel rules, embedded with the
collection's own extractor.

The bytes go to a private temporary folder under a name cbmir chooses (``query`` plus an extension found
from the content, :func:`sniff_extension`); the client's file name is never used as a path, and error
messages name "the uploaded file", not the temporary path.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from cbmir.app.searching import FileOptions, SearchRequest, SearchResponse, search
from cbmir.core.errors import CbmirError

#: decode limits for uploads (smaller than the ingest defaults: a service answers many clients)
UPLOAD_MAX_PIXELS = 40_000_000
UPLOAD_MAX_VOXELS = 64 * 1024 * 1024
#: extensions a client's file name may choose when the content does not tell (lower case)
_NAMED = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg", ".tif": ".tif", ".tiff": ".tif", ".bmp": ".bmp",
          ".dcm": ".dcm", ".dicom": ".dcm", ".nii": ".nii", ".nii.gz": ".nii.gz", ".npy": ".npy"}


def sniff_extension(data: bytes, filename: str | None = None) -> str:
    """The extension the readers need for ``data``: ``.npy`` (numpy magic), ``.dcm`` (``DICM`` at byte
    128), ``.nii.gz`` (gzip), ``.nii`` (NIfTI-1/2 header size 348/540); otherwise the client's file name
    extension when it is one of the known ones, else ``.img`` (Pillow identifies images by content)."""
    if data[:6] == b"\x93NUMPY":
        return ".npy"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return ".dcm"
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if len(data) >= 348 and any(int.from_bytes(data[:4], order) in (348, 540) for order in ("little", "big")):
        return ".nii"
    name = (filename or "").lower()
    for ext in sorted(_NAMED, key=len, reverse=True):
        if name.endswith(ext):
            return _NAMED[ext]
    return ".img"


def collection_file_options(meta) -> FileOptions:
    """The pixel options a collection's archive was ingested with (``extra["archive"]``), so that an
    uploaded query is read like its database; MedMNIST collections: the defaults."""
    opts = ((meta.extra or {}).get("archive") or {}).get("options") or {}
    return FileOptions(intensity=opts.get("intensity"), window=opts.get("window"),
                       slice_axis=opts.get("slice_axis"), fit=opts.get("fit") or "stretch",
                       max_pixels=UPLOAD_MAX_PIXELS, max_voxels=UPLOAD_MAX_VOXELS)


def search_upload(app, req: SearchRequest, data: bytes, filename: str | None = None) -> SearchResponse:
    """Answer ``req`` (collection, k, database split, filter; no query of its own) with ``data`` as the
    query file.

    Returns:
        :class:`cbmir.app.searching.SearchResponse`; its query's ``source`` is the client's file name
        (text only) or ``"upload"``.

    Raises:
        CbmirError: an empty file; everything :func:`cbmir.app.searching.search` raises for a file (not
            an image, truncated, a decompression bomb, NaN pixels, 2D for a 3D collection ...), naming
            "the uploaded file".
    """
    from cbmir.app.collections import require_collection

    if not data:
        raise CbmirError("the uploaded file is empty; send an image (PNG, JPEG, TIFF, BMP, DICOM) or, for a 3D "
                         "collection, a volume (NIfTI, .npy)")
    meta = app.store.meta(require_collection(app.store, req.collection))
    shown = (filename or "upload")[:200]
    with tempfile.TemporaryDirectory(prefix="cbmir-upload-") as tmp:
        path = Path(tmp) / f"query{sniff_extension(data, filename)}"
        path.write_bytes(data)
        try:
            answer = search(app, dataclasses.replace(req, files=[path], file_options=collection_file_options(meta)))
        except CbmirError as exc:
            text = str(exc).replace(f"query file {path}: ", "the uploaded file: ").replace(str(path),
                                                                                        "the uploaded file")
            raise type(exc)(text) from None
    for q in answer.queries:
        q.source = shown
    return answer


def add_upload(app, collection: str, data: bytes, filename: str | None = None, *, key: str | None = None,
               label=None, split: str | None = None, meta: dict | None = None):
    """Add an uploaded image (or volume) to a collection as one point (:func:`cbmir.app.items.add_points`).

    The bytes are decoded with the pixel rules the collection was ingested with (as a search upload); the
    point's key — what its id is hashed from, and its ``source_path`` — is ``key`` or
    ``upload/<sha256 of the bytes>`` (the client's file name is never used as a path). Re-adding the same
    bytes with the same key updates that point instead of adding another.

    Returns:
        :class:`cbmir.app.items.AddResult`.

    Raises:
        CbmirError: an empty or undecodable file, a 2D file for a 3D collection (or the reverse), a label
            that is not a class of the collection, an unknown split, a reserved payload field; a collection
            without stable ids (MedMNIST collections are not archives).
    """
    import hashlib

    from cbmir.app.collections import require_collection
    from cbmir.app.items import NewPoint, add_points
    from cbmir.ingest.sources import load_query

    if not data:
        raise CbmirError("the uploaded file is empty; send an image (PNG, JPEG, TIFF, BMP, DICOM) or, for a 3D "
                         "collection, a volume (NIfTI, .npy)")
    cmeta = app.store.meta(require_collection(app.store, collection))
    opts = collection_file_options(cmeta)
    with tempfile.TemporaryDirectory(prefix="cbmir-upload-") as tmp:
        path = Path(tmp) / f"point{sniff_extension(data, filename)}"
        path.write_bytes(data)
        try:
            pixels = load_query(path, cmeta, intensity=opts.intensity, window=opts.window,
                                slice_axis=opts.slice_axis, fit=opts.fit)
        except CbmirError as exc:
            raise type(exc)(str(exc).replace(str(path), "the uploaded file")) from None
    point = NewPoint(image=pixels[0], key=key or f"upload/{hashlib.sha256(data).hexdigest()}", label=label,
                     split=split, meta=dict(meta or {}))
    return add_points(app, collection, [point])

"""Images of stored points and of search answers: what a person looks at.

* :func:`point_pixels` — the pixels of one stored point, read from its source: the MedMNIST row (the
  dataset file in ``settings.data_dir``), or the archive file (the archive recorded in the collection
  metadata at ingest, ``extra["archive"]``, reopened with the same options, so the same pixel rules and
  the DICOM window apply). The caller names a point id only; no path ever comes from a request.
* :func:`render_png` — a 2D view of them (:func:`cbmir.evaluation.pictures.display_image`: the image itself,
  or for a volume its middle axial slice or an axial montage) as PNG bytes, fitted into ``size x size``
  (bounded: :data:`MIN_SIZE`..:data:`MAX_SIZE`).
* :func:`gallery_png` — a query and its top-k as one picture (class names, scores, ✓/✗), for
  ``cbmir search --gallery``, drawn by :func:`cbmir.evaluation.pictures.draw_gallery` (the renderer of the
  report's query galleries too).
* :func:`source_rows` — pixels of many rows of a split read from the source at once, in ascending row order
  (the report's query galleries, :class:`cbmir.app.report_images.ReportImages`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from cbmir.app.collections import require_collection
from cbmir.core.errors import CbmirError, NotFoundError
from cbmir.evaluation.pictures import (  # noqa: F401 - MAX_SIZE, MIN_SIZE: for the service routes
    DEFAULT_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    VIEWS,
    check_size,
    display_image,
    draw_gallery,
    fit_picture,
    hit_tile,
    png_bytes,
    query_tile,
)


def split_index_of(name: str, pid) -> tuple[str, int]:
    """``(split, row)`` of point id ``pid`` of collection ``name``.

    Raises:
        NotFoundError: not a point id (unknown split code, negative, not an integer).
    """
    from cbmir.search.schema import split_and_index

    try:
        if isinstance(pid, bool) or int(pid) != pid or int(pid) < 0:
            raise ValueError
        return split_and_index(int(pid))
    except (KeyError, ValueError, TypeError, OverflowError):
        raise NotFoundError(f"point id {pid!r} is not a point id of collection {name!r}") from None


def point_pixels(app, name: str, pid: int) -> tuple[np.ndarray, bool]:
    """The source pixels of stored point ``pid`` of collection ``name``.

    Returns:
        ``(pixels, is_3d)``: uint8 ``(H, W, 3)`` for a 2D collection (MedMNIST: the row as stored, grey
        replicated; an archive: the file at its own resolution after the collection's pixel rule), uint8
        ``(D, H, W)`` for a 3D one (the volume as embedded, side = collection size).

    Raises:
        NotFoundError: unknown collection or point.
        CbmirError: the source cannot be read here (MedMNIST file missing from ``data_dir``, archive moved
            or changed since ingest), naming what to fix.
    """
    store = app.store
    meta = store.meta(require_collection(store, name))
    split, index = split_index_of(name, pid)
    try:
        _, pays = store.get_points(name, split, [index], with_vectors=False)
    except CbmirError:
        raise NotFoundError(f"collection {name!r} has no point {pid} ({split} row {index})") from None
    archive = (meta.extra or {}).get("archive")
    if archive:
        return _archive_pixels(app, name, meta, archive, pays[0], split, index), bool(meta.is_3d)
    return _medmnist_pixels(app, name, meta, split, index), bool(meta.is_3d)


def _medmnist_pixels(app, name: str, meta, split: str, index: int) -> np.ndarray:
    from cbmir.ingest.medmnist_data import MEDMNIST_FLAGS

    if meta.dataset not in MEDMNIST_FLAGS:
        raise CbmirError(f"collection {name!r} records no archive to read images from (ingested before "
                         "archive roots were recorded); re-ingest it with --recreate to show its images")
    try:
        return source_rows(app, meta.dataset, int(meta.size), split, [index])[index]
    except IndexError as exc:
        raise NotFoundError(f"collection {name!r}: {exc}") from None


def source_rows(app, dataset: str, size: int, split: str, indices) -> dict[int, np.ndarray]:
    """Pixels of rows ``indices`` of ``split`` of MedMNIST ``dataset`` at ``size``, read from the file in
    ``app.settings.data_dir`` (never downloaded) in ascending row order, so a large deflated split is
    decompressed once, forward; the reader is kept by ``app`` for later calls.

    Returns:
        ``{row: pixels}``: uint8 ``(H, W, 3)`` for a 2D dataset (grey replicated), ``(D, H, W)`` for a 3D one.

    Raises:
        CbmirError: the file is missing or invalid (naming the file and ``data_dir``).
        IndexError: a row outside the split (naming it).
    """
    from cbmir.ingest.medmnist_data import is_3d_flag, open_medmnist
    from cbmir.ingest.sources.pixels import as_rgb

    src = app.cached(("medmnist", dataset, int(size)),
                     lambda: open_medmnist(dataset, size, app.settings.data_dir, download=False))
    rows = sorted({int(i) for i in indices})
    bad = [i for i in rows if not 0 <= i < src.split_size(split)]
    if bad:
        raise IndexError(f"{split} row {bad[0]} is not in {src.path.name} ({src.split_size(split)} rows)")
    row = app.cached(("medmnist-rows", dataset, int(size), split), lambda: _row_reader(src, split))
    is_3d = is_3d_flag(dataset)
    out = {}
    for i in rows:
        img = np.array(row(i))
        out[i] = img if is_3d else as_rgb(img[..., None] if img.ndim == 2 else img)
    return out


#: a MedMNIST split whose images take at most this many bytes is decompressed once and kept in memory for
#: rendering; a larger one is read row by row (a deflated member restarts decompression on a backward read)
SPLIT_IN_MEMORY_BYTES = 256 << 20


def _row_reader(src, split: str):
    """``row(i) -> uint8 image`` of ``split`` of a MedMNIST source (thread-safe)."""
    from cbmir.ingest.npz_stream import NpyMemberReader

    reader = NpyMemberReader(src.path, f"{split}_images")
    n = src.split_size(split)
    if n * reader.row_bytes <= SPLIT_IN_MEMORY_BYTES:
        rows = reader.read_rows(0, n)
        reader.close()
        return lambda i: rows[i]
    lock = threading.Lock()

    def row(i: int):
        with lock:
            return reader.read_rows(i, i + 1)[0]
    return row


def _archive_pixels(app, name: str, meta, archive: dict, payload: dict, split: str, index: int) -> np.ndarray:
    from cbmir.ingest.sources import open_source
    from cbmir.ingest.sources.pixels import as_rgb, load_image

    path, opts = str(archive.get("path", "")), dict(archive.get("options") or {})

    def build():
        if not Path(path).exists():
            raise CbmirError(f"collection {name!r}: its archive {path} is no longer there; put it back (or "
                             "re-ingest the moved archive with --recreate) to show its images")
        return open_source(path, int(meta.size), **opts), threading.Lock()

    src, lock = app.cached(("archive", name, path, repr(sorted(opts.items()))), build)
    # the point's file by its path (archive point ids are hashes of the item key, not positions)
    by_path = app.cached(("archive-items", name, path, split),
                         lambda: {it.source_path: it for it in (src.items.get(split) or [])})
    item = by_path.get(payload.get("source_path"))
    if item is None:
        raise CbmirError(f"collection {name!r}: the archive {path} changed since ingest ({split} item "
                         f"{payload.get('source_path')!r} is no longer there); sync it (`cbmir ingest`) or "
                         "re-ingest with --recreate")
    with lock:
        if meta.is_3d:
            vol, _ = src.load_item(item)
            return np.asarray(vol)
        arr, _ = load_image(item.files[0], src.rule, max_pixels=src.max_pixels)
    return as_rgb(arr)


def render_png(pixels: np.ndarray, is_3d: bool, *, size: int = DEFAULT_SIZE, view: str = "middle") -> bytes:
    """PNG bytes of :func:`display_image` fitted into ``size x size`` (:func:`fit_picture`).

    Raises:
        CbmirError: size out of range; unknown or inapplicable view.
    """
    size = check_size(size)
    return png_bytes(fit_picture(display_image(pixels, is_3d, view), size))


def point_png(app, name: str, pid: int, *, size: int = DEFAULT_SIZE, view: str = "middle") -> bytes:
    """PNG of stored point ``pid`` (:func:`point_pixels`, :func:`render_png`); size and view are checked
    before anything is read."""
    size = check_size(size)
    if view not in VIEWS:
        raise CbmirError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")
    pixels, is_3d = point_pixels(app, name, pid)
    return render_png(pixels, is_3d, size=size, view=view)


def gallery_png(app, answer, *, query_pixels: np.ndarray | None = None, view: str = "middle",
                tile: int = 160) -> bytes:
    """The first query of ``answer`` (:class:`cbmir.app.searching.SearchResponse`) and its top-k as one
    PNG (:func:`cbmir.evaluation.pictures.draw_gallery`): the query (its stored image, or ``query_pixels`` for
    a file / image query; a blank tile for a vector), then each hit with rank, class name, score and ✓ (same
    label as the query) / ✗.

    Args:
        query_pixels: pixels of a non-stored query (as :func:`point_pixels` returns them).
        view: how volumes are shown (:data:`VIEWS`).
        tile: side of each picture in pixels (bounded like :func:`check_size`).
    """
    tile = check_size(tile)
    q, hits = answer.queries[0], answer.hits[0]
    is_3d = bool(app.store.meta(answer.collection).is_3d)
    if q.kind == "point":
        query_pixels, _ = point_pixels(app, answer.collection, q.point_id)
    what = (f"{q.split} row {q.index}" if q.kind == "point" else q.kind)
    row = [query_tile(None if query_pixels is None else display_image(query_pixels, is_3d, view), what=what,
                      label=q.label, class_name=q.class_name)]
    row += [hit_tile(display_image(point_pixels(app, answer.collection, h.point_id)[0], is_3d, view), rank=h.rank,
                     split=h.split, index=h.index, label=h.label, class_name=h.class_name, score=h.score,
                     query_label=q.label) for h in hits]
    title = f"{answer.collection}: top-{answer.k} of {answer.database_split} ({answer.distance})"
    return png_bytes(draw_gallery([row], title, tile=tile))

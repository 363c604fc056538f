"""Images of stored points and of search answers: what a person looks at.

* :func:`point_pixels` — the pixels of one stored point, read from its source: the MedMNIST row (the
  dataset file in ``settings.data_dir``), or the archive file (the archive recorded in the collection
  metadata at ingest, ``extra["archive"]``, reopened with the same options, so the same pixel rules and
  the DICOM window apply). The caller names a point id only; no path ever comes from a request.
* :func:`display_image` — a 2D view: the image itself, or for a volume its middle axial slice or an
  axial montage.
* :func:`render_png` — that view as PNG bytes, fitted into ``size x size`` (bounded:
  :data:`MIN_SIZE`..:data:`MAX_SIZE`).
* :func:`gallery_png` — a query and its top-k as one picture (class names, scores, ✓/✗), for
  ``cbmir search --gallery``.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import numpy as np

from cbmir.app.collections import require_collection
from cbmir.core.errors import CbmirError, NotFoundError

#: bounds and default of the side of a rendered image, in pixels
MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 16, 1024, 256
#: views of a volume
VIEWS = ("middle", "montage")
#: most slices in a montage
MONTAGE_SLICES = 16


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
    from cbmir.ingest.medmnist_data import MEDMNIST_FLAGS, open_medmnist
    from cbmir.ingest.sources.pixels import as_rgb

    if meta.dataset not in MEDMNIST_FLAGS:
        raise CbmirError(f"collection {name!r} records no archive to read images from (ingested before "
                         "archive roots were recorded); re-ingest it with --recreate to show its images")

    src = app.cached(("medmnist", meta.dataset, int(meta.size)),
                     lambda: open_medmnist(meta.dataset, meta.size, app.settings.data_dir, download=False))
    if not 0 <= index < src.split_size(split):
        raise NotFoundError(f"collection {name!r}: {split} row {index} is not in {src.path.name}")
    row = app.cached(("medmnist-rows", meta.dataset, int(meta.size), split), lambda: _row_reader(src, split))
    img = np.array(row(index))
    if not meta.is_3d and img.ndim == 2:
        img = img[..., None]
    return img if meta.is_3d else as_rgb(img)


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


def display_image(pixels: np.ndarray, is_3d: bool, view: str = "middle") -> np.ndarray:
    """A 2D uint8 picture of ``pixels``: ``(H, W, 3)`` as is; a volume ``(D, H, W)`` as its middle slice
    (``view="middle"``) or a montage of up to :data:`MONTAGE_SLICES` evenly spaced axial slices in a
    near-square grid, row by row from the first slice (``view="montage"``).

    Raises:
        CbmirError: an unknown view; ``montage`` for a 2D image.
    """
    if view not in VIEWS:
        raise CbmirError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")
    if not is_3d:
        if view != "middle":
            raise CbmirError("view 'montage' applies to 3D collections; this one holds 2D images: use view=middle")
        return pixels
    d = pixels.shape[0]
    if view == "middle":
        return pixels[d // 2]
    n = min(d, MONTAGE_SLICES)
    picks = np.unique(np.linspace(0, d - 1, n).round().astype(int))
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    h, w = pixels.shape[1:]
    out = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, z in enumerate(picks):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[z]
    return out


def check_size(size) -> int:
    """``size`` as an int in :data:`MIN_SIZE`..:data:`MAX_SIZE`, else CbmirError naming the range."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise CbmirError(f"image size {size!r} is out of range; give an integer from {MIN_SIZE} to {MAX_SIZE}")
    return int(size)


def fit_picture(img: np.ndarray, size: int) -> "object":
    """A PIL image of uint8 ``img`` (``(H, W)`` or ``(H, W, 3)``) scaled so that its longer side is
    ``size`` (aspect ratio kept): nearest-neighbour when enlarging (each stored pixel stays a visible
    square), Lanczos when shrinking."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    h, w = img.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)
    return im


def render_png(pixels: np.ndarray, is_3d: bool, *, size: int = DEFAULT_SIZE, view: str = "middle") -> bytes:
    """PNG bytes of :func:`display_image` fitted into ``size x size`` (:func:`fit_picture`).

    Raises:
        CbmirError: size out of range; unknown or inapplicable view.
    """
    size = check_size(size)
    buf = io.BytesIO()
    fit_picture(display_image(pixels, is_3d, view), size).save(buf, format="PNG")
    return buf.getvalue()


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
    PNG: the query (its stored image, or ``query_pixels`` for a file / image query; a blank tile for a
    vector), then each hit with rank, class name, score and ✓ (same label as the query) / ✗.

    Args:
        query_pixels: pixels of a non-stored query (as :func:`point_pixels` returns them).
        view: how volumes are shown (:data:`VIEWS`).
        tile: side of each picture in pixels (bounded like :func:`check_size`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tile = check_size(tile)
    q, hits = answer.queries[0], answer.hits[0]
    is_3d = bool(app.store.meta(answer.collection).is_3d)
    if q.kind == "point":
        query_pixels, _ = point_pixels(app, answer.collection, q.point_id)
    pictures = [None if query_pixels is None else display_image(query_pixels, is_3d, view)]
    pictures += [display_image(point_pixels(app, answer.collection, h.point_id)[0], is_3d, view) for h in hits]
    known = q.label is not None and q.label >= 0
    what = (f"{q.split} row {q.index}" if q.kind == "point" else q.kind)
    titles = [f"query: {what}\n" + (f"{q.class_name} (label {q.label})" if known else "label unknown")]
    for h in hits:
        mark = (" ✓" if h.label == q.label else " ✗") if known else ""
        titles.append(f"#{h.rank} {h.split} row {h.index}{mark}\n{h.class_name or 'unlabelled'}  {h.score:.4f}")
    n = len(pictures)
    inch = tile / 100
    fig = Figure(figsize=(n * inch, inch + 0.6), dpi=100)
    for i, (pic, title) in enumerate(zip(pictures, titles)):
        ax = fig.add_subplot(1, n, i + 1)
        ax.set_axis_off()
        if pic is not None:
            ax.imshow(np.asarray(fit_picture(pic, tile)), cmap="gray", vmin=0, vmax=255)
        else:
            ax.text(0.5, 0.5, "vector query\n(no image)", ha="center", va="center", fontsize=8)
        color = "black" if i == 0 or not known else ("green" if hits[i - 1].label == q.label else "red")
        ax.set_title(title, fontsize=7, color=color)
    fig.suptitle(f"{answer.collection}: top-{answer.k} of {answer.database_split} ({answer.distance})", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

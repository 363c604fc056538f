"""Search: one request type for every entry point, and the one function that answers it.

Query kinds (exactly one per request): stored points (``points`` as ``(split, index)`` pairs, or
``point_ids``), float32 ``vectors``, in-memory ``images`` (embedded with the collection's own
extractor) or image/volume ``files`` (read with the ingest pixel rules, then embedded).

The rules, in one place (the CLI, :class:`cbmir.client.SearchClient`, the grid and the HTTP service all
call :func:`search`):

* **exclude-self**: a stored query's own point is left out of its results (by point id, not by score: an
  identical copy still shows) unless ``exclude_self=False``. It applies only to stored-point queries;
  ``exclude_self=True`` with any other query kind is refused.
* **k**: an integer from 1 to the number of database points the search may return (after the filter, and
  minus the query itself when it is excluded); anything else is refused, naming the valid range.
* **images**: 2D collections take ``(H, W)``, ``(H, W, C)`` (C = 1..4), ``(B, H, W, C)`` or a grey batch
  ``(B, H, W)`` (MedMNIST's own layout); 3D collections take ``(D, H, W)`` or ``(B, D, H, W)``; any numeric
  dtype (pixel rules of :func:`cbmir.ingest.embedder.prepare_images`).
* **distance**: a request that names a distance other than the collection's is refused (a cosine collection
  never silently answers a Euclidean request).
* **filter**: payload equality / any-of (:mod:`cbmir.search.filters`), applied inside the exact search.
* **mode**: a collection created for approximate search (HNSW / quantization,
  :mod:`cbmir.search.index_config`) is searched in its mode (``ef`` overrides its HNSW query-time candidate
  list) unless ``exact=True``; the response names the mode (``search_mode``) and notes that it is approximate.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cbmir.app.collections import class_name, class_names, require_collection
from cbmir.core.errors import CbmirError, NotFoundError


@dataclass(frozen=True)
class FileOptions:
    """How query files are read (pass what the collection was ingested with): pixel ``intensity`` rule,
    ``window`` ``"CENTER,WIDTH"``, volume ``slice_axis``, 2D ``fit`` (``stretch | pad | crop``), and the
    decode limits ``max_pixels`` per image / ``max_voxels`` per volume (None: the ingest defaults)."""

    intensity: str | None = None
    window: str | None = None
    slice_axis: int | None = None
    fit: str = "stretch"
    max_pixels: int | None = None
    max_voxels: int | None = None


@dataclass
class SearchRequest:
    """One search.

    Attributes:
        collection: collection name.
        points: stored query points as ``(split, index)`` pairs. point_ids: stored query points by id.
        vectors: float32 ``(Q, dim)`` or ``(dim,)``. images: array(s), see the module rules.
        files: paths of image / volume files (PNG, JPEG, TIFF, BMP, DICOM; NIfTI / ``.npy`` for 3D).
        k: results per query. database_split: the split searched (``train`` in the study's protocol).
        filter: payload filter, e.g. ``{"label": [0, 2]}``. exclude_self: None = the default rule.
        distance: the distance the caller expects (None: the collection's).
        weights: local weights file/directory for embedding images/files (default: the model's source).
        file_options: :class:`FileOptions`.
        exact: True: exact search even on an approximate collection. ef: HNSW query-time ``ef`` (None: the
            collection's).
    """

    collection: str
    points: Sequence[tuple[str, int]] | None = None
    point_ids: Sequence[int] | None = None
    vectors: Any = None
    images: Any = None
    files: Sequence[str | os.PathLike] | None = None
    k: int = 5
    database_split: str = "train"
    filter: Mapping[str, Any] | None = None
    exclude_self: bool | None = None
    distance: str | None = None
    weights: str | None = None
    file_options: FileOptions = field(default_factory=FileOptions)
    exact: bool | None = None
    ef: int | None = None


@dataclass
class Hit:
    """One retrieved database point, in rank order (``rank`` from 1).

    ``score`` is the cosine similarity (higher is closer) or the Euclidean distance (lower is closer), as
    the collection's distance. ``class_name`` is None for an unlabelled point (label -1).
    """

    rank: int
    point_id: int
    split: str
    index: int
    label: int
    class_name: str | None
    score: float
    payload: dict


@dataclass
class QueryInfo:
    """What was asked: ``kind`` (``point | vector | image | file``); for a stored point its ``split``,
    ``index``, ``point_id``, ``label`` and ``class_name``; for a file its ``source`` path."""

    kind: str
    split: str | None = None
    index: int | None = None
    point_id: int | None = None
    label: int | None = None
    class_name: str | None = None
    source: str | None = None


@dataclass
class SearchResponse:
    """The answer: one :class:`QueryInfo` and one list of :class:`Hit` per query, in query order.

    ``excluded_self`` tells whether stored queries were left out of their own results; ``notes`` holds
    one-line warnings (an all-zero query vector; a collapsed collection whose vectors barely differ).
    ``search_mode`` is ``exact`` or the approximate mode
    used (e.g. ``hnsw+int8 (ef=128)``).
    """

    collection: str
    k: int
    distance: str
    database_split: str
    filter: dict | None
    excluded_self: bool
    queries: list[QueryInfo]
    hits: list[list[Hit]]
    notes: list[str] = field(default_factory=list)
    search_mode: str = "exact"

    def to_dict(self) -> dict:
        """JSON-ready form (the CLI's ``--json`` and the service's body)."""
        return asdict(self)


def _one_kind(req: SearchRequest) -> str:
    given = [k for k, v in (("points", req.points), ("point_ids", req.point_ids), ("vectors", req.vectors),
                            ("images", req.images), ("files", req.files)) if v is not None]
    if len(given) != 1:
        raise CbmirError("give exactly one query: stored point(s), point id(s), vector(s), image(s) or file(s)"
                         + (f"; got {', '.join(given)}" if given else ""))
    return given[0]


def _check_k(k, n_db: int, where: str, minus_self: bool) -> int:
    """``k`` as an int in 1..n (n = the database points a query may get back)."""
    n = n_db - (1 if minus_self else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise CbmirError(f"k {k!r} is not an integer; give k between 1 and {max(n, 1)}")
    if k < 1 or k > n:
        why = ", the query itself excluded" if minus_self else ""
        raise CbmirError(f"k {k} is out of range: the database has {n} point(s) ({where}{why}); "
                         f"give k between 1 and {n}" if n >= 1 else
                         f"k {k}: the database has no point to return ({where}{why})")
    return int(k)


def _stored_queries(store, name: str, req: SearchRequest, kind: str):
    """``(vectors, infos)`` of stored query points (by ``(split, index)`` or by id)."""
    from cbmir.core.splits import SPLITS
    from cbmir.search.schema import point_id, split_and_index, uses_key_ids

    if kind == "point_ids":
        refs = []
        for pid in req.point_ids:
            try:
                refs.append(split_and_index(int(pid)))
            except (KeyError, ValueError, TypeError):
                raise NotFoundError(f"point id {pid!r} is not a point id of collection {name!r}") from None
    else:
        refs = [(str(sp), ix) for sp, ix in req.points]
    vecs, infos = [], []
    meta = store.meta(name)
    names = class_names(meta)
    keyed = uses_key_ids(meta)  # archive rows are 40-bit hashes of the file's key, not positions
    for split, index in refs:
        if split not in SPLITS:
            raise CbmirError(f"unknown query split {split!r}; valid: {', '.join(SPLITS)}")
        n = store.count(name, split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
                0 <= index < (1 << 40 if keyed else n)):
            raise NotFoundError(f"query index {index!r} is out of range: collection {name!r} has {n} {split} "
                                f"point(s)" + (f"; valid 0..{n - 1}" if n and not keyed else ""))
        try:
            v, pay = store.get_points(name, split, [int(index)])
        except CbmirError:
            raise NotFoundError(f"query index {index}: collection {name!r} has no {split} point with this index "
                                "(an archive's points are indexed by a hash of their path: take the index from a "
                                "search result, or give the file's path, --query-path)") from None
        vecs.append(v[0])
        label = int(pay[0].get("label", -1))
        infos.append(QueryInfo("point", split=split, index=int(index), point_id=point_id(split, int(index)),
                               label=label, class_name=class_name(names, label)))
    return np.stack(vecs), infos


def _embedded_queries(app, meta, req: SearchRequest, kind: str):
    """``(vectors, infos)`` of image arrays or files, embedded with the collection's extractor."""
    from cbmir.ingest.embedder import prepare_images

    if kind == "files":
        images, infos = _read_files(meta, req)
    else:
        x = np.asarray(req.images) if not isinstance(req.images, np.ndarray) else req.images
        if not meta.is_3d and x.ndim == 3 and x.shape[-1] > 4:
            x = x[..., None]  # a grey batch (B, H, W): MedMNIST's own layout
        images = prepare_images(x, size=meta.size, is_3d=meta.is_3d, fit=req.file_options.fit)
        infos = [QueryInfo("image") for _ in range(len(images))]
    return app.embedder(meta, weights=req.weights).embed(images), infos


def _read_files(meta, req: SearchRequest):
    from cbmir.ingest.sources import load_query

    if isinstance(req.files, (str, os.PathLike)):
        raise CbmirError("files must be a list of paths")
    out, infos = [], []
    opts = req.file_options
    for f in req.files:
        p = Path(f).expanduser()
        if p.is_dir():
            raise CbmirError(f"query file {f} is a directory; give one image / volume file")
        if not p.exists():
            raise CbmirError(f"query file {f}: not found; give an existing image / volume file")
        try:
            limits = {k: v for k, v in (("max_pixels", opts.max_pixels), ("max_voxels", opts.max_voxels)) if v}
            out.append(load_query(p, meta, intensity=opts.intensity, window=opts.window,
                                  slice_axis=opts.slice_axis, fit=opts.fit, **limits))
        except CbmirError as exc:
            raise CbmirError(exc if str(f) in str(exc) else f"query file {f}: {exc}") from None
        infos.append(QueryInfo("file", source=str(f)))
    return np.concatenate(out), infos


def _hits(store, name: str, names: dict, res, split: str) -> list[list[Hit]]:
    from cbmir.search.schema import point_id

    flat = np.unique(res.indices).tolist()
    _, pays = store.get_points(name, split, flat, with_vectors=False)
    by_row = dict(zip(flat, pays))
    out = []
    for ri, rs in zip(res.indices, res.scores):
        row = []
        for rank, (i, s) in enumerate(zip(ri.tolist(), rs.tolist()), 1):
            pay = by_row[i]
            label = int(pay.get("label", -1))
            row.append(Hit(rank=rank, point_id=point_id(split, i), split=split, index=int(i), label=label,
                           class_name=class_name(names, label), score=float(s), payload=pay))
        out.append(row)
    return out


def search(app, req: SearchRequest) -> SearchResponse:
    """Answer one :class:`SearchRequest` with the exact top-k (ties broken by lower database index).

    Args:
        app: the :class:`cbmir.app.context.App` (store, settings, embedders).
        req: the request.

    Returns:
        :class:`SearchResponse`.

    Raises:
        CbmirError: an unknown collection, split, query index or point id; not exactly one query kind;
            ``k`` out of range; a malformed filter or one that no database point matches; a distance
            other than the collection's; ``exclude_self=True`` for a query that is not a stored point;
            an image or file the collection cannot take (2D vs 3D, unreadable, NaN pixels).
    """
    from cbmir.search.diagnostics import zero_query_warning, zero_rows
    from cbmir.search.filters import selection

    store = app.store
    name = require_collection(store, req.collection)  # unknown: NotFoundError naming the existing ones
    meta = store.meta(name)
    if req.distance is not None and req.distance != meta.distance:
        raise CbmirError(f"collection {name!r} ranks by {meta.distance} distance, not {req.distance}: drop "
                         f"the distance option, or use the {req.distance} collection of this dataset and model")
    kind = _one_kind(req)
    sel = selection(req.database_split, req.filter)
    stored = kind in ("points", "point_ids")
    if req.exclude_self and not stored:
        raise CbmirError("exclude-self applies to stored query points (they have an id); an image, file or "
                         "vector query has none")
    if stored:
        vectors, infos = _stored_queries(store, name, req, kind)
    elif kind == "vectors":
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused by the store
            vectors = np.asarray(req.vectors, dtype=np.float32)
        infos = [QueryInfo("vector") for _ in range(1 if vectors.ndim == 1 else len(vectors))]
    else:
        vectors, infos = _embedded_queries(app, meta, req, kind)
    n_db = store.count(name, sel)
    if n_db == 0:
        raise CbmirError(f"no database point of collection {name!r} is in {sel}: "
                         + ("no point matches the filter" if sel.match else "ingest this split first"))
    exclude = stored and req.exclude_self is not False
    excl = None
    if exclude:
        in_db = [i.split == sel.split and _in_selection(store, name, i, sel) for i in infos]
        excl = [[i.point_id] if hit else [] for i, hit in zip(infos, in_db)]
    k = _check_k(req.k, n_db, str(sel), minus_self=bool(excl and any(excl)))
    mode, mode_note = _search_mode(meta, req)
    res = store.search(name, vectors, k, split=sel, exclude_ids=excl, exact=req.exact, ef=req.ef)
    hits = _hits(store, name, class_names(meta), res, sel.split)
    notes = [n for n in (zero_query_warning(zero_rows(vectors), len(vectors), "query"),
                         app.collapse_warning(name, sel.split), mode_note) if n]
    return SearchResponse(collection=name, k=k, distance=meta.distance, database_split=sel.split,
                          filter={f: list(v) for f, v in sel.match} or None, excluded_self=bool(exclude),
                          queries=infos, hits=hits, notes=notes, search_mode=mode)


def _search_mode(meta, req: SearchRequest) -> tuple[str, str | None]:
    """``(mode name, note)`` of a search: ``("exact", None)``, or the approximate mode and a one-line note.

    Raises:
        CbmirError: ``ef`` for a collection without an HNSW index, or not a positive integer.
    """
    cfg = meta.index_config()
    if req.ef is not None and (cfg.index != "hnsw" or req.exact):
        raise CbmirError(f"ef {req.ef} applies to an HNSW collection searched approximately; collection "
                         f"{req.collection!r} is searched "
                         f"{'exactly' if req.exact or not cfg.approximate else cfg.name}")
    if req.ef is not None and (isinstance(req.ef, bool) or not isinstance(req.ef, (int, np.integer)) or req.ef < 1):
        raise CbmirError(f"ef {req.ef!r}: must be an integer >= 1")
    if not cfg.approximate or req.exact:
        return "exact", None
    cfg = cfg.with_ef(req.ef)
    mode = cfg.name + (f" (ef={cfg.ef})" if cfg.index == "hnsw" else "")
    return mode, (f"approximate search ({cfg.describe()}): hits may differ from the exact top-k; "
                  "ask for exact search to compare (--exact)")


def _in_selection(store, name: str, info: QueryInfo, sel) -> bool:
    """Whether a stored query point is one of the database points ``sel`` selects."""
    from cbmir.search.filters import matches

    if not sel.match:
        return True
    _, pay = store.get_points(name, info.split, [info.index], with_vectors=False)
    return matches(pay[0], sel)


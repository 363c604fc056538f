"""Single points of an archive collection: add files (or images) and delete points without a full sync.

The CLI (``cbmir add``, ``cbmir delete``), :class:`cbmir.client.SearchClient` and the HTTP service
(``POST /api/collections/{name}/points``, ``DELETE /api/collections/{name}/points/{id}``) call
:func:`add_points` and :func:`delete_points`.

Rules:

* Only collections with stable point ids (user archives, :func:`cbmir.search.schema.uses_key_ids`) take
  single items; a MedMNIST collection mirrors the official files and is refused.
* **A file of the collection's archive** (inside its folder, of a kind the archive reads) is embedded as
  that archive item, exactly as ``cbmir ingest`` would: its split and label come from the archive (a
  different ``label`` / ``split`` / ``meta`` is refused); when the collection then equals the archive,
  its recorded fingerprint is brought up to date.
* **Any other file or image** becomes an *added* point (``origin: added``): its key is the file's
  resolved path (or the given ``key``), its ``label`` a class of the collection (name or id; none:
  unlabelled), its ``split`` ``train`` (the database) unless given, with ``meta`` as extra payload
  fields. ``cbmir ingest`` never deletes added points. Adding the same key again re-embeds it only when
  its bytes changed (else just updates its payload).
* Deleting a point of an archive file that is still in the archive is allowed, with a note: the next
  ``cbmir ingest`` adds it back.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cbmir.core.errors import CbmirError, NotFoundError

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")


@dataclass
class NewPoint:
    """One point to add.

    Attributes:
        file: an image / volume file, read with the pixel rules the collection was ingested with.
        image: or an image array (layouts of :func:`cbmir.ingest.embedder.prepare_images`); needs ``key``.
        key: stable key the point id is hashed from (default: the file's resolved path).
        label: a class of the collection, by name or id (None: unlabelled, -1).
        split: ``train`` (the database; default), ``test`` or ``val``.
        meta: extra payload fields (names: letters, digits, ``_ . -``; not cbmir's own).
    """

    file: str | os.PathLike | None = None
    image: Any = None
    key: str | None = None
    label: int | str | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class AddResult:
    """Outcome of :func:`add_points`: one ``{point_id, split, index, source_path, status}`` per input
    (``status``: ``added``, ``updated`` (re-embedded), ``relabelled`` (payload only), ``unchanged``, or
    ``unreadable`` for an archive file that does not decode: ``point_id`` None),
    ``embedded`` (images that went through the extractor) and one-line ``notes``."""

    collection: str
    points: list[dict]
    embedded: int
    notes: list[str] = field(default_factory=list)


@dataclass
class DeleteResult:
    """Outcome of :func:`delete_points`: the ``deleted`` point ids, their ``source_paths``, and ``notes``."""

    collection: str
    deleted: list[int]
    source_paths: list[str]
    notes: list[str] = field(default_factory=list)


def _keyed_meta(store, name: str):
    from cbmir.search.schema import uses_key_ids

    meta = store.meta(name)  # unknown: CbmirError naming the existing collections
    if not uses_key_ids(meta):
        raise CbmirError(
            f"collection {name!r} has row-position point ids (a MedMNIST dataset, or an archive ingested by an "
            "older cbmir): single points cannot be added or deleted. For an archive, rebuild it once with "
            "`cbmir ingest ... --recreate`; a MedMNIST collection mirrors the official files.")
    return meta


def _archive_source(meta):
    """The collection's archive opened with its recorded options, or None (folder gone, no record)."""
    from cbmir.ingest.sources import open_source

    rec = (meta.extra or {}).get("archive") or {}
    if not rec.get("root") or not Path(rec["root"]).exists():
        return None
    opts = dict(rec.get("options") or {})
    kind = opts.pop("source", rec.get("kind"))
    return open_source(rec["root"], meta.size, source=kind, **opts)


def _inside(path: Path, root: str | None) -> bool:
    if not root:
        return False
    try:
        path.resolve().relative_to(Path(root))
        return True
    except ValueError:
        return False


def class_label(meta, label) -> tuple[int, str | None]:
    """``(label id, class name)`` of ``label`` (a class name or id of collection ``meta``; None: -1).

    Raises:
        CbmirError: not a class of the collection (names its classes).
    """
    names = [str(n) for n in ((meta.extra or {}).get("class_names") or [])]
    if label is None or (isinstance(label, (int, np.integer)) and int(label) == -1):
        return -1, None
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < len(names):
        return int(label), names[int(label)]
    if isinstance(label, str) and label in names:
        return names.index(label), label
    if isinstance(label, str) and label.lstrip("-").isdigit():
        return class_label(meta, int(label))
    have = ", ".join(f"{i}={n}" for i, n in enumerate(names)) or "none: an unlabelled collection"
    raise CbmirError(f"label {label!r} is not a class of the collection (classes: {have}); to make a new class, "
                     "add a class folder (or manifest label) to the archive and run `cbmir ingest`")


def _check_point(pt: NewPoint) -> str:
    from cbmir.core.splits import SPLITS
    from cbmir.ingest.sources.archive import RESERVED_PAYLOAD

    split = pt.split or "train"
    if split not in SPLITS:
        raise CbmirError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if (pt.file is None) == (pt.image is None):
        raise CbmirError("give each new point either a file or an image array")
    if pt.image is not None and not pt.key:
        raise CbmirError("an image array needs a key (a stable name the point id is hashed from)")
    for k in pt.meta:
        if not isinstance(k, str) or not _FIELD.fullmatch(k) or k in RESERVED_PAYLOAD:
            raise CbmirError(f"payload field {k!r} cannot be set: use letters, digits, '_', '.', '-', and none of "
                             f"cbmir's own fields ({', '.join(RESERVED_PAYLOAD)})")
    return split


def add_points(app, collection: str, points: Sequence[NewPoint], *, weights: str | None = None) -> AddResult:
    """Add (or re-add) files or images to ``collection`` (module docstring rules); returns :class:`AddResult`.

    Args:
        app: the :class:`~cbmir.app.context.App`.
        weights: a local weights file or directory (default: the model's own source); must be the weights
            the collection was built with.

    Raises:
        CbmirError: a collection without stable ids; a missing or unreadable file; a label that is not a
            class of the collection; an unknown split; a reserved payload field; an archive file given
            another label / split / payload than the archive's; other weights than the collection's.
    """
    from cbmir.ingest.job import IngestReport
    from cbmir.ingest.sync import apply_sync, plan_sync, record_if_in_sync

    store = app.store
    meta = _keyed_meta(store, collection)
    root = ((meta.extra or {}).get("archive") or {}).get("root")
    source = None
    archive_keys: dict[str, set[str]] = {}
    order: list[tuple[str, Any]] = []  # ("archive", (split, item)) | ("added", (split, NewPoint))
    for pt in points:
        split = _check_point(pt)
        if pt.file is not None:
            path = Path(pt.file).expanduser()
            if not path.is_file():
                raise CbmirError(f"file {pt.file}: not found (or not a file); give an existing image / volume file")
            if _inside(path, root):
                source = source or _archive_source(meta)
                hit = source.find_item(path) if source is not None else None
                if hit is not None:
                    _same_as_archive(pt, hit, meta)
                    archive_keys.setdefault(hit[0], set()).add(hit[1].key)
                    order.append(("archive", hit))
                    continue
        order.append(("added", (split, pt)))
    embedder = app.embedder(meta, weights=weights)
    results: dict[int, dict] = {}
    embedded = 0
    notes: list[str] = []
    status: dict[tuple[str, str], str] = {}
    if archive_keys:
        plan = plan_sync(source, store, collection, tuple(archive_keys), keys=archive_keys)
        status = plan.status
        report = IngestReport(collection=collection, meta=meta)
        apply_sync(plan, source, embedder, store, collection, meta, batch_size=app.settings.batch_size,
                   progress=False, report=report, mark_pending=False)
        embedded += sum(report.written.values())
        paths = {it.source_path for kind, (_, it) in order if kind == "archive"}
        notes += [f"unreadable, not added: {p}" for p in source.problems if p.path in paths]
        if record_if_in_sync(store, collection, meta, source):
            notes.append("the collection now equals its archive: its recorded fingerprint was updated")
    added = [(i, sp, pt) for i, (kind, (sp, pt)) in enumerate(order) if kind == "added"]
    if added:
        embedded += _add_external(app, store, collection, meta, embedder, added, results)
    out = []
    for i, (kind, (sp, obj)) in enumerate(order):
        if kind == "added":
            out.append(results[i])
            continue
        pid = _archive_point(store, collection, sp, obj.key)
        out.append({"point_id": pid, "split": sp, "index": None if pid is None else pid & ((1 << 40) - 1),
                    "source_path": obj.source_path,
                    "status": status.get((sp, obj.key), "unchanged") if pid is not None else "unreadable"})
    return AddResult(collection=collection, points=out, embedded=embedded, notes=notes)


def _same_as_archive(pt: NewPoint, hit, meta) -> None:
    split, item = hit
    problems = []
    if pt.split not in (None, split):
        problems.append(f"its split is {split}")
    if pt.label is not None and class_label(meta, pt.label)[0] != item.label:
        problems.append(f"its label is {item.label_name!r}")
    if pt.meta:
        problems.append("its payload comes from the archive")
    if problems:
        raise CbmirError(f"{pt.file} is a file of the collection's archive: {'; '.join(problems)} (move it to "
                         "another class folder, or edit the manifest, and run `cbmir ingest`)")


def _archive_point(store, name: str, split: str, key: str) -> int | None:
    from cbmir.search.filters import Selection

    for ids, _ in store.scroll_payloads(name, Selection(split, (("item_key", (key,)),))):
        if ids:
            return int(ids[0])
    return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_external(app, store, name: str, meta, embedder, added, results: dict) -> int:
    """Embed and upsert the points that are not archive files; fills ``results``; returns images embedded."""
    from cbmir.search.schema import make_payload, point_id, split_and_index

    todo = []  # (input position, split, index, pixels (1, ...), payload, stored payload of this id or None)
    stale: list[int] = []
    for i, split, pt in added:
        pixels, key, source_path, digest, stat = _read_new(meta, pt)
        label, label_name = class_label(meta, pt.label)
        fields = {k: _json(v) for k, v in pt.meta.items()}
        ix = _free_index(store, name, split, key)
        pid = point_id(split, ix)
        existing = _find_key(store, name, key)
        stale += [p for p, _ in existing if split_and_index(p)[0] != split]  # the key given another split
        payload = make_payload(dataset=meta.dataset, split=split, index=ix, label=label, model=meta.model,
                               size=meta.size, image_id=f"{meta.dataset}/added/{key}",
                               extra={"source_path": source_path, "label_name": label_name, "source_kind": "added",
                                      "item_key": key, "origin": "added", "item_fields": sorted(fields), **fields,
                                      "content_sha256": digest, "stat_sha256": stat})
        todo.append((i, split, ix, pixels, payload, dict(existing).get(pid)))
    to_embed = [t for t in todo if t[5] is None or t[5].get("content_sha256") != t[4]["content_sha256"]]
    if to_embed:
        vecs = np.asarray(embedder.embed(np.concatenate([t[3] for t in to_embed])))
        for j, (_, split, ix, _, payload, _) in enumerate(to_embed):
            store.upsert(name, split, [ix], vecs[j:j + 1], [payload])
    embedded = {t[0] for t in to_embed}
    for i, split, ix, _, payload, prev in todo:
        if i in embedded:
            status = "added" if prev is None else "updated"
        elif prev != payload:
            store.set_payloads(name, [(point_id(split, ix), payload)])
            status = "relabelled"
        else:
            status = "unchanged"
        results[i] = {"point_id": point_id(split, ix), "split": split, "index": ix,
                      "source_path": payload["source_path"], "status": status}
    if stale:
        store.delete_points(name, stale)
    return len(to_embed)


def _read_new(meta, pt: NewPoint):
    """``(pixels (1, ...), key, source_path, content_sha256, stat_sha256)`` of a point that is no archive
    file, read with the collection's recorded pixel rules."""
    from cbmir.ingest.embedder import prepare_images
    from cbmir.ingest.sources import load_query

    opts = ((meta.extra or {}).get("archive") or {}).get("options") or {}
    if pt.file is None:
        arr = np.asarray(pt.image)
        pixels = prepare_images(arr, size=meta.size, is_3d=meta.is_3d, fit=opts.get("fit", "stretch"))
        if len(pixels) != 1:
            raise CbmirError(f"point {pt.key!r}: give one image per new point, got {len(pixels)}")
        return pixels, pt.key, pt.key, _digest(repr(arr.shape).encode() + arr.tobytes()), None
    path = Path(pt.file).expanduser().resolve()
    data = path.read_bytes()
    try:
        pixels = load_query(path, meta, intensity=opts.get("intensity"), window=opts.get("window"),
                            slice_axis=opts.get("slice_axis"), fit=opts.get("fit", "stretch"))
    except CbmirError as exc:
        raise CbmirError(exc if str(pt.file) in str(exc) else f"file {pt.file}: {exc}") from None
    return pixels, pt.key or str(path), str(path), _digest(f"{len(data)}\n".encode() + data), _stat(path)


def _json(v):
    from cbmir.ingest.sources.archive import json_value

    return json_value(v)


def _stat(path: Path) -> str:
    st = path.stat()
    return _digest(repr([str(path), st.st_size, st.st_mtime_ns]).encode())


def _find_key(store, name: str, key: str) -> list[tuple[int, dict]]:
    """Stored points whose ``item_key`` is ``key``, in any split."""
    from cbmir.core.splits import SPLITS
    from cbmir.search.filters import Selection

    out = []
    for sp in SPLITS:
        for ids, pays in store.scroll_payloads(name, Selection(sp, (("item_key", (key,)),))):
            out += list(zip(map(int, ids), pays))
    return out


def _free_index(store, name: str, split: str, key: str) -> int:
    """The first probe of ``key`` in ``split`` that is free or holds ``key`` (a point lookup per probe)."""
    from cbmir.search.schema import MAX_PROBES, key_index, point_id

    for probe in range(MAX_PROBES):
        ix = key_index(key, probe)
        got = store.points_by_id(name, [point_id(split, ix)], with_vectors=False)
        if not got or next(iter(got.values()))[1].get("item_key") == key:
            return ix
    raise CbmirError(f"no free point id for {key!r} after {MAX_PROBES} probes")


def find_points(store, name: str, path: str) -> list[tuple[int, dict]]:
    """Stored points of ``path``: its ``source_path`` as given, relative to the collection's archive folder,
    or resolved (added files); ``[(point id, payload), ...]`` over every split."""
    from cbmir.core.splits import SPLITS
    from cbmir.search.filters import Selection

    meta = store.meta(name)
    root = ((meta.extra or {}).get("archive") or {}).get("root")
    p = Path(path).expanduser()
    cands = {str(path), p.as_posix()}
    if p.is_absolute() or p.exists():
        cands.add(str(p.resolve()))
        if _inside(p, root):
            cands.add(p.resolve().relative_to(Path(root)).as_posix())
    out = []
    for sp in SPLITS:
        sel = Selection(sp, (("source_path", tuple(sorted(cands))),))
        for ids, pays in store.scroll_payloads(name, sel):
            out += list(zip(map(int, ids), pays))
    return out


def point_of_path(store, name: str, path: str, *, prefer_split: str | None = None) -> int:
    """The id of the one stored point of file ``path`` (:func:`find_points`); when the file is a point of
    several splits (a manifest may list it twice), the one of ``prefer_split``.

    Raises:
        CbmirError: no point has this path, or several and none in ``prefer_split``.
    """
    from cbmir.search.schema import split_and_index

    hits = [pid for pid, _ in find_points(store, name, path)]
    if len(hits) > 1:
        hits = [pid for pid in hits if split_and_index(pid)[0] == prefer_split] or hits
    if len(hits) != 1:
        raise CbmirError(f"no point of collection {name!r} has the path {path!r} (give it relative to the archive "
                         "folder, e.g. train/<class>/<file>)" if not hits else
                         f"{len(hits)} points of collection {name!r} have the path {path!r}; give --query-split")
    return hits[0]


def delete_points(app, collection: str, *, point_ids: Sequence[int] = (), paths: Sequence[str] = ()) -> DeleteResult:
    """Delete points of ``collection`` by id and/or by file path (:func:`find_points`).

    Raises:
        CbmirError: a collection without stable ids; nothing given; an id that is not a point of the
            collection, or a path no point has (nothing is deleted then).
    """
    from cbmir.ingest.sync import record_if_in_sync
    from cbmir.search.schema import split_and_index

    store = app.store
    meta = _keyed_meta(store, collection)
    if not point_ids and not paths:
        raise CbmirError("give the point(s) to delete: --point-id ID or --path REL")
    found: dict[int, dict] = {}
    for pid in point_ids:
        try:
            split_and_index(int(pid))
            got = store.points_by_id(collection, [int(pid)], with_vectors=False)
        except (KeyError, ValueError, TypeError, OverflowError):
            got = {}
        if not got:
            raise NotFoundError(f"point id {pid!r} is not a point of collection {collection!r}; nothing was deleted")
        found.update({k: v[1] for k, v in got.items()})
    for path in paths:
        hits = find_points(store, collection, path)
        if not hits:
            raise NotFoundError(f"no point of collection {collection!r} has the path {path!r} (an archive file's path "
                             "relative to the archive folder, or an added file's path); nothing was deleted")
        found.update(dict(hits))
    store.delete_points(collection, list(found))
    notes = []
    archive_points = [pay for pay in found.values() if pay.get("origin") == "archive"]
    if archive_points:
        source = _archive_source(meta)
        still = [pay["source_path"] for pay in archive_points if source is not None and any(
            it.key == pay.get("item_key") for it in source.items.get(pay.get("split"), []))]
        if still:
            notes.append(f"{len(still)} deleted point(s) are files still in the archive ({', '.join(still[:5])}): "
                         "the next `cbmir ingest` adds them back; remove the files to delete them for good")
        elif source is not None and record_if_in_sync(store, collection, meta, source):
            notes.append("the collection now equals its archive: its recorded fingerprint was updated")
    return DeleteResult(collection=collection, deleted=sorted(found),
                        source_paths=[str(p.get("source_path", "")) for _, p in sorted(found.items())], notes=notes)

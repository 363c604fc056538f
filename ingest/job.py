"""The ingest job: stream a dataset split by split, embed, upsert into one collection; resumable.

Re-running the same job is safe. MedMNIST: point ids are deterministic (split, row), so an upsert
overwrites; a split whose points are all stored is skipped; an interrupted split (a killed job, a
deleted point, a row refused earlier) is completed by embedding exactly its missing rows, read from
the first missing row on. User archives are *synced* (:mod:`cbmir.ingest.sync`): point ids come from
a stable hash of each file's key, and a re-run embeds only new and changed files, deletes the points
of removed ones and relabels moved ones. Every batch is one upsert; upserts run in a background thread while the
next batch is embedded (:mod:`cbmir.ingest.pipeline`), at most one pending, and all are acknowledged before
a split is reported done (errors of either stage propagate), so a job killed at any moment loses at
most the two batches in flight, which the re-run embeds again.

Vector rules (applied per row, reported in :class:`IngestReport` and by ``cbmir ingest``):

* **NaN / inf** features are never stored. The run stores every finite row, keeps going to the end
  of all splits, then raises :class:`~cbmir.core.errors.CbmirError` with the count and rows refused; the
  collection is incomplete (``cbmir verify`` fails) until a re-run with a fixed extractor or input
  embeds them.
* **All-zero** features (HOG of a constant image, a dead CNN activation) are stored as zeros and
  listed in ``IngestReport.zero_vectors``; with cosine distance their similarity to anything is 0
  (see :meth:`cbmir.search.store.VectorStore._prepare`), on every engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from cbmir.core.splits import SPLITS

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Batch, DatasetSource
from cbmir.ingest.pipeline import BackgroundWriter, prefetch
from cbmir.ingest.shards import Share, SharePlan
from cbmir.search.diagnostics import rows_text
from cbmir.search.index_config import IndexConfig
from cbmir.search.schema import (
    KEY_IDS,
    CollectionMeta,
    DamagedMetaError,
    collection_name,
    make_payload,
    uses_key_ids,
)
from cbmir.search.store import VectorStore

#: Suffix of the staging collection in which ``--recreate`` builds the new points (:func:`ingest`).
STAGING_SUFFIX = "__recreate"


@dataclass
class IngestReport:
    """What an ingest did: per split, points written, seconds spent and throughput.

    Attributes:
        collection: collection name.
        meta: the collection's metadata.
        written: points upserted per split in this run (0 when the split was already complete).
        seconds: wall-clock seconds per split (extraction + upsert).
        items_per_s: images (or volumes) per second per split.
        skipped: splits found complete and skipped.
        extra: for 3D embedders, ``slices`` (2D slices extracted per split) and ``slices_per_s``
            (slices per second per split, extraction + upsert).
        zero_vectors: per split, rows whose feature vector is all zeros (stored; cosine similarity 0).
        rejected: per split, rows whose feature vector had NaN/inf (not stored; the run then fails).
        resumed_from: per split, rows already stored when this run started (0 for a fresh split).
    """

    collection: str
    meta: CollectionMeta
    written: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    items_per_s: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    zero_vectors: dict[str, list[int]] = field(default_factory=dict)
    rejected: dict[str, list[int]] = field(default_factory=dict)
    resumed_from: dict[str, int] = field(default_factory=dict)


def build_meta(source: DatasetSource, embedder, *, distance: str = "cosine",
               index: IndexConfig | None = None) -> CollectionMeta:
    """Collection metadata of ``source`` embedded by ``embedder`` (records weights, preprocessing, the
    search mode ``index``, exact when None, and in ``extra["precision"]`` the forward-pass precision of torch
    extractors: ``fp32``, ``bf16-autocast``, ``fp16-autocast``).

    Raises:
        CbmirError: an approximate ``index`` for vectors above Qdrant's per-vector limit (chunked layout).
    """
    ident = embedder.identity()
    return CollectionMeta(
        dataset=source.name, size=int(source.size), model=ident["model"], backend=ident.get("backend", "torch"),
        dim=int(embedder.dim), distance=distance, weights=str(ident.get("weights", "none")),
        random_init=bool(ident.get("random_init", False)),
        preprocessing="; ".join(x for x in (str(ident.get("preprocessing", "")),
                                            str(getattr(source, "preprocessing", "") or "")) if x),
        is_3d=bool(source.is_3d), aggregation=getattr(embedder, "aggregation", "none"),
        extra=source_extra(source) | embedder_extra(embedder), input_size=ident.get("input_size"),
        index=index.to_meta() if index is not None else {},
    )


def embedder_extra(embedder) -> dict:
    """``{"precision": label}`` for an embedder whose extractor states the precision of its forward pass
    (:mod:`cbmir.ingest.extractors.precision`), else ``{}``."""
    precision = getattr(getattr(embedder, "extractor", None), "precision", None)
    return {"precision": str(precision)} if precision else {}


def source_extra(source: DatasetSource) -> dict:
    """``n_classes``, ``class_names`` (index = label), ``task`` (label task of sources that state one:
    MedMNIST's ``INFO[flag]["task"]``, read by :mod:`cbmir.evaluation.labels` to refuse multi-label data),
    ``split_sizes`` (rows per split of the source, so that evaluating an unfinished collection is refused:
    :func:`cbmir.ingest.sources.check_evaluable`), ``rows_may_be_skipped`` (a non-strict user archive skips
    unreadable files) and, for user archives, ``source_fingerprint`` (per split, see
    :meth:`cbmir.ingest.sources.archive.ArchiveSource.fingerprint`), ``point_ids`` (the id scheme) and
    ``archive`` (how to open the archive again: path, kind, resolved root and the :func:`open_source` options
    it was opened with — for syncs, ``cbmir add`` and the images of stored points); stored atomically with the
    metadata."""
    sizes = {}
    for sp in SPLITS:
        try:
            sizes[sp] = int(source.split_size(sp))
        except (KeyError, CbmirError):  # a source without this split
            continue
    extra = {"n_classes": int(getattr(source, "n_classes", 0)), "split_sizes": sizes,
             "class_names": [str(c) for c in (getattr(source, "class_names", None) or [])],
             "rows_may_be_skipped": getattr(source, "strict", True) is False}
    task = getattr(source, "task", None)
    if isinstance(task, str) and task:
        extra["task"] = task
    fp = getattr(source, "fingerprint", None)
    if callable(fp):
        extra["source_fingerprint"] = fp()
    if callable(getattr(source, "static_payload", None)):  # a user archive: synced, ids from item keys
        extra["point_ids"] = KEY_IDS
        extra["archive"] = {**source.reopen_spec(), "kind": source.kind,
                            "root": str(source.root.expanduser().resolve())}
    return extra


def check_fingerprint(name: str, stored: CollectionMeta, meta: CollectionMeta, source=None) -> None:
    """Raise :class:`CbmirError` when ``stored`` records a source fingerprint other than ``meta``'s (the
    archive changed since it was ingested). Collections without one (older, MedMNIST) are not checked."""
    if not _fingerprint_changed(stored, meta):
        return
    old, new = stored.extra["source_fingerprint"], meta.extra["source_fingerprint"]
    changed = sorted(sp for sp in set(old) | set(new) if old.get(sp) != new.get(sp))
    where = f" ({getattr(source, 'root', '')})" if getattr(source, "root", None) is not None else ""
    raise CbmirError(
        f"collection {name!r}: the source{where} changed since it was ingested (split(s) "
        f"{', '.join(changed)}: files added, removed, renamed, relabelled or modified, or another archive "
        f"of the same name); its stored points no longer match the rows. Re-run with --recreate to "
        f"rebuild it from the current source (or use --name for another collection).")


def _stored_rows(store: VectorStore, name: str, split: str, n: int) -> np.ndarray:
    """bool ``(n,)``: True where row ``i`` of ``split`` is already stored (payloads only, no vectors)."""
    present = np.zeros(n, dtype=bool)
    if store.count(name, split) == 0:
        return present
    idx, _, _ = store.fetch(name, split, with_vectors=False)
    present[idx[(idx >= 0) & (idx < n)]] = True
    return present


def _first_missing(store: VectorStore, name: str, split: str, n: int) -> int:
    """First row of ``split`` (of ``n`` rows) not yet stored; ``n`` when the split is complete."""
    missing = np.flatnonzero(~_stored_rows(store, name, split, n))
    return int(missing[0]) if len(missing) else n


def _subset(batch, keep: np.ndarray):
    """The rows ``keep`` (bool mask) of a :class:`~cbmir.ingest.base.Batch`."""
    if keep.all():
        return batch
    sel = np.flatnonzero(keep)
    return Batch(images=np.asarray(batch.images)[sel], labels=batch.labels[sel], indices=batch.indices[sel],
                 image_ids=[batch.image_ids[i] for i in sel],
                 extra_payload=[batch.extra_payload[i] for i in sel] if batch.extra_payload else None)


def ingest(source: DatasetSource, embedder, store: VectorStore, *, splits=("train", "test"),
           batch_size: int = 64, distance: str = "cosine", recreate: bool = False,
           collection: str | None = None, progress: bool = True, shard: Share | None = None,
           index: IndexConfig | None = None) -> IngestReport:
    """Embed ``splits`` of ``source`` and upsert them into the collection of (dataset, size, model).

    Args:
        source: the dataset (see :class:`cbmir.ingest.base.DatasetSource`).
        embedder: :func:`cbmir.ingest.embedder.make_embedder` result.
        store: the vector store.
        splits: splits to ingest; the study uses ``train`` as database and ``test`` as queries.
        batch_size: items per extraction batch.
        recreate: replace an existing collection (of any configuration or source). The new points
            are built in the staging collection :func:`staging_name` and swapped in
            (:meth:`cbmir.search.store.VectorStore.replace_collection`) only once every split is complete;
            until then the old collection is untouched, and re-running resumes the staging one.
        shard: embed only this share of every split (:mod:`cbmir.ingest.shards`; row-id collections such as
            MedMNIST; not with ``recreate``).
        index: the search mode of a new collection (None: exact; an existing collection keeps its own, and
            another mode is refused like another configuration). Approximate indexes are built once the
            collection is complete.

    Returns:
        :class:`IngestReport`.

    Raises:
        CbmirError: the collection holds another configuration or was built from a user archive
            that changed since (source fingerprint; without ``recreate``), or some
            embeddings were not finite: raised after every split was processed, naming the count
            and the rows refused (all finite rows are stored).
    """
    if shard is not None and recreate:
        raise CbmirError("--recreate and --shard cannot be combined: recreate the collection in one process "
                         "first (or delete it), then ingest its shares")
    meta = build_meta(source, embedder, distance=distance, index=index)
    name = collection or collection_name(source.name, source.size, meta.model, backend=meta.backend,
                                         distance=distance, aggregation=meta.aggregation if meta.is_3d else "concat",
                                         random_init=meta.random_init, input_size=meta.input_size)
    # --recreate over an existing collection: the new points are built in a staging collection and
    # swapped in only once every split is complete (store.replace_collection), so a run that fails or
    # is interrupted part-way (--strict and a broken file, a bad extractor, Ctrl-C) leaves the old
    # collection intact; re-running the same command resumes the staging collection
    # (a collection whose stored metadata is damaged counts as existing: --recreate replaces it)
    old_meta, old_exists = _read_meta(store, name)
    if index is None and old_meta is not None:
        meta.index = old_meta.index  # no --index given: the collection keeps its search mode
    target = staging_name(name) if recreate and old_exists else name
    if target != name:
        # the swap replaces the whole collection: every split it holds must be rebuilt
        lost = [] if old_meta is None else [sp for sp in SPLITS if sp not in splits and store.count(name, sp) > 0]
        if lost:
            raise CbmirError(
                f"--recreate replaces the whole collection {name!r}, which also holds split(s) "
                f"{', '.join(lost)}; give them too (--splits {','.join([*splits, *lost])}), or ingest "
                "into another collection")
        staged, exists = _read_meta(store, target)
        if exists and (staged is None or staged.differences(meta) or _other_source(staged, meta)):
            store.delete_collection(target)  # left by a --recreate of another configuration / source
    plan = None
    if shard is not None:  # creates or checks the collection under its lock (embedded engine)
        if callable(getattr(source, "static_payload", None)):
            raise CbmirError("--shard splits row-id collections (MedMNIST) between workers; a user archive is "
                             "synced instead (ids from its file keys): ingest it in one process")
        plan = SharePlan(store, name, meta, shard, {sp: int(source.split_size(sp)) for sp in splits})
        stored, target = plan.meta, plan.target
    else:
        stored = store.ensure_collection(target, meta)  # another configuration: CbmirError
    report = IngestReport(collection=name, meta=stored)
    if uses_key_ids(stored):  # a user archive: sync it (cbmir.ingest.sync)
        from cbmir.ingest.sync import check_same_archive, sync_splits

        check_same_archive(name, stored, source)  # another archive of the same name: CbmirError
        sync_splits(source, embedder, store, target, stored, splits, batch_size=batch_size, progress=progress,
                    name=name, report=report)
    else:  # MedMNIST (and archives ingested by an older cbmir): row ids, resumed at the missing rows
        check_fingerprint(name, stored, meta, source)  # another / changed source: CbmirError
        _resume_rows(source, embedder, store, target, stored, splits, batch_size=batch_size, progress=progress,
                     report=report, plan=plan)
    if report.rejected:
        total = sum(len(v) for v in report.rejected.values())
        rows = "; ".join(f"{sp} rows {rows_text(v, 20)}" for sp, v in report.rejected.items())
        where = ("The collection is incomplete" if target == name else
                 f"The old collection is unchanged; the new points wait in {target!r}")
        raise CbmirError(
            f"{name}: {total} feature vector(s) contained NaN/inf and were NOT stored ({rows}); "
            f"all other rows are stored. {where}: fix the extractor or the input "
            f"images, then re-run the same command to embed just these rows.")
    if plan is not None:
        report.extra["share"] = plan.finish()  # merges a staging collection (embedded engine)
        if not report.extra["share"]["complete"]:
            return report  # other shares still to come: no split is complete yet
        for split in splits:
            _mark_complete(store, name, stored, split)
    elif target != name:
        from cbmir.ingest.sync import count_added

        n_added = sum(count_added(store, name).values()) if old_meta is not None and uses_key_ids(old_meta) else 0
        store.replace_collection(target, name)
        if n_added:
            report.extra.setdefault("notes", []).append(
                f"--recreate rebuilt {name!r} from its archive: the {n_added} point(s) added with `cbmir add` "
                "(files outside the archive) are not in it; add them again")
    if stored.index_config().approximate:
        t0 = time.perf_counter()
        if store.build_index(name):
            report.extra["index_build_s"] = time.perf_counter() - t0
    return report


def _resume_rows(source: DatasetSource, embedder, store: VectorStore, target: str, meta: CollectionMeta, splits,
                 *, batch_size: int, progress: bool, report: IngestReport, plan: SharePlan | None = None) -> None:
    """Embed the rows of ``splits`` not yet stored in ``target`` (point ids from row positions); with a share
    ``plan``, only this worker's rows (the other shares' rows and rows already merged count as done)."""
    for split in splits:
        n = source.split_size(split)
        present = _stored_rows(store, target, split, n)
        mine = np.ones(n, dtype=bool)
        if plan is not None:
            present |= plan.skip_rows(split, n)
            mine = plan.share.mine(split, n)
        n_present = int(present.sum())
        report.resumed_from[split] = int(present[mine].sum())
        if n_present >= n:
            report.skipped.append(split)
            report.written[split] = 0
            if plan is None:
                _mark_complete(store, target, meta, split)
            continue
        start = int(np.flatnonzero(~present)[0])
        # rows stored before are not embedded again
        batches = (_subset(b, ~present[b.indices]) for b in source.iter_batches(split, batch_size, start=start))
        embed_split(report, store, target, split, batches, embedder, meta, total=n, initial=n_present,
                    desc=f"{report.collection} [{split}]", progress=progress)
        if split not in report.rejected and plan is None:
            _mark_complete(store, target, meta, split)


def embed_split(report: IngestReport, store: VectorStore, target: str, split: str, batches, embedder,
                meta: CollectionMeta, *, total: int, desc: str, progress: bool = True, initial: int = 0) -> set[int]:
    """Embed ``batches`` (:class:`~cbmir.ingest.base.Batch` of ``split``) and upsert them into ``target``.

    Pipelined: the reader runs ahead in a thread, the upsert of batch i runs in another while batch i+1 is
    embedded; leaving waits for every upsert handed over (:mod:`cbmir.ingest.pipeline`). NaN/inf vectors
    are never stored (listed in ``report.rejected``); all-zero ones are stored and listed. Fills
    ``report.written`` / ``seconds`` / ``items_per_s`` / ``zero_vectors`` / ``rejected`` (and, in 3D,
    ``extra["slices"]`` / ``extra["slices_per_s"]``) for ``split``.

    Returns:
        the row indices written.
    """
    t0 = time.perf_counter()
    written: set[int] = set()
    zeros: list[int] = []
    rejected: list[int] = []
    bar = tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not progress, leave=False)
    try:  # the bar is cleared on any exit, so an error message starts its own line
        with prefetch(batches, depth=2) as batches, BackgroundWriter(max_pending=1) as writer:
            for batch in batches:
                if len(batch) == 0:
                    continue
                vecs = np.asarray(embedder.embed(batch.images))
                bad = ~np.isfinite(vecs).all(axis=1)
                if bad.any():  # refused: never stored; listed, and the run fails at the end
                    rejected.extend(batch.indices[bad].tolist())
                    bar.update(int(bad.sum()))
                    batch, vecs = _subset(batch, ~bad), vecs[~bad]
                    if len(batch) == 0:
                        continue
                zeros.extend(batch.indices[~vecs.any(axis=1)].tolist())
                extras = batch.extra_payload or [None] * len(batch)
                payloads = [make_payload(dataset=meta.dataset, split=split, index=int(i), label=int(lab),
                                         model=meta.model, size=int(meta.size), image_id=iid, extra=ex)
                            for i, lab, iid, ex in zip(batch.indices, batch.labels, batch.image_ids, extras)]
                writer.submit(store.upsert, target, split, batch.indices.tolist(), vecs, payloads)
                written.update(int(i) for i in batch.indices)
                bar.update(len(batch))
    finally:
        bar.close()
    flush = getattr(store, "flush", None)
    if flush:
        flush(target)
    dt = time.perf_counter() - t0
    report.written[split] = len(written)
    if zeros:
        report.zero_vectors[split] = zeros
    if rejected:
        report.rejected[split] = rejected
    report.seconds[split] = dt
    report.items_per_s[split] = len(written) / dt if dt > 0 else float("nan")
    if getattr(embedder, "is_3d", False):  # 3D: 2D slices extracted per second (DESIGN.md §5)
        n_sl = len(written) * int(getattr(embedder, "items_per_image", 1))
        report.extra.setdefault("slices", {})[split] = n_sl
        report.extra.setdefault("slices_per_s", {})[split] = n_sl / dt if dt > 0 else float("nan")
    return written


#: Key of the ingest timings in the collection metadata's ``extra`` (:func:`record_ingest_timings`).
TIMINGS_KEY = "ingest_timings"


def record_ingest_timings(store: VectorStore, report: IngestReport, *, replayed: bool = False) -> dict:
    """Record in the collection metadata (``extra["ingest_timings"][split]``) the timing of every split this
    run embedded in full: ``{"seconds": extraction + upsert s, "items": rows, "items_per_s", "at": UTC ISO 8601,
    "model_load_s"}`` (plus ``"torch_compile": true`` when ``report.extra["torch_compile"]``: the split was embedded
    through ``torch.compile``), so that a later run reusing the collection can report them (Table 6). Splits reused,
    resumed (part of them stored before), or with refused rows are not recorded (their earlier record stays);
    nothing is recorded when the features were ``replayed`` from a cache (the time is upsert only).

    Returns:
        The collection's ``ingest_timings`` after the update (``{}`` when none).
    """
    import datetime as _dt

    meta = report.meta
    timings = {sp: dict(v) for sp, v in ((meta.extra or {}).get(TIMINGS_KEY) or {}).items()}
    full = [] if replayed else [sp for sp, n in report.written.items()
                                if n and sp in report.seconds and not report.resumed_from.get(sp)
                                and sp not in report.rejected]
    if not full:
        return timings
    at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for sp in full:
        timings[sp] = {"seconds": float(report.seconds[sp]), "items": int(report.written[sp]),
                       "items_per_s": float(report.items_per_s[sp]), "at": at,
                       "model_load_s": report.extra.get("model_load_s"),
                       **({"torch_compile": True} if report.extra.get("torch_compile") else {})}
    meta.extra = {**(meta.extra or {}), TIMINGS_KEY: timings}
    store.write_meta(report.collection, meta)
    return timings


def _mark_complete(store: VectorStore, name: str, meta: CollectionMeta, split: str) -> None:
    """Record in the metadata (``extra["completed"][split]`` = points stored) that the ingest of
    ``split`` ran to its end: fewer points than source rows are then files skipped as unreadable,
    not an interrupted run (:func:`cbmir.ingest.sources.check_evaluable`)."""
    n = store.count(name, split)
    done = dict((meta.extra or {}).get("completed") or {})
    if done.get(split) == n:
        return
    done[split] = n
    meta.extra = {**(meta.extra or {}), "completed": done}
    store.write_meta(name, meta)


def _read_meta(store: VectorStore, name: str) -> tuple[CollectionMeta | None, bool]:
    """``(metadata, exists)`` of collection ``name``; damaged metadata gives ``(None, True)``
    (``--recreate`` replaces such a collection; without it, ensure_collection reports the damage)."""
    try:
        m = store.read_meta(name)
    except DamagedMetaError:
        return None, True
    return m, m is not None


def staging_name(name: str) -> str:
    """Collection in which ``--recreate`` builds the new points of ``name`` (:func:`ingest`)."""
    return f"{name}{STAGING_SUFFIX}"


def _other_source(staged: CollectionMeta, meta: CollectionMeta) -> bool:
    """A staging collection built from another source: another archive folder (synced collections, which
    a re-run simply brings up to date), or another fingerprint (row-id collections)."""
    if uses_key_ids(staged):
        root = lambda m: ((m.extra or {}).get("archive") or {}).get("root")  # noqa: E731
        return root(staged) != root(meta)
    return _fingerprint_changed(staged, meta)


def _fingerprint_changed(stored: CollectionMeta, meta: CollectionMeta) -> bool:
    old = (stored.extra or {}).get("source_fingerprint")
    new = (meta.extra or {}).get("source_fingerprint")
    return bool(old) and new is not None and old != new


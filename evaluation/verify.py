"""``cbmir verify``: check a stored collection against its source dataset.

After a night of interrupted, resumed and retried ingest jobs, one command says whether a
collection is exactly what its source file says it should be:

* the collection exists and its metadata names the same dataset, size and modality;
* per split: the number of stored points equals the split size, every row ``0..N-1`` is present
  once (user archives: except rows whose file the ingest skipped as unreadable, re-checked by
  decoding just those files with the same rules) (no duplicate point ids, no ids of another split, no rows
  beyond the split);
* a synced user archive (point ids from item keys, :mod:`cbmir.ingest.sync`) must be exactly what a sync
  would leave: every readable file once, under an id its key hashes to, with the archive's label and
  payload; no point of a file changed, moved or gone since; no unfinished sync. Points given to
  ``cbmir add`` that are not archive files are counted apart;
* every payload agrees with its point id (``split``, ``index``) and with the collection
  (``dataset``, ``model``, ``size``), and its ``label`` equals the label in the source file;
* for a collection ingested in shares (``cbmir ingest --shard i/n``): which shares' rows are missing, and
  which shares are staged but not merged yet (embedded engine);
* every vector has the collection's dimension (each named chunk its layout width), has no NaN/inf,
  and, for cosine collections, is unit-length or all zero (the store's zero-vector rule,
  :meth:`cbmir.search.store.VectorStore._prepare`); all-zero vectors are counted and reported, not failed.

Splits checked: ``train`` and ``test`` (the study's database and queries) and any other split
that has points. The collection is read page by page (at most 1,024 points and
:data:`cbmir.search.store.MAX_VALUES_PER_CALL` vector values at a time), so memory stays bounded for any
collection size, 3D volumes included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import DatasetSource
from cbmir.search.schema import MAX_PROBES, SPLIT_CODES, key_index, point_id, split_and_index, uses_key_ids
from cbmir.ingest.shards import EXTRA_KEY as SHARES_KEY
from cbmir.ingest.shards import missing_share_rows, staged_shares
from cbmir.search.store import MAX_VALUES_PER_CALL, VectorStore, rows_per_call

#: Largest deviation of a stored cosine vector's L2 norm from 1 accepted (float32 rounding).
NORM_TOLERANCE = 1e-3
#: Rows listed per problem in messages.
_SHOW = 10


def _rows(rows, limit: int = _SHOW) -> str:
    rows = [int(r) for r in rows]
    more = f", ... (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return "[" + ", ".join(map(str, rows[:limit])) + more + "]"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_collection`.

    Attributes:
        collection: collection name.
        ok: True when no problem was found.
        problems: one human-readable sentence per problem (empty when ``ok``).
        counts: per split, ``(points stored, rows in the source split)``.
        dim: the collection's vector dimension (0 when the collection is missing).
        zero_vectors: per split, the number of all-zero vectors (allowed; cosine similarity 0).
        skipped: per split, rows absent because their file cannot be decoded (user archives: the
            ingest skips them by the same rules; allowed, and re-checked on every verify).
        added: per split, points given to ``cbmir add`` that are not files of the archive (not counted in
            ``counts``).
        engine: the store's engine name.
    """

    collection: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    dim: int = 0
    zero_vectors: dict[str, int] = field(default_factory=dict)
    engine: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)

    def verdict(self) -> str:
        """One line: ``OK <collection>: train 546/546, ...`` or ``FAIL: <collection>: <problems>``."""
        if not self.ok:
            return f"FAIL: {self.collection}: " + "; ".join(self.problems)
        parts = ", ".join(f"{sp} {a}/{b}" for sp, (a, b) in self.counts.items())
        nz = sum(self.zero_vectors.values())
        zero = (f", {nz} all-zero vector(s) ({', '.join(f'{s} {n}' for s, n in self.zero_vectors.items() if n)};"
                " stored by rule, cosine similarity 0)") if nz else ""
        ns = sum(self.skipped.values())
        skip = (f", {ns} unreadable source file(s) skipped ({', '.join(f'{s} {n}' for s, n in self.skipped.items())})"
                if ns else "")
        na = sum(self.added.values())
        added = (f", +{na} point(s) added with `cbmir add` ({', '.join(f'{s} {n}' for s, n in self.added.items())})"
                 if na else "")
        return (f"OK {self.collection}: {parts}, dim {self.dim}, no duplicate ids, labels match the source, "
                f"all vectors finite{zero}{skip}{added} [{self.engine}]")


def verify_collection(store: VectorStore, name: str, source: DatasetSource, *,
                      splits: tuple[str, ...] | None = None, page: int | None = None) -> VerifyReport:
    """Check collection ``name`` of ``store`` against ``source`` (see the module docstring).

    Args:
        store: an open vector store (any engine).
        name: collection name.
        source: the dataset the collection was built from (e.g.
            :func:`cbmir.ingest.medmnist_data.open_medmnist`); its labels are the reference.
        splits: splits to check; default ``train``, ``test`` and any other split with points.
        page: points read per request (default :func:`cbmir.search.store.rows_per_call` of the dim).

    Returns:
        :class:`VerifyReport`; never raises for a problem of the collection itself (a missing
        collection is a problem in the report).

    Raises:
        CbmirError: the store cannot be read (e.g. the embedded store is in use by another process,
            the server is unreachable).
    """
    rep = VerifyReport(collection=name, engine=getattr(store, "engine", ""))
    meta = store.read_meta(name)
    if meta is None:
        have = ", ".join(sorted(store.list_collections())) or "none"
        rep.fail(f"collection does not exist in the {rep.engine} store (existing: {have})")
        return rep
    rep.dim = int(meta.dim)
    for key, want in (("dataset", source.name), ("size", int(source.size)), ("is_3d", bool(source.is_3d))):
        if getattr(meta, key) != want:
            rep.fail(f"metadata {key}={getattr(meta, key)!r} but the source has {want!r}")
    archive = uses_key_ids(meta) and callable(getattr(source, "static_payload", None))
    fp = getattr(source, "fingerprint", None)
    old_fp = (meta.extra or {}).get("source_fingerprint")
    if old_fp and callable(fp) and not archive:
        new_fp = fp()
        changed = sorted(sp for sp in set(old_fp) | set(new_fp) if old_fp.get(sp) != new_fp.get(sp))
        if changed:
            rep.fail(f"the source changed since it was ingested (split(s) {', '.join(changed)}); "
                     "re-run the ingest with --recreate")
    if splits is None:
        splits = tuple(sp for sp in SPLIT_CODES if sp in ("train", "test") or store.count(name, sp) > 0)
    page = int(page or rows_per_call(meta.dim, getattr(store, "max_values_per_call", MAX_VALUES_PER_CALL)))
    if archive:
        _verify_archive(rep, store, name, meta, source, tuple(splits), page)
        return rep
    for split in splits:
        n = int(source.split_size(split))
        labels = np.asarray(source.labels(split), dtype=np.int64)
        stored = int(store.count(name, split))
        rep.counts[split] = (stored, n)
        seen = np.zeros(n, dtype=np.int64)
        foreign, beyond, bad_payload, bad_label = [], [], [], []
        vec = _VectorCheck(meta)
        for ids, chunks, payloads in store._scroll(name, split, True, page):  # noqa: SLF001 (engine page reader)
            pairs = [split_and_index(i) for i in ids]
            for (sp, ix), pl in zip(pairs, payloads):
                if sp != split:
                    foreign.append(ix)
                    continue
                if ix >= n:
                    beyond.append(ix)
                    continue
                seen[ix] += 1
                if not _payload_agrees(pl, split, ix, meta):
                    bad_payload.append(ix)
                lab = pl.get("label")
                if lab is None or int(lab) != int(labels[ix]):
                    bad_label.append((ix, lab, int(labels[ix])))
            vec.page(np.asarray([ix for _, ix in pairs], dtype=np.int64), chunks)
        rep.zero_vectors[split] = vec.zero
        missing = np.flatnonzero(seen == 0)
        dups = np.flatnonzero(seen > 1)
        unreadable = getattr(source, "unreadable_rows", None)
        if len(missing) and callable(unreadable):  # user archives: files the ingest skipped (same rules)
            skipped = set(unreadable(split, missing))
            if skipped:
                rep.skipped[split] = len(skipped)
                missing = np.asarray([r for r in missing if int(r) not in skipped], dtype=np.int64)
        expected = n - rep.skipped.get(split, 0)
        if stored != expected or len(missing):
            rep.fail(f"{split}: {stored} points stored, the source has {n}"
                     + (f" ({rep.skipped[split]} unreadable, skipped)" if rep.skipped.get(split) else "")
                     + (f" (missing rows {_rows(missing)})" if len(missing) else "")
                     + _missing_shares(meta, split, missing))
        if len(dups):
            rep.fail(f"{split}: duplicate points for rows {_rows(dups)}")
        _id_problems(rep, split, foreign, bad_payload)
        if beyond:
            rep.fail(f"{split}: {len(beyond)} point(s) for rows beyond the split size {n}: {_rows(beyond)}")
        if bad_label:
            first = ", ".join(f"row {ix}: stored {lab} vs file {want}" for ix, lab, want in bad_label[:_SHOW])
            rep.fail(f"{split}: {len(bad_label)} label(s) differ from the source ({first})")
        vec.report(rep, split)
    staged = staged_shares(store, name)
    running = [sh for sh, k in staged.items() if k is None]
    left = {sh: k for sh, k in staged.items() if k is not None}
    if running:
        rep.fail(f"share(s) {', '.join(running)} still running (their staging collections are in use)")
    if left:
        rep.fail("share(s) " + ", ".join(f"{sh} ({k} points)" for sh, k in left.items())
                 + " embedded but not merged into the collection (staging collection(s) left by an interrupted "
                 "share): re-run `cbmir ingest ... --shard i/n` for each to finish and merge it")
    return rep


def _payload_agrees(pl: dict, split: str, ix: int, meta) -> bool:
    """The payload names the point's split and row and the collection's dataset, model and size."""
    return (pl.get("split") == split and pl.get("index") == ix and pl.get("dataset") == meta.dataset
            and pl.get("model") == meta.model and pl.get("size") == meta.size)


def _id_problems(rep: "VerifyReport", split: str, foreign: list, bad_payload: list) -> None:
    if foreign:
        rep.fail(f"{split}: {len(foreign)} point(s) with ids of another split (rows {_rows(foreign)})")
    if bad_payload:
        rep.fail(f"{split}: payload (split/index/dataset/model/size) disagrees with the point id "
                 f"or the collection for rows {_rows(bad_payload)}")


class _VectorCheck:
    """Per-page checks of stored vectors: dimension and layout, NaN/inf, unit length for cosine (zero
    vectors counted, allowed)."""

    def __init__(self, meta) -> None:
        self.meta = meta
        self.widths = {c: b - a for c, a, b in meta.layout}
        self.bad_dim: list[int] = []
        self.nonfinite: list[int] = []
        self.not_unit: list[int] = []
        self.zero = 0

    def page(self, idx: np.ndarray, chunks) -> None:
        """Check one page: ``idx`` int64 ``(B,)`` row indices, ``chunks`` vector name -> ``(B, width)``."""
        if chunks is None or set(chunks) != set(self.widths) or any(
                chunks[c].shape != (len(idx), w) for c, w in self.widths.items()):
            self.bad_dim.extend(idx.tolist())
            return
        vecs = np.concatenate([chunks[c] for c, _, _ in self.meta.layout], axis=1)
        fin = np.isfinite(vecs).all(axis=1)
        self.nonfinite.extend(idx[~fin].tolist())
        norms = np.linalg.norm(np.where(np.isfinite(vecs), vecs, 0).astype(np.float64), axis=1)
        is_zero = fin & (norms == 0)
        self.zero += int(is_zero.sum())
        if self.meta.distance == "cosine":
            self.not_unit.extend(idx[fin & ~is_zero & (np.abs(norms - 1.0) > NORM_TOLERANCE)].tolist())

    def report(self, rep: "VerifyReport", split: str) -> None:
        if self.bad_dim:
            rep.fail(f"{split}: vectors of the wrong dimension (expected {self.meta.dim}, layout "
                     f"{[list(c) for c in self.meta.layout]}) for rows {_rows(self.bad_dim)}")
        if self.nonfinite:
            rep.fail(f"{split}: NaN/inf in the vectors of rows {_rows(self.nonfinite)}")
        if self.not_unit:
            rep.fail(f"{split}: cosine vectors not unit-length (nor all zero) for rows {_rows(self.not_unit)}")


def _verify_archive(rep: VerifyReport, store: VectorStore, name: str, meta, source, splits, page: int) -> None:
    """The checks of a synced user archive (point ids from item keys, :mod:`cbmir.ingest.sync`): the
    collection must be what a sync would leave -- every readable file once, under an id its key hashes to,
    with the archive's label and payload, no point of a file that is gone or changed -- plus the vector
    checks. Points given to ``cbmir add`` (``origin: added``) are counted apart."""
    from cbmir.ingest.sync import plan_sync

    if (meta.extra or {}).get("sync_pending"):
        rep.fail("a sync with the archive did not finish; re-run `cbmir ingest` with the same options")
    plan = plan_sync(source, store, name, splits, detect_moves=False)
    for split in splits:
        n = int(source.split_size(split))
        keys: dict[str, int] = {}
        dups, foreign, bad_payload, bad_id = [], [], [], []
        added = 0
        vec = _VectorCheck(meta)
        for ids, chunks, payloads in store._scroll(name, split, True, page):  # noqa: SLF001 (engine page reader)
            pairs = [split_and_index(i) for i in ids]
            for (sp, ix), pl in zip(pairs, payloads):
                key = str(pl.get("item_key"))
                if sp != split:
                    foreign.append(ix)
                    continue
                added += pl.get("origin") == "added"
                keys[key] = keys.get(key, 0) + 1
                if keys[key] == 2:
                    dups.append(pl.get("source_path", key))
                if ix not in {key_index(key, j) for j in range(MAX_PROBES)}:
                    bad_id.append(ix)
                if not _payload_agrees(pl, split, ix, meta):
                    bad_payload.append(ix)
            vec.page(np.asarray([ix for _, ix in pairs], dtype=np.int64), chunks)
        rep.zero_vectors[split] = vec.zero
        new = [it for ix, it in plan.embed.get(split, []) if point_id(split, ix) not in plan.updates]
        unreadable = [it for it in new if source.item_unreadable(it)]
        if unreadable:
            rep.skipped[split] = len(unreadable)
        missing = [it.source_path for it in new if it not in unreadable]
        stored = int(store.count(name, split)) - added
        rep.counts[split] = (stored, n)
        if added:
            rep.added[split] = added
        if stored != n - len(unreadable) or missing:
            rep.fail(f"{split}: {stored} points stored, the archive has {n} files"
                     + (f" ({len(unreadable)} unreadable, skipped)" if unreadable else "")
                     + (f" (not ingested: {', '.join(missing[:_SHOW])}{', ...' if len(missing) > _SHOW else ''})"
                        if missing else ""))
        if dups:
            rep.fail(f"{split}: several points for one file: {', '.join(map(str, dups[:_SHOW]))}")
        _id_problems(rep, split, foreign, bad_payload)
        if bad_id:
            rep.fail(f"{split}: point ids that are not the hash of their item key (rows {_rows(bad_id)})")
        vec.report(rep, split)
    stale = plan.differences(("updated", "relabelled", "deleted"))
    if stale:
        rep.fail(f"the archive changed since it was ingested: {stale}; run `cbmir ingest` with the same options "
                 "to sync the collection")


def _missing_shares(meta, split: str, missing) -> str:
    """`` — missing share(s) 1/4 (312 rows), 3/4 (298 rows): run `cbmir ingest ... --shard i/4` ...`` for a
    collection ingested in shares; ``""`` otherwise."""
    n = (meta.extra or {}).get(SHARES_KEY)
    if not n or not len(missing):
        return ""
    per = missing_share_rows(split, missing, int(n))
    return (" — missing share(s) " + ", ".join(f"{i}/{n} ({c} rows)" for i, c in sorted(per.items()))
            + f": run `cbmir ingest ... --shard i/{n}` for each")


def verify_or_raise(store: VectorStore, name: str, source: DatasetSource, **kwargs) -> VerifyReport:
    """:func:`verify_collection`, raising :class:`~cbmir.core.errors.CbmirError` with the verdict on failure."""
    rep = verify_collection(store, name, source, **kwargs)
    if not rep.ok:
        raise CbmirError(rep.verdict())
    return rep

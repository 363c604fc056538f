"""``cbmir verify``: check a stored collection against its source dataset.

After a night of interrupted, resumed and retried ingest jobs, one command says whether a
collection is exactly what its source file says it should be:

* the collection exists and its metadata names the same dataset, size and modality;
* per split: the number of stored points equals the split size, every row ``0..N-1`` is present
  once (user archives: except rows whose file the ingest skipped as unreadable, re-checked by
  decoding just those files with the same rules) (no duplicate point ids, no ids of another split,
  no rows beyond the split);
* every payload agrees with its point id (``split``, ``index``) and with the collection
  (``dataset``, ``model``, ``size``), and its ``label`` equals the label in the source file;
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
from cbmir.search.schema import SPLIT_CODES, split_and_index
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
        return (f"OK {self.collection}: {parts}, dim {self.dim}, no duplicate ids, labels match the source, "
                f"all vectors finite{zero}{skip} [{self.engine}]")


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
    _check_source(rep, meta, source)
    if splits is None:
        splits = tuple(sp for sp in SPLIT_CODES if sp in ("train", "test") or store.count(name, sp) > 0)
    page = int(page or rows_per_call(meta.dim, getattr(store, "max_values_per_call", MAX_VALUES_PER_CALL)))
    for split in splits:
        n = int(source.split_size(split))
        labels = np.asarray(source.labels(split), dtype=np.int64)
        rep.counts[split] = (int(store.count(name, split)), n)
        scan = _scan_split(store, name, split, meta, labels, n, page)
        rep.zero_vectors[split] = scan.zero
        _report_split(rep, split, scan, meta, source)
    return rep


def _check_source(rep: VerifyReport, meta, source: DatasetSource) -> None:
    """Problems of the collection's metadata against ``source``: dataset, size, modality, and (user
    archives) a source fingerprint that changed since the ingest."""
    for key, want in (("dataset", source.name), ("size", int(source.size)), ("is_3d", bool(source.is_3d))):
        if getattr(meta, key) != want:
            rep.fail(f"metadata {key}={getattr(meta, key)!r} but the source has {want!r}")
    fp = getattr(source, "fingerprint", None)
    old_fp = (meta.extra or {}).get("source_fingerprint")
    if old_fp and callable(fp):
        new_fp = fp()
        changed = sorted(sp for sp in set(old_fp) | set(new_fp) if old_fp.get(sp) != new_fp.get(sp))
        if changed:
            rep.fail(f"the source changed since it was ingested (split(s) {', '.join(changed)}); "
                     "re-run the ingest with --recreate")


@dataclass
class _SplitScan:
    """What one pass over the stored points of a split found (rows; ``seen``: points per row)."""

    seen: np.ndarray
    foreign: list[int] = field(default_factory=list)
    beyond: list[int] = field(default_factory=list)
    bad_payload: list[int] = field(default_factory=list)
    bad_label: list[tuple] = field(default_factory=list)
    bad_dim: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    not_unit: list[int] = field(default_factory=list)
    zero: int = 0


def _scan_split(store: VectorStore, name: str, split: str, meta, labels: np.ndarray, n: int,
                page: int) -> _SplitScan:
    """Read the points of ``split`` (``n`` rows in the source) page by page and check ids, payloads,
    labels (against the source's ``labels``, int64 (n,)) and vectors (dimension, finite, unit length
    for cosine)."""
    scan = _SplitScan(seen=np.zeros(n, dtype=np.int64))
    for ids, chunks, payloads in store._scroll(name, split, True, page):  # noqa: SLF001 (engine page reader)
        pairs = [split_and_index(i) for i in ids]
        _check_payloads(scan, split, pairs, payloads, meta, labels)
        _check_vectors(scan, np.asarray([ix for _, ix in pairs], dtype=np.int64), chunks, meta)
    return scan


def _check_payloads(scan: _SplitScan, split: str, pairs: list, payloads: list, meta, labels: np.ndarray) -> None:
    """Ids of another split or beyond the split; payloads that disagree with the id or the collection;
    labels that differ from the source."""
    n = len(scan.seen)
    for (sp, ix), pl in zip(pairs, payloads):
        if sp != split:
            scan.foreign.append(ix)
            continue
        if ix >= n:
            scan.beyond.append(ix)
            continue
        scan.seen[ix] += 1
        if (pl.get("split") != split or pl.get("index") != ix or pl.get("dataset") != meta.dataset
                or pl.get("model") != meta.model or pl.get("size") != meta.size):
            scan.bad_payload.append(ix)
        lab = pl.get("label")
        if lab is None or int(lab) != int(labels[ix]):
            scan.bad_label.append((ix, lab, int(labels[ix])))


def _check_vectors(scan: _SplitScan, idx: np.ndarray, chunks, meta) -> None:
    """Vectors (named chunks of one page, rows ``idx``) of the wrong layout, not finite, all zero, or
    (cosine) not unit-length."""
    widths = {c: b - a for c, a, b in meta.layout}
    if chunks is None or set(chunks) != set(widths) or any(
            chunks[c].shape != (len(idx), w) for c, w in widths.items()):
        scan.bad_dim.extend(idx.tolist())
        return
    vecs = np.concatenate([chunks[c] for c, _, _ in meta.layout], axis=1)
    fin = np.isfinite(vecs).all(axis=1)
    scan.nonfinite.extend(idx[~fin].tolist())
    norms = np.linalg.norm(np.where(np.isfinite(vecs), vecs, 0).astype(np.float64), axis=1)
    is_zero = fin & (norms == 0)
    scan.zero += int(is_zero.sum())
    if meta.distance == "cosine":
        scan.not_unit.extend(idx[fin & ~is_zero & (np.abs(norms - 1.0) > NORM_TOLERANCE)].tolist())


def _report_split(rep: VerifyReport, split: str, scan: _SplitScan, meta, source: DatasetSource) -> None:
    """One problem sentence in ``rep`` per kind of problem ``scan`` found in ``split``; rows missing
    because the ingest skipped their unreadable file (user archives) are allowed and counted."""
    stored, n = rep.counts[split]
    missing = np.flatnonzero(scan.seen == 0)
    dups = np.flatnonzero(scan.seen > 1)
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
                 + (f" (missing rows {_rows(missing)})" if len(missing) else ""))
    if len(dups):
        rep.fail(f"{split}: duplicate points for rows {_rows(dups)}")
    if scan.foreign:
        rep.fail(f"{split}: {len(scan.foreign)} point(s) with ids of another split (rows {_rows(scan.foreign)})")
    if scan.beyond:
        rep.fail(f"{split}: {len(scan.beyond)} point(s) for rows beyond the split size {n}: {_rows(scan.beyond)}")
    if scan.bad_payload:
        rep.fail(f"{split}: payload (split/index/dataset/model/size) disagrees with the point id "
                 f"or the collection for rows {_rows(scan.bad_payload)}")
    if scan.bad_label:
        first = ", ".join(f"row {ix}: stored {lab} vs file {want}" for ix, lab, want in scan.bad_label[:_SHOW])
        rep.fail(f"{split}: {len(scan.bad_label)} label(s) differ from the source ({first})")
    if scan.bad_dim:
        rep.fail(f"{split}: vectors of the wrong dimension (expected {meta.dim}, layout "
                 f"{[list(c) for c in meta.layout]}) for rows {_rows(scan.bad_dim)}")
    if scan.nonfinite:
        rep.fail(f"{split}: NaN/inf in the vectors of rows {_rows(scan.nonfinite)}")
    if scan.not_unit:
        rep.fail(f"{split}: cosine vectors not unit-length (nor all zero) for rows {_rows(scan.not_unit)}")


def verify_or_raise(store: VectorStore, name: str, source: DatasetSource, **kwargs) -> VerifyReport:
    """:func:`verify_collection`, raising :class:`~cbmir.core.errors.CbmirError` with the verdict on failure."""
    rep = verify_collection(store, name, source, **kwargs)
    if not rep.ok:
        raise CbmirError(rep.verdict())
    return rep

"""``cbmir verify``: check a stored collection against its source dataset.

After a night of interrupted, resumed and retried ingest jobs, one command says whether a
collection is exactly what its source file says it should be:

* the collection exists and its metadata names the same dataset, size and modality;
* per split: the number of stored points equals the split size, every row ``0..N-1`` is present
  once (user archives: except rows whose file the ingest skipped as unreadable, re-checked by
  decoding just those files with the same rules) (no duplicate point ids, no ids of another split, no rows beyond the split);
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
from cbmir.ingest.shards import EXTRA_KEY as SHARES_KEY
from cbmir.ingest.shards import missing_share_rows, staged_shares
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
    if splits is None:
        splits = tuple(sp for sp in SPLIT_CODES if sp in ("train", "test") or store.count(name, sp) > 0)
    widths = {c: b - a for c, a, b in meta.layout}
    page = int(page or rows_per_call(meta.dim, getattr(store, "max_values_per_call", MAX_VALUES_PER_CALL)))
    cosine = meta.distance == "cosine"
    for split in splits:
        n = int(source.split_size(split))
        labels = np.asarray(source.labels(split), dtype=np.int64)
        stored = int(store.count(name, split))
        rep.counts[split] = (stored, n)
        seen = np.zeros(n, dtype=np.int64)
        foreign, beyond, bad_payload, bad_label, bad_dim, nonfinite, not_unit = [], [], [], [], [], [], []
        zero = 0
        for ids, chunks, payloads in store._scroll(name, split, True, page):  # noqa: SLF001 (engine page reader)
            pairs = [split_and_index(i) for i in ids]
            idx = np.asarray([ix for _, ix in pairs], dtype=np.int64)
            for (sp, ix), pl in zip(pairs, payloads):
                if sp != split:
                    foreign.append(ix)
                    continue
                if ix >= n:
                    beyond.append(ix)
                    continue
                seen[ix] += 1
                if (pl.get("split") != split or pl.get("index") != ix or pl.get("dataset") != meta.dataset
                        or pl.get("model") != meta.model or pl.get("size") != meta.size):
                    bad_payload.append(ix)
                lab = pl.get("label")
                if lab is None or int(lab) != int(labels[ix]):
                    bad_label.append((ix, lab, int(labels[ix])))
            if chunks is None or set(chunks) != set(widths) or any(
                    chunks[c].shape != (len(ids), w) for c, w in widths.items()):
                bad_dim.extend(idx.tolist())
                continue
            vecs = np.concatenate([chunks[c] for c, _, _ in meta.layout], axis=1)
            fin = np.isfinite(vecs).all(axis=1)
            nonfinite.extend(idx[~fin].tolist())
            norms = np.linalg.norm(np.where(np.isfinite(vecs), vecs, 0).astype(np.float64), axis=1)
            is_zero = fin & (norms == 0)
            zero += int(is_zero.sum())
            if cosine:
                not_unit.extend(idx[fin & ~is_zero & (np.abs(norms - 1.0) > NORM_TOLERANCE)].tolist())
        rep.zero_vectors[split] = zero
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
        if foreign:
            rep.fail(f"{split}: {len(foreign)} point(s) with ids of another split (rows {_rows(foreign)})")
        if beyond:
            rep.fail(f"{split}: {len(beyond)} point(s) for rows beyond the split size {n}: {_rows(beyond)}")
        if bad_payload:
            rep.fail(f"{split}: payload (split/index/dataset/model/size) disagrees with the point id "
                     f"or the collection for rows {_rows(bad_payload)}")
        if bad_label:
            first = ", ".join(f"row {ix}: stored {lab} vs file {want}" for ix, lab, want in bad_label[:_SHOW])
            rep.fail(f"{split}: {len(bad_label)} label(s) differ from the source ({first})")
        if bad_dim:
            rep.fail(f"{split}: vectors of the wrong dimension (expected {meta.dim}, layout "
                     f"{[list(c) for c in meta.layout]}) for rows {_rows(bad_dim)}")
        if nonfinite:
            rep.fail(f"{split}: NaN/inf in the vectors of rows {_rows(nonfinite)}")
        if not_unit:
            rep.fail(f"{split}: cosine vectors not unit-length (nor all zero) for rows {_rows(not_unit)}")
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

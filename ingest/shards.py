"""Sharded ingest: ``n`` processes (or machines) embed one collection together, each its share of every split.

``cbmir ingest ... --shard i/n`` embeds and upserts only the rows whose point id falls in share ``i``
(:func:`share_of`: a fixed 64-bit mix of the point id, modulo ``n`` — stable across runs, processes and
machines, and spreading rows evenly whatever their order). The collection is complete when every share
is; ``cbmir verify`` names the shares whose rows are missing.

How the shares write (:class:`SharePlan`):

* **Qdrant server** (``store.concurrent_writers``): every share upserts straight into the collection;
  concurrent upserts are fine (point ids are disjoint).
* **Embedded engine** (Qdrant Edge: one process per shard directory): each share embeds into its own
  staging collection ``<name>__share-<i>-of-<n>`` — the shares run fully in parallel — and when done
  merges it into the collection under the collection's lock, waiting its turn (up to
  :data:`LOCK_WAIT_S`) while another share merges; the staging collection is deleted after the merge.
  Merging copies stored vectors (no re-embedding): seconds to minutes, against hours of embedding.

Either way a share is resumable: rows already in the collection or in its staging collection are not
embedded again, and a merge interrupted part-way is redone by re-running the same command (upserts are
idempotent). The share that completes the collection records every split as complete and builds the
collection's approximate index, if it has one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.search.schema import CollectionMeta, point_id

#: seconds a share waits for another share's lock on the embedded collection (merging) before failing
LOCK_WAIT_S = 6 * 3600.0
#: ``extra`` key of the collection metadata recording the number of shares it is ingested in
EXTRA_KEY = "ingest_shares"

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def share_of(point_ids, n: int) -> np.ndarray:
    """Share (``0..n-1``) of each point id: SplitMix64's finaliser of ``id + golden ratio``, modulo ``n``.

    Args:
        point_ids: int ``(N,)`` (or a scalar) non-negative point ids.
        n: number of shares (>= 1).

    Returns:
        int64 ``(N,)``.
    """
    x = np.atleast_1d(np.asarray(point_ids, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n)).astype(np.int64)


def row_shares(split: str, n_rows: int, n: int) -> np.ndarray:
    """Share of every row ``0..n_rows-1`` of ``split`` (by its point id): int64 ``(n_rows,)``."""
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    base = point_id(split, 0)
    return share_of(np.arange(n_rows, dtype=np.uint64) + np.uint64(base), n)


@dataclass(frozen=True)
class Share:
    """Share ``index`` of ``count`` (``--shard index/count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1 and isinstance(self.index, int)
                and 0 <= self.index < self.count):
            raise CbmirError(f"--shard {self.index}/{self.count}: give i/n with n >= 1 and 0 <= i < n "
                             "(e.g. --shard 0/4 ... --shard 3/4 for four workers)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def mine(self, split: str, n_rows: int) -> np.ndarray:
        """bool ``(n_rows,)``: rows of ``split`` that belong to this share."""
        return row_shares(split, n_rows, self.count) == self.index


def parse_share(text: str | None) -> Share | None:
    """``"i/n"`` -> :class:`Share` (None -> None).

    Raises:
        CbmirError: not of the form ``i/n`` with ``0 <= i < n``.
    """
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise CbmirError(f"--shard {text!r}: give i/n, e.g. --shard 0/2 and --shard 1/2 for two workers")
    return Share(int(m.group(1)), int(m.group(2)))


def staging_collection(name: str, share: Share) -> str:
    """Staging collection of ``share`` on the embedded engine: ``<name>__share-<i>-of-<n>``."""
    return f"{name}__share-{share.index}-of-{share.count}"


def staged_shares(store, name: str) -> dict[str, int | None]:
    """``{"i/n": points}`` of the staging collections of ``name`` still in the store (not merged yet); points
    None while the share's process holds its staging collection (still embedding)."""
    out: dict[str, int | None] = {}
    for c in store.list_collections():
        m = re.fullmatch(re.escape(name) + r"__share-(\d+)-of-(\d+)", c)
        if m:
            try:
                out[f"{m.group(1)}/{m.group(2)}"] = int(store.count(c))
            except CbmirError:  # embedded engine: locked by the running share
                out[f"{m.group(1)}/{m.group(2)}"] = None
    return out


def missing_share_rows(split: str, missing_rows, n: int) -> dict[int, int]:
    """``{share: rows missing}`` for the missing rows of ``split`` in an ``n``-share ingest."""
    rows = np.asarray(missing_rows, dtype=np.uint64)
    if not len(rows):
        return {}
    shares = share_of(rows + np.uint64(point_id(split, 0)), n)
    vals, counts = np.unique(shares, return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, counts)}


class SharePlan:
    """Where one share writes, which rows it skips, and how it finishes (module docstring).

    Args:
        store: the vector store.
        name: the collection.
        meta: its metadata as requested by this share (created if the collection does not exist).
        share: this process's share.
        sizes: rows per split of the source, for the splits ingested.

    Raises:
        CbmirError: the collection holds another configuration, or is being ingested in another number of
            shares and is not complete.
    """

    def __init__(self, store, name: str, meta: CollectionMeta, share: Share, sizes: dict[str, int]) -> None:
        self.store, self.name, self.share, self.sizes = store, name, share, dict(sizes)
        self._lock()
        try:
            self.meta = store.ensure_collection(name, meta)
        except CbmirError:
            if store.read_meta(name) is None:
                raise
            self.meta = store.ensure_collection(name, meta)  # created meanwhile by another share: compare
        self.done = {sp: _stored(store, name, sp, n) for sp, n in self.sizes.items()}
        self._record_share_count()
        self.target = name
        if not store.concurrent_writers:
            self.target = staging_collection(name, share)
            staged = store.read_meta(self.target)
            if staged is not None and staged.differences(self._staging_meta()):
                store.delete_collection(self.target)  # left by a share of another configuration
            store.release_collection(name)  # the other shares may now open the collection
            store.ensure_collection(self.target, self._staging_meta())

    def _lock(self) -> None:
        """Take the collection (embedded engine: its lock, waiting up to :data:`LOCK_WAIT_S` while another share
        merges; a server: nothing)."""
        had = getattr(self.store, "lock_wait_s", None)
        if had is not None:
            self.store.lock_wait_s = LOCK_WAIT_S
        try:
            self.store.lock(self.name)
        finally:
            if had is not None:
                self.store.lock_wait_s = had

    def _staging_meta(self) -> CollectionMeta:
        # staged points are only copied, never searched: no index to build there
        return dataclasses.replace(self.meta, index={}, extra=dict(self.meta.extra or {}))

    def _record_share_count(self) -> None:
        extra = dict(self.meta.extra or {})
        have = extra.get(EXTRA_KEY)
        if have == self.share.count:
            return
        if have is not None and not self.complete():
            raise CbmirError(
                f"collection {self.name!r} is being ingested in {have} shares (--shard i/{have}), not "
                f"{self.share.count}; finish it with --shard i/{have} (`cbmir verify` names the missing shares)")
        self.meta.extra = {**extra, EXTRA_KEY: self.share.count}
        self.store.write_meta(self.name, self.meta)

    def skip_rows(self, split: str, n_rows: int) -> np.ndarray:
        """bool ``(n_rows,)``: rows this share does not embed — other shares' rows and rows already in the
        collection."""
        done = self.done.get(split)
        other = ~self.share.mine(split, n_rows)
        return other if done is None else other | done[:n_rows]

    def complete(self) -> bool:
        """Whether every split ingested has all its rows in the collection."""
        return all(self.store.count(self.name, sp) >= n for sp, n in self.sizes.items())

    def finish(self) -> dict:
        """Merge the staging collection (embedded engine), then report: ``{"complete": bool, "counts":
        {split: (stored, rows)}, "merged": points copied}``; a complete collection's splits are marked complete
        by the caller."""
        merged = 0
        if self.target != self.name:
            self._lock()
            merged = self.store.copy_points(self.target, self.name)
            self.store.delete_collection(self.target)
        counts = {sp: (int(self.store.count(self.name, sp)), n) for sp, n in self.sizes.items()}
        return {"complete": all(a >= b for a, b in counts.values()), "counts": counts, "merged": merged}


def _stored(store, name: str, split: str, n: int) -> np.ndarray:
    """bool ``(n,)``: rows of ``split`` stored in collection ``name``."""
    from cbmir.ingest.job import _stored_rows

    return _stored_rows(store, name, split, n)

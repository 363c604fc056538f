"""Embedded engine: Qdrant Edge (``qdrant-edge-py``), the Qdrant engine in-process.

One shard directory per collection under the store root::

    <store_path>/<collection>/shard/       Qdrant Edge shard (segments + WAL)
    <store_path>/<collection>/meta.json    cbmir collection metadata (CollectionMeta)
    <store_path>/.locks/<collection>.lock  advisory lock file (see below)

Every query passes ``exact=True``: after ``optimize()`` Edge builds HNSW and non-exact queries
become approximate (DESIGN.md §4). A collection created in an approximate mode
(:mod:`cbmir.search.index_config`) carries its HNSW / quantization settings in the shard's
configuration; :meth:`EdgeStore.build_index` runs ``optimize()`` (the ingest job calls it once a
collection is complete), and queries in that mode pass ``exact=False`` with ``hnsw_ef`` and the
quantization's rescoring / oversampling. Exact queries (``exact=True``, quantization ignored) stay
exact on such a collection: Edge scores every point on its float32 vector.

**One process per collection; shared within a process.** Qdrant Edge itself refuses a second opener
of a shard with an opaque WAL error (``Can't init WAL: Kind(WouldBlock)``). Within one process every
:class:`EdgeStore` of the same root shares one loaded shard and one lock per collection (reference
counted: the shard is closed and the lock released when the last store using it closes), so a service,
a client and a CLI command in one process coexist. Across processes cbmir takes an advisory exclusive lock
first (``fcntl.flock`` on ``<store_path>/.locks/<collection>.lock``, non-blocking) whenever it opens,
creates or deletes a collection, holds it until :meth:`EdgeStore.close`, and writes the holder's
PID, host, command and start time into the file. A second process waits up to ``lock_wait_s`` seconds
for the lock (``CBMIR_LOCK_WAIT_S`` through :func:`cbmir.search.store.open_store`; 0 = not at all), then
gets a :class:`~cbmir.core.errors.StoreBusyError` naming the collection, the lock file and the holder.
A running ``cbmir serve`` releases its collections after a short idle time, so commands waiting on it get
in (README, "Search service"). The kernel drops the lock when the holder
exits, even on SIGKILL, so a stale lock file never blocks anyone. The lock files live outside the
collection directory so that deleting / recreating a collection keeps them. Reading metadata
(``read_meta``, ``list_collections``) takes no lock.

**Crash safety.** Points go through Edge's write-ahead log; after a SIGKILL the next
``EdgeShard.load`` replays it, so every acknowledged upsert is kept. ``meta.json`` is written
atomically after the shard exists and removed first on delete, so a collection interrupted while
being created or deleted reads as absent, and its leftover shard directory is removed by the next
create.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import qdrant_edge as qe

from cbmir.core.errors import CbmirError, StoreBusyError
from cbmir.search.filters import Selection, as_selection
from cbmir.search.index_config import IndexConfig, search_settings
from cbmir.search.schema import CollectionMeta, parse_meta
from cbmir.search.store import VectorStore, engine_distance

try:  # advisory locks (POSIX); elsewhere Edge's own WAL lock is the only guard
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_DIST = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot, "euclidean": qe.Distance.Euclid}

#: process-wide registry, keyed by (resolved store root, collection): the open shard, and the lock file
#: handle with the ids of the EdgeStore objects using it (all guarded by ``_REGISTRY_LOCK``)
_REGISTRY_LOCK = threading.RLock()
_SHARDS: dict[tuple[str, str], "qe.EdgeShard"] = {}
_LOCKS: dict[tuple[str, str], tuple[object, set[int]]] = {}


def _split_filter(where: str | Selection | None):
    """Qdrant Edge filter of a split name or a :class:`~cbmir.search.filters.Selection` (None: no filter)."""
    sel = as_selection(where)
    if sel is None:
        return None
    conds = [qe.FieldCondition(key="split", match=qe.MatchValue(sel.split))]
    for field, values in sel.match:
        match = qe.MatchValue(values[0]) if len(values) == 1 else qe.MatchAny(list(values))
        conds.append(qe.FieldCondition(key=field, match=match))
    return qe.Filter(must=conds)


def _command() -> str:
    """What this process is, for the lock file: ``cbmir serve``, ``cbmir ingest``, or the script name."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if prog in ("cli.py", "__main__.py", "cbmir"):
        sub = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
        return f"cbmir {sub}".strip()[:60]
    return ("python -c" if prog == "-c" else prog)[:60]
def _edge_config(meta: CollectionMeta) -> "qe.EdgeConfig":
    """The shard configuration of ``meta``: one dense vector per layout chunk; for an approximate search mode
    also its HNSW graph (``m = 0``: none, for a quantized brute-force scan), quantization (quantized vectors
    pinned in RAM) and the indexing threshold."""
    dist = _DIST[engine_distance(meta)]
    vectors = {c: qe.EdgeVectorParams(size=b - a, distance=dist) for c, a, b in meta.layout}
    mode = meta.index_config()
    if not mode.approximate:
        return qe.EdgeConfig(vectors=vectors, payload_memory=qe.Memory.Cached)
    quant = None
    if mode.quantization == "int8":
        quant = qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=mode.quantile, memory=qe.Memory.Pinned)
    elif mode.quantization == "binary":
        quant = qe.BinaryQuantizationConfig(memory=qe.Memory.Pinned)
    return qe.EdgeConfig(
        vectors=vectors, payload_memory=qe.Memory.Cached, quantization_config=quant,
        hnsw_config=qe.HnswIndexConfig(m=mode.m if mode.index == "hnsw" else 0, ef_construct=mode.ef_construct,
                                       full_scan_threshold=mode.full_scan_kb),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=mode.full_scan_kb))


def _search_params(mode: IndexConfig | None) -> "qe.SearchParams":
    """Per-query search parameters (:func:`cbmir.search.index_config.search_settings`)."""
    params, quant = search_settings(mode)
    return qe.SearchParams(**params, quantization=qe.QuantizationSearchParams(**quant) if quant else None)


def _write_meta_file(d: Path, meta: CollectionMeta) -> None:
    """``d/meta.json`` replaced atomically (temporary file + ``os.replace``)."""
    tmp = d / "meta.json.tmp"
    tmp.write_text(meta.to_json())
    os.replace(tmp, d / "meta.json")


class EdgeStore(VectorStore):
    """Collections stored as Qdrant Edge shards under ``root`` (see module docstring).

    Raises:
        CbmirError: a shard cannot be opened (e.g. another process holds it).
    """

    engine = "qdrant-edge"
    concurrent_writers = False
    #: seconds to wait for another process's lock on a collection before failing (0: fail at once)
    lock_wait_s: float = 0.0

    def __init__(self, root: str | os.PathLike, *, lock_wait_s: float = 0.0) -> None:
        self.root = Path(root)
        self.lock_wait_s = max(0.0, float(lock_wait_s))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CbmirError(f"cannot create the embedded store directory {self.root} ({exc.strerror or exc}); "
                             "give a writable directory with --store-path / CBMIR_STORE_PATH") from None
        self._root_key = str(self.root.resolve())
        self._locks: dict[str, object] = {}

    # -- paths and shards
    def _dir(self, name: str) -> Path:
        return self.root / name

    def lock_path(self, name: str) -> Path:
        """Advisory lock file of collection ``name``: ``<root>/.locks/<name>.lock``."""
        return self.root / ".locks" / f"{name}.lock"

    def _key(self, name: str) -> tuple[str, str]:
        return (self._root_key, name)

    def _lock(self, name: str) -> None:
        """Take the exclusive advisory lock of ``name`` for this process (shared with the other stores of
        this process on the same root; no-op when this store already holds it).

        Raises:
            CbmirError: another process holds it; names the collection, the lock file and the holder's
                PID / host / start time.
        """
        if name in self._locks:
            return
        with _REGISTRY_LOCK:
            held = _LOCKS.get(self._key(name))
            if held is not None:
                held[1].add(id(self))
                self._locks[name] = held[0]
                return
            fh = self._flock(name)
            _LOCKS[self._key(name)] = (fh, {id(self)})
            self._locks[name] = fh

    def _flock(self, name: str):
        if fcntl is None:
            return None
        path = self.lock_path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
        except OSError as exc:
            raise CbmirError(f"cannot create the lock file {path} of the embedded store {self.root} "
                             f"({type(exc).__name__}: {exc}); the store directory must be writable") from None
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                    continue
                fh.seek(0)
                holder = fh.read().strip() or "unknown process"
                fh.close()
                waited = f" (waited {self.lock_wait_s:g} s)" if self.lock_wait_s else ""
                raise StoreBusyError(
                    f"collection {name!r} of the embedded store {self.root} is in use by another process "
                    f"({holder}; lock file {path}){waited}. Wait for it to finish (or raise CBMIR_LOCK_WAIT_S), "
                    "or use another --store-path (CBMIR_STORE_PATH); nothing was changed.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid={os.getpid()} host={socket.gethostname()} cmd={_command()!r} "
                 f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        fh.flush()
        return fh

    def _release(self, name: str) -> None:
        """Stop using ``name``: the last store of this process to do so flushes and closes its shard and
        releases the lock."""
        with _REGISTRY_LOCK:
            self._locks.pop(name, None)
            held = _LOCKS.get(self._key(name))
            if held is None:
                return
            held[1].discard(id(self))
            if held[1]:
                return
            del _LOCKS[self._key(name)]
            try:
                self._drop_shard(name)
            finally:
                if held[0] is not None:
                    held[0].close()  # closing the descriptor releases the flock

    def _unlock_all(self) -> None:
        for name in list(self._locks):
            self._release(name)

    def _drop_shard(self, name: str, flush: bool = True) -> None:
        """Close the process's open shard of ``name`` (every store of this process reloads it on next use)."""
        with _REGISTRY_LOCK:
            sh = _SHARDS.pop(self._key(name), None)
            if sh is not None:
                try:
                    if flush:
                        sh.flush()
                finally:
                    sh.close()

    def _shard(self, name: str) -> qe.EdgeShard:
        with _REGISTRY_LOCK:
            self._lock(name)
            sh = _SHARDS.get(self._key(name))
            if sh is None:
                path = self._dir(name) / "shard"
                try:
                    sh = qe.EdgeShard.load(str(path))
                except Exception as e:  # noqa: BLE001 - the engine reports lock / corruption as a generic error
                    raise CbmirError(
                        f"cannot open the embedded store collection at {path}: {e}. If another cbmir process "
                        "is using this store, wait for it to finish or use another --store-path.") from None
                _SHARDS[self._key(name)] = sh
            return sh

    # -- primitives
    def _create(self, name: str, meta: CollectionMeta) -> None:
        self._lock(name)
        d = self._dir(name)
        if (d / "shard").exists() and not (d / "meta.json").exists():
            # left by a create or delete that was interrupted: it holds no cbmir points (every
            # upsert needs meta.json), so it is removed rather than reused
            self._drop_shard(name, flush=False)
            shutil.rmtree(d / "shard")
        d.mkdir(parents=True, exist_ok=True)
        sh = qe.EdgeShard.create(str(d / "shard"), _edge_config(meta))
        sh.update(qe.UpdateOperation.create_field_index("split", qe.PayloadSchemaType.Keyword))
        sh.flush()
        with _REGISTRY_LOCK:
            self._drop_shard(name)
            _SHARDS[self._key(name)] = sh
        _write_meta_file(d, meta)  # metadata appears atomically, after the shard exists

    def write_meta(self, name: str, meta: CollectionMeta) -> None:
        self._lock(name)
        d = self._dir(name)
        if not (d / "meta.json").exists():
            raise CbmirError(f"collection {name!r} does not exist in the embedded store {self.root}")
        _write_meta_file(d, meta)

    def read_meta(self, name: str) -> CollectionMeta | None:
        p = self._dir(name) / "meta.json"
        if not p.exists():
            return None
        return parse_meta(p.read_bytes(), name, f"file {p}")  # damaged: DamagedMetaError naming p

    def _upsert(self, name, ids, chunks, payloads) -> None:
        sh = self._shard(name)
        lists = {c: v.tolist() for c, v in chunks.items()}
        points = [qe.Point(pid, {c: lists[c][i] for c in lists}, payloads[i]) for i, pid in enumerate(ids)]
        sh.update(qe.UpdateOperation.upsert_points(points))

    def _query(self, name, vector_name, queries, limit, split, mode=None):
        sh = self._shard(name)
        flt = _split_filter(split)
        params = _search_params(mode)
        reqs = [qe.QueryRequest(limit=int(limit), query=qe.Query.Nearest(row.tolist(), using=vector_name),
                                filter=flt, params=params, with_payload=False, with_vector=False)
                for row in queries]
        out = sh.query_batch(qe.QueryBatchRequest(reqs))
        return [[(int(p.id), float(p.score)) for p in res] for res in out]

    def _scroll(self, name, split, with_vectors, batch=1024) -> Iterator:
        sh = self._shard(name)
        offset = None
        while True:
            recs, offset = sh.scroll(qe.ScrollRequest(offset=offset, limit=batch, filter=_split_filter(split),
                                                      with_payload=True, with_vector=with_vectors))
            if recs:
                ids = [int(r.id) for r in recs]
                chunks = None
                if with_vectors:
                    chunks = {c: np.asarray([r.vector[c] for r in recs], dtype=np.float32) for c in recs[0].vector}
                yield ids, chunks, [dict(r.payload or {}) for r in recs]
            if offset is None:
                break

    def _retrieve(self, name, ids, with_vectors):
        recs = self._shard(name).retrieve(list(ids), with_payload=True, with_vector=with_vectors)
        return [(int(r.id), ({c: np.asarray(v, dtype=np.float32) for c, v in r.vector.items()}
                             if with_vectors else None), dict(r.payload or {})) for r in recs]

    def count(self, name: str, split: str | None = None) -> int:
        self.meta(name)
        return int(self._shard(name).count(qe.CountRequest(exact=True, filter=_split_filter(split))))

    def delete_points(self, name: str, ids: Sequence[int]) -> None:
        self._shard(name).update(qe.UpdateOperation.delete_points([int(i) for i in ids]))

    def _overwrite_payload(self, name, pairs) -> None:
        sh = self._shard(name)
        for pid, payload in pairs:
            sh.update(qe.UpdateOperation.overwrite_payload([int(pid)], payload))

    def disk_bytes(self, name: str) -> int | None:
        d = self._dir(name)
        if not d.is_dir():
            return None
        # blocks in use: the engine preallocates its files sparsely (apparent sizes of 32 MB and more)
        return sum(getattr(st, "st_blocks", 0) * 512 or st.st_size
                   for f in d.rglob("*") if f.is_file() and not f.is_symlink() for st in (f.stat(),))

    def export_dir(self, name: str) -> Path:
        """The directory of collection ``name`` (``meta.json`` + ``shard/``), flushed and closed, for a
        snapshot (:mod:`cbmir.search.snapshot`). The lock stays held by this store until :meth:`close`, so
        no other process writes it meanwhile; this process reopens the shard on its next use.

        Raises:
            CbmirError: the collection does not exist, or another process holds it.
        """
        self.meta(name)
        self._lock(name)
        self._drop_shard(name)
        return self._dir(name)

    def import_dir(self, directory: Path, name: str) -> None:
        """Make ``directory`` (a collection directory unpacked from a snapshot, on the same file system as
        the store) the collection ``name``, by one rename; its shard is then opened to check it loads.

        Raises:
            CbmirError: ``name`` exists already; the unpacked shard does not load (it is removed).
        """
        self._lock(name)
        if self.read_meta(name) is not None or self._dir(name).exists():
            raise CbmirError(f"collection {name!r} already exists in the embedded store {self.root}; delete it "
                             "first (`cbmir collections delete`) or restore under another --name")
        os.replace(directory, self._dir(name))
        try:
            self.count(name)
        except CbmirError:
            self.delete_collection(name)
            raise
    def build_index(self, name: str) -> bool:
        """Run Edge's optimizer on an approximate collection (HNSW graph, quantized vectors; blocking, minutes for
        millions of points); True when it built something (False: an exact collection, or already built)."""
        if not self.meta(name).index_config().approximate:
            return False
        sh = self._shard(name)
        built = bool(sh.optimize())
        sh.flush()
        return built

    def lock(self, name: str) -> None:
        """Take the advisory lock of ``name`` for this process, waiting up to :attr:`lock_wait_s` for another
        process to release it."""
        self._lock(name)

    def release_collection(self, name: str) -> None:
        """Close this store's use of ``name`` (the shard is flushed and closed, and the lock released, when no other
        store of this process uses it), so that another process can open it."""
        self._release(name)

    def flush(self, name: str | None = None) -> None:
        """Flush pending writes of one collection (or all open ones) to disk."""
        for n in list(self._locks):
            sh = _SHARDS.get(self._key(n))
            if sh is not None and (name is None or n == name):
                sh.flush()

    def delete_collection(self, name: str) -> None:
        if self._dir(name).exists():
            self._lock(name)
        self._drop_shard(name, flush=False)
        d = self._dir(name)
        if d.exists():
            (d / "meta.json").unlink(missing_ok=True)  # first: a half-deleted collection reads as absent
            shutil.rmtree(d)

    def replace_collection(self, staging: str, name: str) -> None:
        """Make ``name`` the collection built in ``staging`` by renaming its directory (no copy).

        Both collections are locked and closed; ``name``'s directory is first renamed aside (one
        atomic rename), then ``staging``'s is renamed to ``name`` and the old one deleted, so at every
        moment each complete collection exists under some directory of the store.

        Raises:
            CbmirError: ``staging`` does not exist, or another process holds either collection.
        """
        self.meta(staging)
        self._lock(staging)
        self._lock(name)
        for n in (staging, name):
            self._drop_shard(n)
        dst = self._dir(name)
        trash = self.root / f".replaced-{name}-{os.getpid()}"
        shutil.rmtree(trash, ignore_errors=True)
        if dst.exists():
            os.replace(dst, trash)
        os.replace(self._dir(staging), dst)
        shutil.rmtree(trash, ignore_errors=True)
        self._rerank_cache = None

    def list_collections(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/meta.json"))

    def release(self) -> int:
        """Stop using every collection this store opened (as :meth:`close`); the store stays usable and
        reopens a collection, taking its lock again, on next use. Returns how many were released."""
        n = len(self._locks)
        self._unlock_all()
        self._rerank_cache = None
        return n

    def close(self) -> None:
        """Stop using every collection this store opened: shards that no other store of this process uses
        are flushed and closed, and their locks released."""
        self._unlock_all()

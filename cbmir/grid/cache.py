"""The grid's feature cache: features extracted once, indexed twice.

Two distances of the same (dataset, size, model, backend, random_init) need two collections (the
engine stores cosine vectors normalised). The grid extracts the features once: the first cell
wraps its source and embedder in :class:`RecordingSource` / :class:`RecordingEmbedder`, which write
every embedded batch to ``<results dir>/.feature_cache/`` (:class:`FeatureCache`); the second cell
reads them back through :class:`ReplaySource` / :class:`ReplayEmbedder` instead of extracting again.
"""

from __future__ import annotations

import shutil
import threading
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np

from cbmir.core.splits import CODE_SPLITS, SPLIT_CODES
from cbmir.ingest.base import Batch

__all__ = ["CACHE_DIR", "FeatureCache", "RecordingSource", "RecordingEmbedder", "ReplaySource", "ReplayEmbedder",
           "cache_wrappers"]

#: Folder of the feature cache, relative to the results table's folder.
CACHE_DIR = ".feature_cache"


class FeatureCache:
    """Features of one (dataset, size, model, backend, random_init) on disk, to index them twice.

    Layout: ``<root>/<name>/<split>.npy`` float32 (N, dim) (memory-mapped) and
    ``<split>.done.npy`` bool (N,) marking the rows written.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name

    def _paths(self, split: str) -> tuple[Path, Path]:
        return self.dir / f"{split}.npy", self.dir / f"{split}.done.npy"

    def complete(self, split: str, n: int, dim: int) -> bool:
        vec_p, done_p = self._paths(split)
        if not (vec_p.exists() and done_p.exists()):
            return False
        done = np.load(done_p)
        shape = np.load(vec_p, mmap_mode="r").shape
        return done.shape == (n,) and bool(done.all()) and shape == (n, dim)

    def writer(self, split: str, n: int, dim: int):
        self.dir.mkdir(parents=True, exist_ok=True)
        vec_p, done_p = self._paths(split)
        if vec_p.exists() and np.load(vec_p, mmap_mode="r").shape == (n, dim) and done_p.exists():
            vecs = np.load(vec_p, mmap_mode="r+")
            done = np.load(done_p)
        else:
            vecs = np.lib.format.open_memmap(vec_p, mode="w+", dtype=np.float32, shape=(n, dim))
            done = np.zeros(n, dtype=bool)
        return vecs, done, done_p

    def reader(self, split: str) -> np.ndarray:
        return np.load(self._paths(split)[0], mmap_mode="r")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class RecordingSource:
    """Wraps a dataset source: remembers, for every batch it yields, which rows its images are.

    The ingest job may read ahead in a thread and hand the embedder a batch later (or a subset of
    it), so the rows are looked up by the identity of the image array the embedder receives
    (a weak reference guards against a reused ``id``). Images of a batch that reach the embedder
    as a new array (a resumed batch cut to its missing rows) are not recorded; the cache is then
    incomplete and the twin cell extracts its own features.
    """

    def __init__(self, source) -> None:
        self._source = source
        self._rows: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._source, name)

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        for batch in self._source.iter_batches(split, batch_size, start=start):
            images = batch.images
            try:
                ref = weakref.ref(images)
            except TypeError:  # not weak-referenceable: cannot be matched safely
                ref = None
            if ref is not None:
                with self._lock:
                    self._rows[id(images)] = (ref, split, np.asarray(batch.indices))
            yield batch

    def rows_of(self, images) -> tuple[str, np.ndarray] | None:
        """``(split, row indices)`` of an image array this source yielded, else None."""
        with self._lock:
            hit = self._rows.pop(id(images), None)
            if hit is not None and hit[0]() is not images:
                return None
        return None if hit is None else (hit[1], hit[2])


class RecordingEmbedder:
    """Wraps an embedder: writes every embedded batch into a :class:`FeatureCache`."""

    def __init__(self, embedder, source: RecordingSource, cache: FeatureCache) -> None:
        self._embedder, self._source, self._cache = embedder, source, cache
        self._open: dict[str, tuple] = {}

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed(self, images: np.ndarray) -> np.ndarray:
        vecs = self._embedder.embed(images)
        hit = self._source.rows_of(images)
        if hit is not None and len(hit[1]) == len(vecs):
            split, idx = hit
            if split not in self._open:
                self._open[split] = self._cache.writer(split, self._source.split_size(split), vecs.shape[1])
            arr, done, _ = self._open[split]
            if arr.shape[1] == vecs.shape[1]:
                arr[idx] = vecs
                done[idx] = True
        return vecs

    def flush(self) -> None:
        for arr, done, done_p in self._open.values():
            arr.flush()
            np.save(done_p, done)


class ReplaySource:
    """A dataset source whose batches carry ``(split code, row)`` pairs instead of pixels.

    ``images`` of each batch is int64 ``(B, 2)``; :class:`ReplayEmbedder` turns them into the
    cached features.
    """

    def __init__(self, source) -> None:
        self._source = source

    def __getattr__(self, name):
        return getattr(self._source, name)

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        n = self._source.split_size(split)
        labels = self._source.labels(split)
        prefix = f"{self._source.name}_{self._source.size}/{split}/"
        for lo in range(int(start), n, int(batch_size)):
            hi = min(lo + int(batch_size), n)
            idx = np.arange(lo, hi, dtype=np.int64)
            keys = np.stack([np.full_like(idx, SPLIT_CODES[split]), idx], axis=1)
            yield Batch(images=keys, labels=labels[lo:hi].copy(), indices=idx,
                        image_ids=[f"{prefix}{i}" for i in range(lo, hi)])


class ReplayEmbedder:
    """Embedder that returns the cached features of the ``(split code, row)`` pairs it is given."""

    #: read by :func:`cbmir.app.ingesting.ingest_collection`: its ingest time is no extraction time
    replays_features = True

    def __init__(self, embedder, cache: FeatureCache) -> None:
        self._embedder, self._cache = embedder, cache
        self._readers: dict[str, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed(self, images: np.ndarray) -> np.ndarray:
        keys = np.asarray(images)
        out = np.empty((len(keys), int(self._embedder.dim)), dtype=np.float32)
        for code in np.unique(keys[:, 0]):
            split = CODE_SPLITS[int(code)]
            if split not in self._readers:
                self._readers[split] = self._cache.reader(split)
            m = keys[:, 0] == code
            out[m] = self._readers[split][keys[m, 1]]
        return out


def cache_wrappers(source, embedder, cache: FeatureCache, *, replay: bool, record: bool) -> tuple:
    """``(source, embedder)`` for the ingest job: replaying ``cache`` (``replay``), recording into it
    (``record``: twin cells will replay it), or ``source`` and ``embedder`` themselves."""
    if replay:
        return ReplaySource(source), ReplayEmbedder(embedder, cache)
    if record:
        rec_source = RecordingSource(source)
        return rec_source, RecordingEmbedder(embedder, rec_source, cache)
    return source, embedder

"""Bounded-memory ingest: npz rows streamed from the zip member, the pipelined ingest job."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Batch
from cbmir.ingest.npz_stream import NpyMemberReader
from cbmir.ingest.pipeline import BackgroundWriter, prefetch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("compressed", [False, True])
def test_reader_rows_equal_np_load(tmp_path, compressed):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.integers(0, 256, (301, 9, 7, 3), dtype=np.uint8),
              "b": rng.standard_normal((50, 4)).astype(np.float32), "c": np.arange(10)}
    p = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(p, **arrays)
    r = NpyMemberReader(p, "a")
    assert r.shape == (301, 9, 7, 3) and r.dtype == np.uint8 and r.stored is (not compressed)
    # sequential batches, a backward jump, a forward skip, the tail and an empty / clipped range
    for a, b in [(0, 64), (64, 128), (128, 192), (10, 11), (250, 301), (300, 400), (301, 310), (5, 5)]:
        np.testing.assert_array_equal(r.read_rows(a, b), arrays["a"][a:b])
    np.testing.assert_array_equal(NpyMemberReader(p, "b.npy").read_rows(3, 40), arrays["b"][3:40])
    np.testing.assert_array_equal(NpyMemberReader(p, "c").read_rows(0, 10), arrays["c"])
    r2 = pickle.loads(pickle.dumps(r))  # handles are not pickled; reopened lazily
    np.testing.assert_array_equal(r2.read_rows(100, 120), arrays["a"][100:120])
    with pytest.raises(CbmirError, match="no array"):
        NpyMemberReader(p, "missing")
    with pytest.raises(CbmirError, match="invalid"):
        r.read_rows(5, 2)


def test_reader_refuses_fortran_object_and_truncated(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, f=np.asfortranarray(np.ones((4, 3))), o=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CbmirError, match="Fortran"):
        NpyMemberReader(p, "f")
    with pytest.raises(CbmirError, match="objects"):
        NpyMemberReader(p, "o")
    q = tmp_path / "t.npz"
    np.savez(q, a=np.zeros((100, 1000), np.uint8))
    data = q.read_bytes()
    r = NpyMemberReader(q, "a")
    q.write_bytes(data[: len(data) // 2])  # truncated after the header was read
    with pytest.raises(CbmirError, match="truncated"):
        r.read_rows(0, 100)


@pytest.mark.parametrize("compressed", [False, True])
def test_medmnist_reader_streams_synthetic_file(tmp_path, monkeypatch, compressed):
    """The MedMNIST reader on a file written by the benchmark's incremental npz writer."""
    from medmnist import INFO

    from cbmir.benchmarks.bench import write_synthetic_medmnist_npz
    from cbmir.ingest.medmnist_data import open_medmnist

    n = {"train": 70, "val": 3, "test": 9}
    write_synthetic_medmnist_npz(tmp_path / "pathmnist_64.npz", n, (64, 64, 3), chunk_rows=16,
                                 compress=compressed)
    monkeypatch.setitem(INFO["pathmnist"], "n_samples", n)
    src = open_medmnist("pathmnist", 64, tmp_path, verify=False)
    with np.load(tmp_path / "pathmnist_64.npz") as npz:
        ref, labels = npz["train_images"], npz["train_labels"][:, 0]
    got = list(src.iter_batches("train", 32, start=5))
    assert [len(b) for b in got] == [32, 32, 1]
    np.testing.assert_array_equal(np.concatenate([b.images for b in got]), ref[5:])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in got]), labels[5:])
    assert not got[0].images.flags.writeable
    assert len(np.unique(ref.reshape(70, -1)[:, :50], axis=0)) > 1  # chunks differ


def test_streaming_memory_is_one_batch(tmp_path):
    """Reading a 400 MB stored member in batches keeps the peak RSS near one batch (child process)."""
    p = tmp_path / "big.npz"
    code = f"""
import json, resource, sys, zipfile
import numpy as np
from numpy.lib import format as fmt
sys.path.insert(0, {str(ROOT)!r})
from cbmir.ingest.npz_stream import NpyMemberReader
p = {str(p)!r}
row = np.arange(224 * 224 * 3, dtype=np.uint64).astype(np.uint8).reshape(224, 224, 3)
n = 2700  # 406 MB
with zipfile.ZipFile(p, "w", allowZip64=True) as zf, zf.open("train_images.npy", "w", force_zip64=True) as fh:
    fmt.write_array_header_1_0(fh, {{"descr": "|u1", "fortran_order": False, "shape": (n, 224, 224, 3)}})
    for i in range(0, n, 100):
        fh.write(np.broadcast_to(row, (min(100, n - i), 224, 224, 3)).copy().data)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = NpyMemberReader(p, "train_images")
total = 0
for a in range(0, n, 64):
    total += int(r.read_rows(a, a + 64)[:, 0, 0, 0].sum())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grow_mb": (peak - base) / 1024, "rows": n, "total": total}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["grow_mb"] < 60, rep  # one 9.6 MB batch (+ slack), not the 406 MB array


# ----------------------------------------------------------------------------- pipeline helpers
def test_prefetch_order_errors_and_early_stop():
    with prefetch(iter(range(50)), depth=3) as it:
        assert list(it) == list(range(50))

    def boom():
        yield 1
        yield 2
        raise ValueError("reader failed at item 3")

    with prefetch(boom()) as it:
        assert next(it) == 1 and next(it) == 2
        with pytest.raises(ValueError, match="item 3"):
            next(it)

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with prefetch(endless(), depth=2) as it:
        assert next(it) == 0
    assert closed.wait(5)  # leaving the block stops the thread and closes the generator
    assert list(prefetch(iter([1, 2]), depth=0)) == [1, 2]


def test_background_writer_order_bound_and_errors():
    done = []
    with BackgroundWriter(max_pending=1) as w:
        for i in range(20):
            w.submit(lambda i=i: (time.sleep(0.001), done.append(i)))
    assert done == list(range(20))  # all ran, in order, before the block was left

    ran = []

    def fail(i):
        if i == 2:
            raise OSError("disk full")
        ran.append(i)

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(max_pending=1) as w:
            for i in range(10):
                w.submit(fail, i)
                time.sleep(0.01)
    assert ran == [0, 1]  # nothing after the failure ran

    with pytest.raises(OSError, match="disk full"):  # failure surfaced when leaving the block
        with BackgroundWriter(max_pending=1) as w:
            w.submit(fail, 2)

    slow_done = []
    with pytest.raises(KeyError):  # caller fails: the upsert already handed over still completes
        with BackgroundWriter(max_pending=1) as w:
            w.submit(lambda: (time.sleep(0.2), slow_done.append(1)))
            raise KeyError("extractor failed")
    assert slow_done == [1]


# ----------------------------------------------------------------------------- the pipelined job
class _Source:
    name, size, is_3d, n_classes = "synthetic", 28, False, 3

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)

    def split_size(self, split):
        return self.n

    def labels(self, split):
        return np.arange(self.n) % 3

    def iter_batches(self, split, batch_size, start=0):
        for a in range(start, self.n, batch_size):
            if self.fail_at is not None and a >= self.fail_at:
                raise OSError(f"read error at row {a}")
            b = min(self.n, a + batch_size)
            yield Batch(images=self.images[a:b], labels=np.arange(a, b) % 3, indices=np.arange(a, b),
                        image_ids=[f"synthetic/{split}/{i}" for i in range(a, b)])


class _Embedder:
    dim, aggregation, is_3d = 16, "none", False

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def embed(self, images):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("extractor crashed")
        return images.reshape(len(images), -1)[:, :16].astype(np.float32) + 1.0

    def identity(self):
        return {"model": "toy", "backend": "numpy", "weights": "none", "preprocessing": "first 16 pixels"}


def test_pipelined_ingest_is_complete_resumable_and_propagates(tmp_path):
    from cbmir.ingest.job import ingest
    from cbmir.search.edge_store import EdgeStore

    store = EdgeStore(tmp_path / "s")
    try:
        with pytest.raises(RuntimeError, match="extractor crashed"):
            ingest(_Source(200), _Embedder(fail_at=3), store, splits=("train",), batch_size=32, progress=False)
        name = "synthetic_28_toy"
        assert store.count(name, "train") == 96  # the 3 batches handed over were all stored
        with pytest.raises(OSError, match="read error at row 160"):
            ingest(_Source(200, fail_at=160), _Embedder(), store, splits=("train",), batch_size=32, progress=False)
        assert store.count(name, "train") == 160
        rep = ingest(_Source(200), _Embedder(), store, splits=("train",), batch_size=32, progress=False)
        assert rep.resumed_from["train"] == 160 and rep.written["train"] == 40
        idx, vec, _ = store.fetch(name, "train")
        assert idx.tolist() == list(range(200))
        want = _Embedder().embed(_Source(200).images)
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(vec, want, rtol=1e-5, atol=1e-6)

        class FailingStore(EdgeStore):
            def upsert(self, name, split, indices, vectors, payloads):
                if indices[0] >= 64:
                    raise OSError("store unavailable")
                super().upsert(name, split, indices, vectors, payloads)

        bad = FailingStore(tmp_path / "s2")
        try:
            with pytest.raises(OSError, match="store unavailable"):
                ingest(_Source(200), _Embedder(), bad, splits=("train",), batch_size=32, progress=False)
            assert bad.count(name, "train") == 64
        finally:
            bad.close()
    finally:
        store.close()

"""Shared fixtures: the real MedMNIST files in ../shared/data/medmnist and fresh stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch/torchvision before anything imports TensorFlow: importing TensorFlow first makes the later
# triton import (torchvision.ops -> torch._dynamo -> triton) segfault with torch 2.14 + TF 2.21.
import torchvision.ops  # noqa: F401,E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CBMIR_TEST_DATA_DIR", REPO.parent / "shared" / "data" / "medmnist"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the real, MD5-verified MedMNIST files (read-only)."""
    if not (SHARED_DATA / "breastmnist.npz").exists():
        pytest.skip(f"real MedMNIST files not found in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(params=["edge", "client"])
def store(request, tmp_path):
    """A fresh store on each engine: Qdrant Edge, and qdrant-client local mode (the server code path)."""
    if request.param == "edge":
        from cbmir.search.edge_store import EdgeStore

        s = EdgeStore(tmp_path / "store")
    else:
        from cbmir.search.server_store import ServerStore

        s = ServerStore(location=":memory:")
    yield s
    s.close()


class InterruptedSource:
    """A dataset source that raises KeyboardInterrupt (like Ctrl-C or a kill) when batch ``after`` of any
    split is about to be yielded; everything else is the wrapped source's."""

    def __init__(self, src, after: int):
        self.src, self.after = src, after

    def __getattr__(self, name):
        return getattr(self.src, name)

    def iter_batches(self, split, batch_size, start=0):
        yield from self._stop(self.src.iter_batches(split, batch_size, start=start))

    def iter_items(self, split, entries, batch_size, **kw):  # an archive's sync (cbmir.ingest.sync)
        yield from self._stop(self.src.iter_items(split, entries, batch_size, **kw))

    def _stop(self, batches):
        for i, batch in enumerate(batches):
            if i == self.after:
                raise KeyboardInterrupt
            yield batch


@pytest.fixture
def interrupted():
    """``interrupted(source, after)``: :class:`InterruptedSource`, for kill-and-resume tests."""
    return InterruptedSource

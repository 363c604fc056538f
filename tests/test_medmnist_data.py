"""MedMNIST reader on the real, MD5-verified files (../shared/data/medmnist, SOURCES.md there)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from medmnist import INFO

from cbmir.ingest import medmnist_data as md
from cbmir.core.splits import SPLITS
from cbmir.core.errors import CbmirError
from cbmir.ingest.base import DatasetSource
from cbmir.ingest.medmnist_data import MedMNISTSource, open_medmnist

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CBMIR_TEST_DATA_DIR", REPO.parent / "shared" / "data" / "medmnist"))

REAL = [  # (flag, size, file) of the real copies
    ("breastmnist", 28, "breastmnist.npz"),
    ("pneumoniamnist", 28, "pneumoniamnist.npz"),
    ("retinamnist", 28, "retinamnist.npz"),
    ("adrenalmnist3d", 28, "adrenalmnist3d.npz"),
    ("adrenalmnist3d", 64, "adrenalmnist3d_64.npz"),
    ("vesselmnist3d", 28, "vesselmnist3d.npz"),
]


def _need(file: str) -> Path:
    path = DATA_DIR / file
    if not path.is_file():
        pytest.skip(f"real MedMNIST file {path} not available (set CBMIR_TEST_DATA_DIR)")
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("flag,size,file", REAL)
def test_real_file_splits_shapes_labels(flag, size, file):
    path = _need(file)
    src = open_medmnist(flag, size, DATA_DIR)
    assert isinstance(src, DatasetSource)
    assert src.path == path and src.name == flag and src.size == size
    assert src.is_3d == flag.endswith("3d")
    assert src.n_classes == len(INFO[flag]["label"])
    with np.load(path, allow_pickle=False) as npz:  # independent read
        for split in SPLITS:
            n = src.split_size(split)
            assert n == INFO[flag]["n_samples"][split] == len(npz[f"{split}_images"])
            labels = src.labels(split)
            assert labels.dtype == np.int64 and labels.shape == (n,)
            np.testing.assert_array_equal(labels, npz[f"{split}_labels"][:, 0])
    batch = next(src.iter_batches("test", 4))
    assert batch.images.dtype == np.uint8
    if src.is_3d:
        assert batch.images.shape == (4, size, size, size)
    else:
        assert batch.images.shape == (4, size, size, INFO[flag]["n_channels"])
    assert batch.labels.dtype == np.int64 and batch.indices.dtype == np.int64
    assert batch.image_ids == [f"{flag}_{size}/test/{i}" for i in range(4)]


def test_batches_concatenate_to_full_split():
    path = _need("breastmnist.npz")
    src = open_medmnist("breastmnist", 28, DATA_DIR)
    batches = list(src.iter_batches("train", 100))  # 546 = 5 x 100 + 46
    assert [len(b) for b in batches] == [100] * 5 + [46]
    with np.load(path) as npz:
        full, labels = npz["train_images"], npz["train_labels"][:, 0]
    np.testing.assert_array_equal(np.concatenate([b.images[..., 0] for b in batches]), full)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(546))
    ids = [i for b in batches for i in b.image_ids]
    assert len(set(ids)) == 546 and ids[17] == "breastmnist_28/train/17"


def test_rgb_and_3d_batches_match_file():
    path = _need("retinamnist.npz")
    src = open_medmnist("retinamnist", 28, DATA_DIR)
    got = np.concatenate([b.images for b in src.iter_batches("val", 50)])
    with np.load(path) as npz:
        np.testing.assert_array_equal(got, npz["val_images"])
    path3 = _need("adrenalmnist3d_64.npz")
    src3 = open_medmnist("adrenalmnist3d", 64, DATA_DIR)
    b = next(src3.iter_batches("test", 3, start=295))
    with np.load(path3) as npz:
        np.testing.assert_array_equal(b.images, npz["test_images"][295:298])
    assert b.images.shape == (3, 64, 64, 64) and list(b.indices) == [295, 296, 297]


def test_start_resumes_at_the_right_row():
    path = _need("pneumoniamnist.npz")
    src = open_medmnist("pneumoniamnist", 28, DATA_DIR)
    with np.load(path) as npz:
        full = npz["test_images"]
    batches = list(src.iter_batches("test", 64, start=130))
    assert batches[0].indices[0] == 130 and batches[-1].indices[-1] == 623
    assert sum(len(b) for b in batches) == 624 - 130
    np.testing.assert_array_equal(batches[0].images[..., 0], full[130:194])
    assert batches[0].image_ids[0] == "pneumoniamnist_28/test/130"
    assert list(src.iter_batches("test", 64, start=624)) == []
    with pytest.raises(CbmirError):
        list(src.iter_batches("test", 64, start=625))
    with pytest.raises(CbmirError):
        list(src.iter_batches("test", 0))
    with pytest.raises(CbmirError, match="valid splits"):
        src.split_size("validation")


def test_batches_are_read_only_and_one_split_cached():
    _need("breastmnist.npz")
    src = open_medmnist("breastmnist", 28, DATA_DIR)
    b = next(src.iter_batches("train", 8))
    with pytest.raises(ValueError):
        b.images[0, 0, 0, 0] = 1
    next(src.iter_batches("test", 8))
    assert src._cached_split == "test"  # noqa: SLF001 - the train array was dropped


def test_missing_file_message(tmp_path):
    with pytest.raises(CbmirError) as info:
        open_medmnist("breastmnist", 64, tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "breastmnist_64.npz") in msg
    assert INFO["breastmnist"]["MD5_64"] in msg
    assert INFO["breastmnist"]["url_64"] in msg
    assert "CBMIR_DATA_DIR" in msg and "--data-dir" in msg and "download" in msg


def test_download_unreachable_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "_reachable", lambda url, timeout=3.0: (False, "probe failed"))
    with pytest.raises(CbmirError) as info:
        open_medmnist("breastmnist", 28, tmp_path, download=True)
    msg = str(info.value)
    assert "breastmnist.npz" in msg and "unreachable" in msg and INFO["breastmnist"]["MD5"] in msg


def test_download_writes_verified_file(tmp_path, monkeypatch):
    real = _need("breastmnist.npz")
    payload = real.read_bytes()
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(md, "_reachable", lambda url, timeout=3.0: (True, ""))
    monkeypatch.setattr(md.urllib.request, "urlopen", fake_urlopen)
    src = open_medmnist("breastmnist", 28, tmp_path / "new", download=True)
    assert seen == [INFO["breastmnist"]["url"]]
    assert _md5(src.path) == INFO["breastmnist"]["MD5"] and src.split_size("train") == 546
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["breastmnist.npz"]


def test_download_with_wrong_md5_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "_reachable", lambda url, timeout=3.0: (True, ""))
    monkeypatch.setattr(md.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"junk"))
    with pytest.raises(CbmirError, match=INFO["breastmnist"]["MD5"]):
        open_medmnist("breastmnist", 28, tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_names_file_and_md5s(tmp_path):
    real = _need("breastmnist.npz")
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    with pytest.raises(CbmirError) as info:
        open_medmnist("breastmnist", 28, tmp_path)
    msg = str(info.value)
    assert str(bad) in msg and INFO["breastmnist"]["MD5"] in msg and _md5(bad) in msg


def test_wrong_md5_and_wrong_layout(tmp_path):
    real = _need("breastmnist.npz")
    with np.load(real) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["test_images"] = arrays["test_images"][:-1]  # one image short, otherwise valid
    bad = tmp_path / "breastmnist.npz"
    np.savez_compressed(bad, **arrays)
    with pytest.raises(CbmirError) as info:
        open_medmnist("breastmnist", 28, tmp_path)
    assert str(bad) in str(info.value) and _md5(bad) in str(info.value)
    shape_msg = r"test_images has shape \(155, 28, 28\), expected \(156, 28, 28\)"
    with pytest.raises(CbmirError, match=shape_msg):
        open_medmnist("breastmnist", 28, tmp_path, verify=False)


def test_md5_cache_notices_a_changed_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 10)
    first = md.file_md5(f)
    assert first == hashlib.md5(b"a" * 10).hexdigest() and md.file_md5(f) == first
    f.write_bytes(b"b" * 11)
    os.utime(f, ns=(1, 1))
    assert md.file_md5(f) == hashlib.md5(b"b" * 11).hexdigest()


def test_unknown_flag_and_size_list_valid_values(tmp_path):
    with pytest.raises(CbmirError) as info:
        open_medmnist("nosuchmnist", 28, tmp_path)
    for flag in INFO:
        assert flag in str(info.value)
    with pytest.raises(CbmirError, match="valid sizes: 28, 64$"):
        open_medmnist("adrenalmnist3d", 128, tmp_path)
    with pytest.raises(CbmirError, match="valid sizes: 28, 64, 128, 224"):
        MedMNISTSource("breastmnist", 32, tmp_path)


def test_catalogue_covers_every_subset_and_size():
    assert set(md.MEDMNIST_FLAGS) == set(INFO)
    for flag, info in INFO.items():
        sizes = md.valid_sizes(flag)
        assert sizes == ((28, 64) if flag.endswith("3d") else (28, 64, 128, 224))
        for size in sizes:
            suffix = "" if size == 28 else f"_{size}"
            assert md.medmnist_filename(flag, size) == f"{flag}{suffix}.npz"
            assert md.expected_md5(flag, size) == info[f"MD5{suffix}"]
            assert md.dataset_url(flag, size) == info[f"url{suffix}"]
            assert f"{flag}{suffix}.npz" in md.dataset_url(flag, size)


def test_case_insensitive_flag_and_default_data_dir(monkeypatch):
    _need("breastmnist.npz")
    monkeypatch.setenv("CBMIR_DATA_DIR", str(DATA_DIR))
    src = open_medmnist("BreastMNIST")
    assert src.name == "breastmnist" and src.data_dir == DATA_DIR


def test_copy_in_other_dir_is_accepted(tmp_path):
    real = _need("vesselmnist3d.npz")
    shutil.copy(real, tmp_path / real.name)
    src = open_medmnist("vesselmnist3d", 28, tmp_path)
    assert src.split_size("val") == 191 and src.labels("val").shape == (191,)


class _Status:
    """A local HTTP server on 127.0.0.1 (free port) answering every HEAD/GET with one status code."""

    def __init__(self, code: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _answer  # noqa: N815 - http.server handler names

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/breastmnist.npz"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _refused_url() -> str:
    """A URL on 127.0.0.1 whose port has no listener (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/breastmnist.npz"


def _download_message(tmp_path, monkeypatch, url: str, probe_ok: bool | None = None) -> str:
    monkeypatch.setitem(INFO["breastmnist"], "url_64", url)
    if probe_ok is not None:  # skip the probe: the connection fails in the download itself
        monkeypatch.setattr(md, "_reachable", lambda u, timeout=3.0: (probe_ok, ""))
    with pytest.raises(CbmirError) as info:
        open_medmnist("breastmnist", 64, tmp_path / "data", download=True)
    msg = str(info.value)
    # dataset, size, expected MD5, the URL and the manual steps, as for a missing or truncated file
    for part in ("breastmnist at 64 px", INFO["breastmnist"]["MD5_64"], url, "breastmnist_64.npz",
                 "CBMIR_DATA_DIR", "--data-dir", "on any machine with network access"):
        assert part in msg, (part, msg)
    assert "\n" not in msg and not list((tmp_path / "data").glob("*")), msg  # nothing left behind
    return msg


@pytest.mark.parametrize("code,words", [(503, "HTTP 503 Service Unavailable (the server is down or busy"),
                                        (404, "HTTP 404 Not Found (the file is not at this URL")])
def test_download_http_error_names_dataset_md5_and_manual_steps(tmp_path, monkeypatch, code, words):
    with _Status(code) as server:
        msg = _download_message(tmp_path, monkeypatch, server.url)
    assert "The automatic download failed" in msg and words in msg


def test_download_connection_refused_names_dataset_md5_and_manual_steps(tmp_path, monkeypatch):
    url = _refused_url()
    msg = _download_message(tmp_path, monkeypatch, url)                  # the probe notices
    assert "unreachable" in msg and "refused" in msg.lower()
    msg = _download_message(tmp_path, monkeypatch, url, probe_ok=True)   # refused in the download itself
    assert "no connection" in msg and "refused" in msg.lower()

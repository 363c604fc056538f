"""MedMNIST v2 reader: every 2D and 3D subset of the ``medmnist`` package, every official size.

Source: Yang et al., *MedMNIST v2*, Scientific Data 10:41 (2023); file names, download URLs,
MD5 checksums, split sizes and label names come from ``medmnist.INFO`` (medmnist 3.0.2).

File layout (official ``.npz``, one per dataset and size): ``<flag>.npz`` at 28 px and
``<flag>_<size>.npz`` otherwise, holding ``{train,val,test}_images`` (uint8; 2D ``(N, s, s)``
grayscale or ``(N, s, s, 3)`` RGB, 3D ``(N, s, s, s)`` depth first) and ``{train,val,test}_labels``
(uint8 ``(N, L)``; L = 1 except for the multi-label ChestMNIST, L = 14).

Every file is MD5-verified before use (streamed hashing; the verified result is cached in
memory per ``(path, mtime, size)``), its array names, dtypes and shapes are checked against
``INFO`` from the ``.npy`` headers alone, and arrays are read with ``allow_pickle=False``.
Images are streamed from the zip member batch by batch (:mod:`cbmir.ingest.npz_stream`): peak memory is
one batch, whatever the file size; no split's image array is ever held whole.
"""

from __future__ import annotations

import hashlib
import operator
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npy_format

from cbmir.core.splits import SPLITS

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Batch
def _import_medmnist():
    """``import medmnist`` without losing a Ctrl-C: its ``__init__`` wraps its slow imports (torch,
    scipy; seconds) in a bare ``except:``, which would swallow the KeyboardInterrupt. In the main
    thread a SIGINT arriving meanwhile is recorded and re-raised after the import."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        import medmnist
        return medmnist
    got = []
    old = signal.signal(signal.SIGINT, lambda *_: got.append(1))
    try:
        import medmnist
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt
    return medmnist


try:  # medmnist imports torch/torchvision; INFO itself is plain data.
    _medmnist = _import_medmnist()
    from medmnist import INFO
except ImportError as exc:  # pragma: no cover - medmnist is a hard dependency
    raise ImportError("cbmir needs the `medmnist` package (pip install medmnist==3.0.2)") from exc

SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)
MEDMNIST_FLAGS: tuple[str, ...] = tuple(INFO)
"""Every MedMNIST v2 subset known to the installed ``medmnist`` package (2D and 3D)."""

_CHUNK = 1 << 20
_MD5_CACHE: dict[tuple[str, int, int], str] = {}
_MD5_LOCK = threading.Lock()


# --------------------------------------------------------------------------- catalogue
def is_3d_flag(flag: str) -> bool:
    """True when ``flag`` names a 3D MedMNIST subset (volumes), per ``medmnist``'s class sizes."""
    cls = getattr(_medmnist, INFO[flag]["python_class"], None)
    sizes = tuple(getattr(cls, "available_sizes", ()))
    return sizes == SIZES_3D if sizes else flag.endswith("3d")


def valid_sizes(flag: str) -> tuple[int, ...]:
    """Official sizes of ``flag``: (28, 64, 128, 224) for 2D, (28, 64) for 3D subsets."""
    return SIZES_3D if is_3d_flag(_check_flag(flag)) else SIZES_2D


def medmnist_filename(flag: str, size: int) -> str:
    """Official file name: ``<flag>.npz`` at 28 px, ``<flag>_<size>.npz`` otherwise."""
    flag, size = _check_flag_size(flag, size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(flag: str, size: int) -> str:
    """MD5 of the official file (``INFO[flag]["MD5"]`` at 28, ``INFO[flag]["MD5_<size>"]`` else)."""
    flag, size = _check_flag_size(flag, size)
    return INFO[flag]["MD5" if size == 28 else f"MD5_{size}"]


def dataset_url(flag: str, size: int) -> str:
    """Download URL of the official file (``INFO[flag]["url"]`` / ``["url_<size>"]``, Zenodo)."""
    flag, size = _check_flag_size(flag, size)
    return INFO[flag]["url" if size == 28 else f"url_{size}"]


def default_data_dir() -> Path:
    """``$CBMIR_DATA_DIR`` when set, else ``~/.medmnist`` (the medmnist package's default)."""
    env = os.environ.get("CBMIR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".medmnist"


def _check_flag(flag: str) -> str:
    key = str(flag).strip().lower()
    if key not in INFO:
        raise CbmirError(
            f"unknown MedMNIST dataset {flag!r}; valid datasets: {', '.join(MEDMNIST_FLAGS)}"
        )
    return key


def _check_flag_size(flag: str, size: int) -> tuple[str, int]:
    key = _check_flag(flag)
    sizes = SIZES_3D if is_3d_flag(key) else SIZES_2D
    try:
        size_i = int(size) if isinstance(size, str) else operator.index(size)
    except (TypeError, ValueError):
        size_i = None
    if size_i not in sizes:
        kind = "3D" if sizes == SIZES_3D else "2D"
        raise CbmirError(
            f"MedMNIST {kind} dataset {key!r} has no size {size!r}; "
            f"valid sizes: {', '.join(map(str, sizes))}"
        )
    return key, size_i


# --------------------------------------------------------------------------- integrity
def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, hashed in 1 MiB chunks.

    The result is cached in memory per ``(resolved path, mtime_ns, size in bytes)``, so a file
    is hashed once per process unless it changes.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    with _MD5_LOCK:
        hit = _MD5_CACHE.get(key)
    if hit is not None:
        return hit
    h = hashlib.md5(usedforsecurity=False)
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _MD5_LOCK:
        _MD5_CACHE[key] = digest
    return digest


def _reachable(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Cheap connectivity probe: does a server answer ``HEAD url`` within about ``timeout`` s?

    Any HTTP status counts as an answer. Runs in a daemon thread joined for ``timeout + 1`` s,
    because DNS lookups ignore socket timeouts. Returns ``(ok, reason when not ok)``.
    """
    result: list[str] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                result.append("")
        except urllib.error.HTTPError:
            result.append("")
        except Exception as exc:  # noqa: BLE001 - any other failure of the probe is its answer
            result.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if not result:
        host = urllib.parse.urlsplit(url).hostname
        return False, f"no answer from {host} within {timeout:g} s"
    return result[0] == "", result[0]


class DownloadError(CbmirError):
    """An automatic download failed; the message is the reason only (``MedMNISTSource`` adds the dataset,
    size, expected MD5 and the manual steps)."""


def _http_failure(exc: OSError) -> str:
    """Why a download failed, in words: the HTTP status (with a hint), the connection error, or the OS error."""
    if isinstance(exc, urllib.error.HTTPError):
        hint = ("the server is down or busy: try again later" if exc.code >= 500 else
                "the file is not at this URL (moved or withdrawn): check for a newer `medmnist` release"
                if exc.code in (404, 410) else "the server refused the request")
        return f"the server answered HTTP {exc.code} {exc.reason} ({hint})"
    if isinstance(exc, urllib.error.URLError):
        return f"no connection ({exc.reason})"
    return f"{type(exc).__name__}: {exc}"


def _download(url: str, dest: Path, md5: str, timeout: float = 30.0) -> None:
    """Stream ``url`` to ``dest`` (via a temporary file in the same folder), checking the MD5.

    Raises:
        DownloadError: an HTTP error status, no connection, a read or write error, or a wrong MD5;
            nothing is left at ``dest`` nor beside it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.md5(usedforsecurity=False)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5:
            raise DownloadError(f"{url} gave a file with MD5 {h.hexdigest()}, expected {md5} (truncated or "
                                f"changed); nothing was written to {dest}")
        shutil.move(tmp, dest)
    except OSError as exc:
        raise DownloadError(f"{url}: {_http_failure(exc)}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- reader
class MedMNISTSource:
    """One MedMNIST v2 subset at one size, read from its official ``.npz`` (a ``DatasetSource``).

    Args:
        flag: ``medmnist.INFO`` key, case-insensitive (``breastmnist``, ``adrenalmnist3d`` ...).
        size: image side in pixels: 28, 64, 128, 224 (2D) or volume side 28, 64 (3D).
        data_dir: folder holding the file; ``None`` -> :func:`default_data_dir`.
        download: fetch the file from ``INFO``'s Zenodo URL when it is missing and the host
            answers a TCP connect within 3 s.
        verify: check the file's MD5 against ``INFO`` (on by default; cached per process).

    Attributes:
        name (str): the flag, used in collection names (``breastmnist``).
        size (int), is_3d (bool), n_classes (int, ``len(INFO[flag]["label"])``),
        n_channels (int, 1 or 3; 1 for every 3D subset), task (str, ``INFO[flag]["task"]``),
        class_names (list[str], index = label), path (Path to the ``.npz``),
        multi_label (bool, True for ChestMNIST).

    Raises:
        CbmirError: unknown flag or size (lists valid values); file missing (names the path,
            expected MD5, URL and the fixes); MD5 mismatch (names the file, expected and actual
            MD5); array names, dtypes or split sizes differ from ``INFO``.
    """

    def __init__(
        self,
        flag: str,
        size: int = 28,
        data_dir: str | os.PathLike | None = None,
        download: bool = False,
        *,
        verify: bool = True,
    ) -> None:
        self.name, self.size = _check_flag_size(flag, size)
        info = INFO[self.name]
        self.info = info
        self.is_3d = is_3d_flag(self.name)
        self.n_channels = int(info["n_channels"])
        self.task = str(info["task"])
        self.multi_label = self.task.startswith("multi-label")
        self.class_names = [info["label"][k] for k in sorted(info["label"], key=int)]
        self.n_classes = len(self.class_names)
        self.md5 = expected_md5(self.name, self.size)
        self.url = dataset_url(self.name, self.size)
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        self.path = self.data_dir / medmnist_filename(self.name, self.size)
        self._n = {s: int(info["n_samples"][s]) for s in SPLITS}
        self._labels: dict[str, np.ndarray] = {}
        self._cached_split: str | None = None  # split whose image member is open for streaming
        self._reader = None  # cbmir.ingest.npz_stream.NpyMemberReader of that member

        if not self.path.is_file():
            self._fetch_or_fail(download)
        if verify:
            actual = file_md5(self.path)
            if actual != self.md5:
                raise CbmirError(
                    f"MedMNIST file {self.path} has MD5 {actual}, expected {self.md5} "
                    f"(medmnist INFO, {self.name} at {self.size} px): the file is truncated, "
                    f"corrupt or not the official version. Delete it and download it again "
                    f"from {self.url}"
                )
        self._check_layout()
        self._check_label_values()

    # -- DatasetSource --------------------------------------------------------------
    def split_size(self, split: str) -> int:
        """Number of items in ``split`` (``train``, ``val`` or ``test``), from ``INFO``."""
        return self._n[self._check_split(split)]

    def labels(self, split: str) -> np.ndarray:
        """int64 ``(N,)`` class labels of ``split`` in row order.

        For the multi-label ChestMNIST every entry is -1 (no single class); the 14 binary
        findings are in :meth:`multilabels` and in each batch's ``extra_payload``.
        """
        raw = self._raw_labels(split)
        if self.multi_label:
            return np.full(raw.shape[0], -1, dtype=np.int64)
        return raw[:, 0].astype(np.int64)

    def multilabels(self, split: str) -> np.ndarray:
        """uint8 ``(N, L)`` label matrix as stored (L = 14 for ChestMNIST, else 1)."""
        return self._raw_labels(split).copy()

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """Stream ``split`` from row ``start`` in batches of at most ``batch_size`` items.

        Yields:
            :class:`~cbmir.ingest.base.Batch` with ``images`` uint8 ``(B, H, W, C)`` (C = 1 for
            grayscale, 3 for RGB) or ``(B, D, H, W)`` for 3D; read-only views, copy to modify.
            ``image_ids`` are ``<flag>_<size>/<split>/<row>``. ChestMNIST batches carry
            ``extra_payload=[{"findings": [...]}]`` (indices of positive findings).

        Raises:
            CbmirError: unknown split, ``batch_size < 1``, ``start`` outside ``[0, N]``.
        """
        n = self.split_size(split)
        if int(batch_size) < 1:
            raise CbmirError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= int(start) <= n:
            raise CbmirError(f"start must be in [0, {n}] for {self.name}/{split}, got {start}")
        labels = self.labels(split)
        multi = self._raw_labels(split) if self.multi_label else None
        prefix = f"{self.name}_{self.size}/{split}/"
        for lo in range(int(start), n, int(batch_size)):
            hi = min(lo + int(batch_size), n)
            images = self._read_images(split, lo, hi)
            if not self.is_3d and images.ndim == 3:
                images = images[..., None]  # grayscale (B, H, W) -> (B, H, W, 1)
            payload = None
            if multi is not None:
                payload = [{"findings": np.flatnonzero(row).tolist()} for row in multi[lo:hi]]
            yield Batch(
                images=images,
                labels=labels[lo:hi].copy(),
                indices=np.arange(lo, hi, dtype=np.int64),
                image_ids=[f"{prefix}{i}" for i in range(lo, hi)],
                extra_payload=payload,
            )

    def __repr__(self) -> str:
        return f"MedMNISTSource({self.name!r}, size={self.size}, path={str(self.path)!r})"

    # -- internals ------------------------------------------------------------------
    def _read_images(self, split: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``<split>_images`` (the one place that touches pixels).

        Streams the rows from the zip member (:class:`cbmir.ingest.npz_stream.NpyMemberReader`): only
        the requested rows are read (stored members: one seek; deflated members, as the official
        files: sequential decompression with a cursor, so consecutive batches never decompress
        twice). Memory is one batch, whatever the split's size (PathMNIST 224 px: 13.5 GB).
        Switching split closes the previous member. Returns a read-only uint8 array.
        """
        from cbmir.ingest.npz_stream import NpyMemberReader

        if self._cached_split != split or self._reader is None:
            if self._reader is not None:
                self._reader.close()
            self._cached_split, self._reader = None, None
            self._reader = NpyMemberReader(self.path, f"{split}_images")
            self._cached_split = split
        arr = self._reader.read_rows(start, stop)
        arr.flags.writeable = False
        return arr

    def _raw_labels(self, split: str) -> np.ndarray:
        split = self._check_split(split)
        if split not in self._labels:
            with np.load(self.path, allow_pickle=False) as npz:
                arr = npz[f"{split}_labels"]
            if arr.ndim == 1:
                arr = arr[:, None]
            arr.flags.writeable = False
            self._labels[split] = arr
        return self._labels[split]

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise CbmirError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return split

    def _expected_image_shape(self, n: int) -> tuple[int, ...]:
        s = self.size
        if self.is_3d:
            return (n, s, s, s)
        return (n, s, s) if self.n_channels == 1 else (n, s, s, self.n_channels)

    def _check_layout(self) -> None:
        """Check member names, dtypes and shapes from the ``.npy`` headers (no decompression)."""
        try:
            headers = _npz_headers(self.path)
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise CbmirError(
                f"{self.path} is not a readable .npz archive ({exc}); "
                f"download it again from {self.url} (expected MD5 {self.md5})"
            ) from exc
        problems = []
        n_labels = self.n_classes if self.multi_label else 1
        for split in SPLITS:
            n = self._n[split]
            expect = {
                f"{split}_images": self._expected_image_shape(n),
                f"{split}_labels": (n, n_labels),
            }
            for member, shape in expect.items():
                if member not in headers:
                    problems.append(f"array {member!r} missing")
                    continue
                got_shape, got_dtype = headers[member]
                if got_dtype != np.uint8:
                    problems.append(f"{member} has dtype {got_dtype}, expected uint8")
                if member.endswith("_labels") and len(got_shape) == 1:
                    got_shape = (*got_shape, 1)
                if tuple(got_shape) != shape:
                    problems.append(f"{member} has shape {tuple(got_shape)}, expected {shape}")
        if problems:
            raise CbmirError(
                f"{self.path} does not match medmnist INFO for {self.name} at {self.size} px: "
                + "; ".join(problems)
            )

    def _check_label_values(self) -> None:
        """Every label is a valid class index (0..n_classes-1; 0/1 for multi-label findings), checked
        for all splits at open time (labels are small), so a bad file fails before anything is stored."""
        hi = 1 if self.multi_label else self.n_classes - 1
        problems = []
        for split in SPLITS:
            raw = self._raw_labels(split)
            bad = np.flatnonzero((raw > hi).any(axis=1)) if raw.size else np.zeros(0, dtype=np.int64)
            if len(bad):
                problems.append(f"{split}_labels rows {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''} "
                                f"hold values above {hi} ({len(bad)} rows)")
        if problems:
            raise CbmirError(
                f"{self.path}: labels do not match medmnist INFO for {self.name} "
                f"({self.n_classes} classes, valid labels 0..{hi}): " + "; ".join(problems)
            )

    def _fetch_or_fail(self, download: bool) -> None:
        # `cbmir ingest` / `cbmir run` always try the download; `cbmir verify` never does;
        # `cbmir benchmark` does with --download
        how = (", or let cbmir download it on a machine with network access (`cbmir ingest` / `cbmir run` do; "
               "`cbmir benchmark` with --download)"
               if not download else "")
        reason = ""
        if download:
            ok, why = _reachable(self.url)
            if ok:
                try:
                    _download(self.url, self.path, self.md5)
                    return
                except DownloadError as exc:
                    reason = f" The automatic download failed: {exc}."
            else:
                reason = f" The automatic download failed: the host is unreachable ({why})."
        raise CbmirError(
            f"MedMNIST file not found: {self.path} ({self.name} at {self.size} px, expected "
            f"MD5 {self.md5}).{reason} Fix: download {self.url} (on any machine with network access) "
            f"and save it as {self.path.name} in the data directory {self.data_dir} (set CBMIR_DATA_DIR or "
            f"--data-dir to the folder that holds it){how}."
        )


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of an ``.npz``, read from each member's ``.npy`` header."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = npy_format.read_magic(fh)
                read_header = (
                    npy_format.read_array_header_1_0
                    if version == (1, 0)
                    else npy_format.read_array_header_2_0
                )
                shape, _fortran, dtype = read_header(fh)
            out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
    return out


def open_medmnist(
    flag: str,
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    *,
    verify: bool = True,
) -> MedMNISTSource:
    """Open a MedMNIST v2 subset; see :class:`MedMNISTSource` (same arguments and errors)."""
    return MedMNISTSource(flag, size, data_dir, download=download, verify=verify)

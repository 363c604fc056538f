"""Read rows of one array inside an ``.npz`` archive without loading the whole array.

An ``.npz`` is a zip archive of ``.npy`` members (numpy's ``np.savez``: members *stored*, i.e.
uncompressed; ``np.savez_compressed`` and the official MedMNIST files: *deflated*). Each member
starts with the ``.npy`` header (magic, version, ``{'descr', 'fortran_order', 'shape'}``), then the
C-ordered array bytes. :class:`NpyMemberReader` parses that header and serves row ranges:

* **stored** members: the member's byte offset in the archive is computed once from its local
  file header, and each read seeks straight to ``data_offset + start * row_bytes`` — O(rows read);
* **deflated** members: the member is decompressed sequentially; a cursor keeps the position, so
  consecutive row ranges (the ingest job's batches) never decompress anything twice. Reading
  backwards restarts decompression from the start of the member (O(start)).

Memory: the rows requested plus one decompression buffer (a few MiB), independent of the array
size — a 13.5 GB PathMNIST 224 px split streams in bounded memory (DESIGN.md §5). Integrity is the
caller's job (MedMNIST files are MD5-verified, streamed, before use); stored reads skip zip CRCs.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from cbmir.core.errors import CbmirError
#: zip local file header: signature, versions, flags, method, time, date, crc, sizes, name / extra lengths.
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIG = b"PK\x03\x04"
_SKIP_CHUNK = 8 << 20


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fh)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fh)
    # (3, 0): utf-8 field names (structured dtypes only); never written for plain arrays
    raise CbmirError(f".npy format version {version} is not supported for streaming; expected 1.0 or 2.0")


def _read_full(fh, view: memoryview, what: str) -> None:
    """Fill ``view`` from ``fh`` (``readinto`` until full)."""
    pos = 0
    n = len(view)
    while pos < n:
        got = fh.readinto(view[pos:])
        if not got:
            raise CbmirError(f"{what}: archive ended after {pos} of {n} bytes (truncated file?)")
        pos += got


class NpyMemberReader:
    """Row access to the ``.npy`` member ``member`` of the ``.npz`` file ``path``.

    Args:
        path: the ``.npz`` archive.
        member: member name, with or without the ``.npy`` suffix (e.g. ``train_images``).

    Attributes:
        shape (tuple[int, ...]): full array shape; rows are along axis 0.
        dtype (numpy.dtype): element type.
        row_bytes (int): bytes per row.
        stored (bool): the member is uncompressed (direct seeks) rather than deflated (sequential).

    The reader holds open file handles; it is safe to pickle (handles are reopened lazily) and to
    use after ``fork`` (a new process reopens them). One reader must not be used by two threads at
    once (a lock serialises calls).

    Raises:
        CbmirError: the member is missing, encrypted, compressed with another method, not a plain
            C-ordered numeric array (Fortran order, object dtype), or the archive is unreadable.
    """

    def __init__(self, path: str | os.PathLike, member: str) -> None:
        self.path = Path(path)
        self.member = member if member.endswith(".npy") else f"{member}.npy"
        try:
            with zipfile.ZipFile(self.path) as zf:
                try:
                    info = zf.getinfo(self.member)
                except KeyError:
                    raise CbmirError(f"{self.path} has no array {self.member[:-4]!r} "
                                     f"(members: {', '.join(n[:-4] for n in zf.namelist())})") from None
                if info.flag_bits & 0x1:
                    raise CbmirError(f"{self.path}:{self.member} is encrypted; cannot read it")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise CbmirError(f"{self.path}:{self.member} uses zip compression method "
                                     f"{info.compress_type}; only stored and deflated members can be streamed")
                with zf.open(info) as fh:
                    shape, fortran, dtype = _read_npy_header(fh)
                    header_len = fh.tell()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CbmirError(f"{self.path} is not a readable .npz archive ({exc})") from exc
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise CbmirError(f"{self.path}:{self.member} holds Python objects; refusing to read it")
        if fortran and len(shape) > 1:
            raise CbmirError(f"{self.path}:{self.member} is stored in Fortran order; rows cannot be streamed")
        if len(shape) == 0:
            raise CbmirError(f"{self.path}:{self.member} is a scalar, not an array of rows")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.stored = info.compress_type == zipfile.ZIP_STORED
        self._header_offset = info.header_offset
        self._npy_header_len = header_len
        self._data_offset: int | None = None
        self._lock = threading.Lock()
        self._reset_handles()

    # -- handles ---------------------------------------------------------------------
    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._raw = None  # stored: the archive file
        self._zf = None  # deflated: the ZipFile and the open member stream
        self._stream = None
        self._cursor = 0  # deflated: next row the stream will deliver

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_raw", "_zf", "_stream", "_lock"):
            state[key] = None
        state["_cursor"] = 0
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._reset_handles()

    def close(self) -> None:
        """Close the open file handles (reopened on the next read)."""
        for h in (self._stream, self._zf, self._raw):
            if h is not None:
                try:
                    h.close()
                except OSError:  # pragma: no cover
                    pass
        self._reset_handles()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at garbage collection
            pass

    def __len__(self) -> int:
        return self.shape[0]

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: never share a file position with the parent
            self._reset_handles()

    def _stored_offset(self) -> int:
        if self._data_offset is None:
            fh = self._raw
            fh.seek(self._header_offset)
            head = fh.read(_LOCAL_HEADER.size)
            if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_SIG:
                raise CbmirError(f"{self.path}: bad zip local header for {self.member} (corrupt archive?)")
            fields = _LOCAL_HEADER.unpack(head)
            name_len, extra_len = fields[-2], fields[-1]
            self._data_offset = self._header_offset + _LOCAL_HEADER.size + name_len + extra_len + self._npy_header_len
        return self._data_offset

    # -- reads -----------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new ``(stop - start, *shape[1:])`` array (clipped to the array).

        Raises:
            CbmirError: ``start`` / ``stop`` negative or ``start > stop``; archive truncated.
        """
        n = self.shape[0]
        start, stop = int(start), int(stop)
        if start < 0 or stop < start:
            raise CbmirError(f"row range [{start}, {stop}) is invalid for {self.member} ({n} rows)")
        start, stop = min(start, n), min(stop, n)
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        if stop == start or self.row_bytes == 0:
            return out
        view = memoryview(out.reshape(-1).view(np.uint8))
        what = f"{self.path}:{self.member} rows [{start}, {stop})"
        with self._lock:
            self._check_pid()
            if self.stored:
                if self._raw is None:
                    self._raw = open(self.path, "rb")  # noqa: SIM115 - kept open between reads
                self._raw.seek(self._stored_offset() + start * self.row_bytes)
                _read_full(self._raw, view, what)
            else:
                self._read_deflated(start, view, what)
        return out

    def _read_deflated(self, start: int, view: memoryview, what: str) -> None:
        if self._stream is None or start < self._cursor:
            if self._stream is not None:
                self._stream.close()
            if self._zf is None:
                self._zf = zipfile.ZipFile(self.path)
            self._stream = self._zf.open(self.member)
            self._stream.read(self._npy_header_len)
            self._cursor = 0
        skip = (start - self._cursor) * self.row_bytes
        while skip > 0:  # forward: decompress and drop
            got = len(self._stream.read(min(skip, _SKIP_CHUNK)))
            if not got:
                raise CbmirError(f"{what}: archive ended while skipping (truncated file?)")
            skip -= got
        try:
            _read_full(self._stream, view, what)
        except Exception:
            self._stream.close()
            self._stream = None  # position unknown: restart next time
            raise
        self._cursor = start + len(view) // self.row_bytes

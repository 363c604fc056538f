"""Collection snapshots: one checksummed archive file per collection, restorable into any engine.

**Format** (a gzip-compressed POSIX tar, level 1: the engine preallocates its files and leaves them
mostly empty, and zeros compress to almost nothing; they are restored as holes)::

    collection/meta.json           the collection's metadata (CollectionMeta JSON)
    collection/shard/...           the Qdrant Edge shard: segments, WAL, config
    cbmir-snapshot.json            the manifest, last: format, version, collection name, metadata,
                                   points per split, and the SHA-256 and size of every file above

The shard is the embedded engine's own directory, copied while the collection is flushed, closed and
locked (:meth:`cbmir.search.edge_store.EdgeStore.export_dir`). A collection of a Qdrant server (or of
qdrant-client's local mode, which has no snapshot API) is first copied point by point into a temporary
Edge shard, so one file format serves both engines, and a snapshot restores into either: into the
embedded store by one directory rename, into a server by copying its points.

**Restoring never trusts the file.** Members are read one by one and written only below a fresh
temporary directory, by cbmir itself (``tarfile.extract`` is never called): a member that is not a
regular file or directory (links, devices), whose name is absolute, contains ``..`` or lies outside
``collection/``, is refused before anything is written. Every file's SHA-256 and size must equal the
manifest's, and every manifest file must be present and no other: a truncated, corrupted or altered
file is refused with one message, and nothing is restored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cbmir.core.errors import CbmirError
from cbmir.core.splits import SPLITS
from cbmir.search.schema import parse_meta

FORMAT = "cbmir-snapshot"
VERSION = 1
MANIFEST = "cbmir-snapshot.json"
PREFIX = "collection"
_CHUNK = 1 << 16  # bytes per read; a chunk of zeros is restored as a hole
_ZEROS = bytes(_CHUNK)
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


@dataclass
class SnapshotInfo:
    """What a snapshot holds: ``collection`` (name at snapshot time), ``counts`` (points per split),
    ``files`` and ``bytes`` (of the shard), ``sha256`` (of the whole snapshot file), ``path``."""

    collection: str
    counts: dict[str, int]
    files: int
    bytes: int
    sha256: str
    path: Path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_snapshot(store, name: str, path: str | os.PathLike) -> SnapshotInfo:
    """Write collection ``name`` of ``store`` (any engine) to the snapshot file ``path`` (atomically: a
    temporary file beside it, renamed when complete).

    Raises:
        CbmirError: unknown collection; another process holds it (embedded store); ``path`` not writable.
    """
    from cbmir.search.edge_store import EdgeStore

    counts = {sp: n for sp in SPLITS if (n := store.count(name, sp))}
    meta = store.meta(name)
    out = Path(path).expanduser()
    with tempfile.TemporaryDirectory(prefix="cbmir-snapshot-") as tmp:
        if isinstance(store, EdgeStore):
            src = store.export_dir(name)
        else:  # a server: its points into a temporary Edge shard, the same format
            from cbmir.search.store import copy_collection

            with EdgeStore(Path(tmp) / "edge") as edge:
                copy_collection(store, name, edge, name)
            src = Path(tmp) / "edge" / name
        files = sorted(f for f in src.rglob("*") if f.is_file())
        listed = {}
        fd, part = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            with tarfile.open(part, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tar:
                for f in files:
                    rel = f"{PREFIX}/{f.relative_to(src).as_posix()}"
                    listed[rel] = {"sha256": _sha256_file(f), "size": f.stat().st_size}
                    tar.add(f, arcname=rel, recursive=False)
                manifest = {"format": FORMAT, "version": VERSION, "collection": name,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": store.engine,
                            "meta": json.loads(meta.to_json()), "counts": counts, "files": listed}
                data = json.dumps(manifest, indent=1, sort_keys=True).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
            os.chmod(part, 0o644)
            os.replace(part, out)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    return SnapshotInfo(collection=name, counts=counts, files=len(files),
                        bytes=sum(v["size"] for v in listed.values()), sha256=_sha256_file(out), path=out)


def _member_path(m: tarfile.TarInfo, where: Path) -> PurePosixPath:
    """The checked relative path of member ``m`` (module docstring rules)."""
    name = PurePosixPath(m.name)
    if not (m.isreg() or m.isdir()):
        raise CbmirError(f"snapshot {where}: member {m.name!r} is not a regular file or folder (links and "
                         "devices are refused); nothing was restored")
    if name.is_absolute() or ".." in name.parts or not name.parts or "\\" in m.name or (
            name.parts[0] != PREFIX and str(name) != MANIFEST):
        raise CbmirError(f"snapshot {where}: member {m.name!r} would be written outside the collection "
                         "folder; refused, nothing was restored")
    return name


def _damaged(where: Path, why: str) -> CbmirError:
    return CbmirError(f"snapshot {where} is damaged or not a cbmir snapshot ({why}); nothing was restored. "
                      "Use an intact copy (`cbmir snapshot` prints each file's SHA-256)")


def unpack_snapshot(path: str | os.PathLike, into: Path) -> dict:
    """Check and unpack snapshot ``path`` below the empty folder ``into``; returns its manifest.

    Afterwards ``into / "collection"`` holds ``meta.json`` and ``shard/``.

    Raises:
        CbmirError: missing file; a refused member (module docstring); not a tar; no or a bad manifest;
            a file whose SHA-256 or size differs from the manifest, or missing or unlisted files.
    """
    where = Path(path).expanduser()
    if not where.is_file():
        raise CbmirError(f"snapshot {where}: no such file")
    got: dict[str, dict] = {}
    manifest_bytes = None
    try:
        with tarfile.open(where, "r:*") as tar:
            for m in tar:
                rel = _member_path(m, where)
                if m.isdir():
                    continue
                src = tar.extractfile(m)
                if str(rel) == MANIFEST:
                    manifest_bytes = src.read(1 << 26)
                    continue
                dest = into.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                h, size = hashlib.sha256(), 0
                with open(dest, "wb") as fh:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        h.update(chunk)
                        size += len(chunk)
                        if chunk == _ZEROS[:len(chunk)]:
                            fh.seek(len(chunk), os.SEEK_CUR)  # a hole, as the engine left it
                        else:
                            fh.write(chunk)
                    fh.truncate(size)
                got[str(rel)] = {"sha256": h.hexdigest(), "size": size}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _damaged(where, f"{type(exc).__name__}: {exc}") from None
    if manifest_bytes is None:
        raise _damaged(where, f"no {MANIFEST}")
    try:
        manifest = json.loads(manifest_bytes)
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("files"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise _damaged(where, f"{MANIFEST} is not a cbmir snapshot manifest")
    if manifest.get("version") != VERSION:
        raise CbmirError(f"snapshot {where} has format version {manifest.get('version')!r}; this cbmir reads "
                         f"version {VERSION}")
    want = manifest["files"]
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        what = ", ".join(f"{k} ({'missing' if k not in got else 'not listed' if k not in want else 'checksum'})"
                         for k in bad[:5])
        raise _damaged(where, f"{len(bad)} file(s) differ from the manifest: {what}")
    return manifest


def check_name(name: str) -> str:
    """A collection name for a restore (letters, digits, ``_ . -``, lower case)."""
    if not name or set(name) - _NAME_OK or name.startswith("."):
        raise CbmirError(f"invalid collection name {name!r}: use lower-case letters, digits, '_', '-', '.'")
    return name


def restore_snapshot(store, path: str | os.PathLike, name: str | None = None) -> tuple[str, dict]:
    """Restore snapshot ``path`` into ``store`` as collection ``name`` (default: its name at snapshot time).

    Returns:
        ``(name, manifest)``.

    Raises:
        CbmirError: as :func:`unpack_snapshot`; ``name`` invalid or already a collection of ``store``
            (nothing is overwritten); the restored point counts differ from the manifest.
    """
    from cbmir.search.edge_store import EdgeStore

    with tempfile.TemporaryDirectory(prefix="cbmir-restore-") as tmp:
        # the embedded store: unpack beside its collections, so that the final step is one rename
        if isinstance(store, EdgeStore):
            staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=store.root))
        else:
            staging = Path(tmp)
        try:
            manifest = unpack_snapshot(path, staging)
            name = check_name(name or str(manifest.get("collection", "")))
            if name in store.list_collections():
                raise CbmirError(f"collection {name!r} already exists; delete it first (`cbmir collections "
                                 "delete`) or restore under another --name")
            coll = staging / PREFIX
            parse_meta((coll / "meta.json").read_bytes(), name, f"in snapshot {path}")
            if isinstance(store, EdgeStore):
                store.import_dir(coll, name)
            else:
                from cbmir.search.store import copy_collection

                with EdgeStore(staging / "edge") as edge:
                    os.replace(coll, staging / "edge" / name)
                    copy_collection(edge, name, store, name)
        finally:
            if staging != Path(tmp):
                shutil.rmtree(staging, ignore_errors=True)
    counts = {sp: n for sp in SPLITS if (n := store.count(name, sp))}
    if counts != manifest.get("counts"):
        raise CbmirError(f"restored collection {name!r} holds {counts} points, the snapshot lists "
                         f"{manifest.get('counts')}; the restored collection is left for inspection")
    return name, manifest

"""Collection management: list, describe, delete, snapshot and restore collections.

The CLI (``cbmir collections``, ``cbmir collections info|delete``, ``cbmir snapshot``, ``cbmir restore``) and
:class:`cbmir.client.SearchClient` call these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from cbmir.core.errors import CbmirError


def list_collections(app) -> list[dict]:
    """One row per collection of the store: :func:`describe_collection` (a collection whose metadata is
    damaged gets ``{"name", "damaged": message}``)."""
    rows = []
    for name in app.store.list_collections():
        try:
            rows.append(describe_collection(app, name))
        except CbmirError as exc:
            rows.append({"name": name, "damaged": str(exc)})
    return rows


def describe_collection(app, name: str) -> dict:
    """:func:`cbmir.app.collections.collection_info` plus what managing it needs: ``weights``, ``backend``,
    ``preprocessing``, ``disk_bytes`` (None on a server), ``point_ids`` (``rows`` or ``key-sha256``),
    ``archive`` (kind and folder of a user archive), ``added`` (per split, points given to ``cbmir add``
    that are not archive files),
    ``sync_pending`` and ``staging`` (a ``--recreate`` in progress).

    Raises:
        CbmirError: unknown collection (naming the existing ones); damaged metadata.
    """
    from cbmir.app.collections import collection_info
    from cbmir.ingest.job import STAGING_SUFFIX
    from cbmir.ingest.sync import count_added
    from cbmir.search.schema import uses_key_ids

    store = app.store
    info = collection_info(store, name)
    meta = store.meta(name)
    extra = meta.extra or {}
    archive = extra.get("archive") or {}
    info.update(weights=meta.weights, backend=meta.backend, preprocessing=meta.preprocessing,
                disk_bytes=store.disk_bytes(name), point_ids="key-sha256" if uses_key_ids(meta) else "rows",
                archive={"kind": archive.get("kind"), "root": archive.get("root")} if archive else None,
                added=count_added(store, name) if uses_key_ids(meta) else {},
                sync_pending=bool(extra.get("sync_pending")), staging=name.endswith(STAGING_SUFFIX))
    return info


def delete_collection(app, name: str) -> int:
    """Delete collection ``name`` and its points; returns how many points it held.

    Raises:
        CbmirError: unknown collection (naming the existing ones); another process holds it (embedded store).
    """
    store = app.store
    store.meta(name)
    n = store.count(name)
    store.delete_collection(name)
    return n


def snapshot_collection(app, name: str, output: str | os.PathLike):
    """Write collection ``name`` to the snapshot file ``output`` (:mod:`cbmir.search.snapshot`).

    Returns:
        :class:`cbmir.search.snapshot.SnapshotInfo` (points per split, files, bytes, the file's SHA-256).

    Raises:
        CbmirError: unknown collection; ``output`` a folder or in a missing folder; another process holds it.
    """
    from cbmir.search.snapshot import write_snapshot

    out = Path(output).expanduser()
    if out.is_dir():
        raise CbmirError(f"snapshot output {output} is a folder; give a file path (e.g. {name}.cbmir-snapshot)")
    if not out.parent.is_dir():
        raise CbmirError(f"snapshot output {output}: folder {out.parent} does not exist; create it first")
    app.store.meta(name)
    return write_snapshot(app.store, name, out)


def restore_collection(app, path: str | os.PathLike, name: str | None = None) -> tuple[str, dict]:
    """Restore a snapshot file into the store as collection ``name`` (default: the name it had).

    Returns:
        ``(name, manifest)``; the manifest holds the metadata and the points per split.

    Raises:
        CbmirError: a missing, damaged or unsafe snapshot (nothing restored); ``name`` exists already.
    """
    from cbmir.search.snapshot import restore_snapshot

    return restore_snapshot(app.store, path, name)

"""Sync a user archive's collection with the archive: embed only what is new or changed.

``cbmir ingest`` on a folder, manifest, DICOM or NIfTI archive whose collection exists compares the
archive with the stored points and applies the difference (:func:`plan_sync`, :func:`apply_sync`):

* **added** -- a file (an item key) with no point: embedded;
* **updated** -- a file whose size or modification time changed *and* whose bytes changed (SHA-256):
  re-embedded under the same point id; a file only touched (same bytes) just gets its new ``stat``
  recorded and counts as unchanged;
* **relabelled** -- same bytes, other label or payload (another class folder, manifest label or
  column): the payload is replaced, the stored vector is not touched. A file **moved or renamed**
  (its old path gone, its bytes found under a new path) keeps its vector too: the vector is copied to
  the new point id and the old point deleted -- no image is embedded;
* **deleted** -- a stored point whose file is gone from the archive;
* **unchanged** -- everything else.

**Point ids.** Every archive point's id is ``split code << 40 | key_index(item key)``
(:func:`cbmir.search.schema.key_index`, a stable hash of the relative path or manifest key), so the
ids of unchanged files never change whatever is added or removed; the payload ``index`` is that
40-bit number and similarity ties are broken by it (lower first). Points given to ``cbmir add`` that
are not files of the archive (``origin: added``) are never deleted by a sync; their label follows
their class name if the archive's class ids shift.

**Crash safety.** The plan is recomputed from the stored points on every run, so a sync that was
killed at any moment is completed by running it again (nothing is done twice: points already
written are unchanged the second time). Moves copy before they delete. The collection metadata
(source fingerprint, split sizes, class names, completion) is rewritten only when the sync
completes; until then it is marked ``sync_pending`` and evaluation is refused
(:func:`cbmir.ingest.sources.check_evaluable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.core.splits import SPLITS
from cbmir.search.schema import allocate_index, key_index, point_id, split_and_index

#: payload keys the sync replaces when it rebases a stored payload onto an item (the rest are decoding
#: facts and the collection's own fields, kept)
_REPLACED = frozenset({"split", "index", "label", "image_id", "source_path", "label_name", "source_kind",
                       "item_key", "origin", "item_fields", "content_sha256", "stat_sha256"})
COUNTS = ("added", "updated", "relabelled", "deleted", "unchanged")


@dataclass
class SyncPlan:
    """What a sync will do (all lists in key order).

    Attributes:
        embed: per split, ``(index, item)`` to embed: new files and files whose bytes changed.
        updates: point ids among ``embed`` that replace a stored point (changed files).
        moves: ``(old id, new id, new payload)``: a moved / renamed file; the stored vector is copied.
        payloads: ``(id, new payload)``: relabelled points, and touched files' new ``stat``.
        delete: ids of points whose file is gone (and duplicates of one key).
        counts: ``added``, ``updated``, ``relabelled`` (moves included), ``deleted``, ``unchanged``,
            and ``moved`` (how many relabelled points were moves).
        examples: per count, a few relative paths (for messages).
        status: ``(split, item key)`` -> its count (``added`` ... ``unchanged``), for the archive's items.
    """

    embed: dict[str, list] = field(default_factory=dict)
    updates: set[int] = field(default_factory=set)
    moves: list[tuple[int, int, dict]] = field(default_factory=list)
    payloads: list[tuple[int, dict]] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*COUNTS, "moved"), 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    status: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        """True when applying the plan would change the collection."""
        return bool(any(self.embed.values()) or self.moves or self.payloads or self.delete)

    def note(self, what: str, path: str, split: str | None = None, key: str | None = None) -> None:
        self.counts[what] += 1
        if key is not None:
            self.status[(split, key)] = what
        ex = self.examples.setdefault(what, [])
        if len(ex) < 5:
            ex.append(path)

    def describe(self) -> str:
        """``1 added, 0 updated, 2 relabelled (1 moved), 0 deleted, 540 unchanged``."""
        return describe_counts(self.counts)

    def differences(self, kinds=("added", "updated", "relabelled", "deleted")) -> str:
        """The non-zero changes of ``kinds`` with example paths, for refusals and ``cbmir verify``."""
        words = {"added": "file(s) not ingested", "updated": "file(s) changed since ingested",
                 "relabelled": "file(s) relabelled or moved", "deleted": "point(s) of files no longer in the archive"}
        parts = []
        for what in kinds:
            if self.counts[what]:
                ex = ", ".join(self.examples.get(what, []))
                more = ", ..." if self.counts[what] > len(self.examples.get(what, [])) else ""
                parts.append(f"{self.counts[what]} {words[what]} ({ex}{more})")
        return "; ".join(parts)


def describe_counts(c: dict) -> str:
    """``1 added, 0 updated, 2 relabelled (1 moved), 0 deleted, 540 unchanged`` of a plan's counts."""
    moved = f" ({c['moved']} moved: vector reused)" if c.get("moved") else ""
    return (f"{c['added']} added, {c['updated']} updated, {c['relabelled']} relabelled{moved}, "
            f"{c['deleted']} deleted, {c['unchanged']} unchanged")


def stored_points(store, name: str, splits) -> tuple[dict, dict, dict, list[int]]:
    """Payloads of the stored points of ``splits`` (no vectors).

    Returns:
        ``(archive, added, taken, duplicates)``: per split ``{item key: (id, payload)}`` of archive points;
        per split ``[(id, payload), ...]`` of points given to ``cbmir add``; per split ``{index: item key}``
        of every point; ids of extra points holding a key that another point of the split already holds.
    """
    archive: dict[str, dict] = {sp: {} for sp in splits}
    taken: dict[str, dict] = {sp: {} for sp in splits}
    added: dict[str, list] = {sp: [] for sp in splits}
    dups: list[int] = []
    for sp in splits:
        for ids, pays in store.scroll_payloads(name, sp):
            for pid, pay in zip(ids, pays):
                key = str(pay.get("item_key", ""))
                _, ix = split_and_index(pid)
                taken[sp][ix] = key
                if pay.get("origin") == "added":
                    added[sp].append((pid, pay))
                elif key in archive[sp]:
                    dups.append(int(pid))
                else:
                    archive[sp][key] = (int(pid), pay)
    return archive, added, taken, dups


def rebase_payload(old: dict, static: dict, *, split: str, index: int, stat: str) -> dict:
    """A stored payload carried over to an item: its decoding facts and collection fields are kept, the
    item's fields (:meth:`ArchiveSource.static_payload`) replace the old item's, with the new ``split``,
    ``index`` and ``stat_sha256`` (the bytes, hence ``content_sha256``, are the same)."""
    own = set(old.get("item_fields") or ())
    kept = {k: v for k, v in old.items() if k not in _REPLACED and k not in own}
    return {**kept, **static, "split": split, "index": int(index), "stat_sha256": stat,
            "content_sha256": old.get("content_sha256")}


def _static_differs(payload: dict, static: dict) -> bool:
    return any(payload.get(k) != v for k, v in static.items())


def plan_sync(source, store, name: str, splits, *, keys: dict[str, set[str]] | None = None,
              detect_moves: bool = True) -> SyncPlan:
    """Compare ``source`` (an :class:`~cbmir.ingest.sources.archive.ArchiveSource`) with collection ``name``.

    Reads payloads only, ``stat``-s every file, and reads (hashes) the bytes of files whose ``stat``
    changed; with ``detect_moves``, also of new files when points are to be deleted (to find moves).

    Args:
        splits: splits compared; points of other splits are left alone.
        keys: per split, the only item keys considered (``cbmir add`` of archive files): nothing else is
            added, changed or deleted.
        detect_moves: look for moved files (off for read-only checks: a move is then an add + delete).
    """
    stored, added_points, taken, dups = stored_points(store, name, splits)
    plan = SyncPlan(embed={sp: [] for sp in splits})
    plan.delete.extend(dups if keys is None else [])
    names = {n: i for i, n in enumerate(getattr(source, "class_names", []) or [])}
    new: list[tuple[str, object, str]] = []
    gone: list[tuple[str, int, dict]] = []
    for sp in splits:
        have = stored[sp]
        want = keys.get(sp, set()) if keys is not None else None
        for item in source.items.get(sp, []):
            if want is not None and item.key not in want:
                continue
            static = source.static_payload(sp, item)
            stat = source.stat_digest(item)
            hit = have.pop(item.key, None)
            if hit is None:
                new.append((sp, item, stat))
                continue
            pid, pay = hit
            same = pay.get("stat_sha256") == stat
            if not same:
                digest = source.content_digest(item)
                same = digest is not None and digest == pay.get("content_sha256")
            if not same:
                plan.embed[sp].append((split_and_index(pid)[1], item))
                plan.updates.add(pid)
                plan.note("updated", item.source_path, sp, item.key)
                continue
            relabel = _static_differs(pay, static)
            if relabel or pay.get("stat_sha256") != stat:
                plan.payloads.append((pid, rebase_payload(pay, static, split=sp, index=split_and_index(pid)[1],
                                                          stat=stat)))
            plan.note("relabelled" if relabel else "unchanged", item.source_path, sp, item.key)
        gone += [(sp, pid, pay) for key, (pid, pay) in sorted(have.items())
                 if want is None or key in want]
        for pid, pay in added_points[sp]:  # added points follow their class name when class ids shift
            label = names.get(pay.get("label_name"), -1) if pay.get("label_name") is not None else -1
            if keys is None and int(pay.get("label", -1)) != label and names:
                plan.payloads.append((pid, {**pay, "label": label}))
    by_content: dict[str, list[tuple[str, int, dict]]] = {}
    if detect_moves and gone and new:
        for g in gone:
            if g[2].get("content_sha256"):
                by_content.setdefault(g[2]["content_sha256"], []).append(g)
    for sp, item, stat in new:
        digest = source.content_digest(item) if by_content else None
        match = by_content.get(digest) if digest else None
        ix = allocate_index(item.key, taken[sp])
        taken[sp][ix] = item.key
        if match:
            _, old_pid, old_pay = match.pop(0)
            plan.moves.append((old_pid, point_id(sp, ix), rebase_payload(
                old_pay, source.static_payload(sp, item), split=sp, index=ix, stat=stat)))
            plan.note("relabelled", item.source_path, sp, item.key)
            plan.counts["moved"] += 1
        else:
            plan.embed[sp].append((ix, item))
            plan.note("added", item.source_path, sp, item.key)
    moved = {m[0] for m in plan.moves}
    for _, pid, pay in gone:
        plan.delete.append(pid)
        if pid not in moved:
            plan.note("deleted", str(pay.get("source_path", pid)))
    for sp in splits:
        plan.embed[sp].sort(key=lambda e: e[1].key)
    return plan


def apply_sync(plan: SyncPlan, source, embedder, store, target: str, meta, *, batch_size: int, progress: bool,
               report, name: str | None = None, mark_pending: bool = True) -> None:
    """Apply ``plan`` to collection ``target``: moves (vectors copied), payload updates, deletes, then the
    embedding of new and changed files, split by split (the long part: resumable, see the module docstring).

    ``report`` (:class:`cbmir.ingest.job.IngestReport`) gets ``written``, ``seconds``, ``items_per_s``,
    ``resumed_from`` (points kept from before, per split), ``skipped`` (splits with nothing to do),
    ``zero_vectors``, ``rejected`` and ``extra["sync"]`` (the plan's counts). With ``mark_pending`` (a whole
    sync, not single items) the collection is marked ``sync_pending`` until :func:`record_sync`.
    """
    from cbmir.ingest.job import embed_split

    name = name or target
    report.extra["sync"] = dict(plan.counts)
    if mark_pending and plan.changes and not (meta.extra or {}).get("sync_pending"):
        meta.extra = {**(meta.extra or {}), "sync_pending": True}
        store.write_meta(target, meta)
    by_split: dict[str, list] = {}
    if plan.moves:
        vecs = store.points_by_id(target, [m[0] for m in plan.moves])
        for old, new, pay in plan.moves:
            if old in vecs:  # (absent: moved by an earlier, interrupted run)
                by_split.setdefault(pay["split"], []).append((new, vecs[old][0], pay))
    for sp, rows in by_split.items():
        store.upsert(target, sp, [split_and_index(r[0])[1] for r in rows], np.stack([r[1] for r in rows]),
                     [r[2] for r in rows])
    store.set_payloads(target, plan.payloads)
    if plan.delete:  # (the old points of moved files are among them: deleted after their vectors were copied)
        store.delete_points(target, plan.delete)
    for sp, entries in plan.embed.items():
        changed = [ix for ix, _ in entries if point_id(sp, ix) in plan.updates]
        report.resumed_from[sp] = store.count(target, sp) - len(changed)
        if not entries:
            report.written[sp] = 0
            if not _touches(plan, sp):
                report.skipped.append(sp)
            continue
        whole = len(entries) == source.split_size(sp) and report.resumed_from[sp] == 0
        written = embed_split(report, store, target, sp, source.iter_items(sp, entries, batch_size, whole=whole),
                              embedder, meta, total=len(entries), desc=f"{name} [{sp}]", progress=progress)
        refused = set(report.rejected.get(sp, []))
        unreadable = [point_id(sp, ix) for ix in changed if ix not in written and ix not in refused]
        if unreadable:  # a changed file that no longer decodes: its stale point goes
            store.delete_points(target, unreadable)


def _touches(plan: SyncPlan, split: str) -> bool:
    """Whether ``plan`` changes a point of ``split`` other than by embedding."""
    ids = [pid for pid, _ in plan.payloads] + plan.delete + [m[1] for m in plan.moves]
    return any(split_and_index(p)[0] == split for p in ids)


def record_sync(store, target: str, meta, source, splits) -> None:
    """Record a completed sync of ``splits`` in the metadata of ``target`` (atomically): the source
    fingerprint, split sizes, class names, the completion counts and the archive's options; clears
    ``sync_pending``."""
    from cbmir.ingest.job import source_extra

    cur = source_extra(source)
    extra = dict(meta.extra or {})
    for key in ("split_sizes", "source_fingerprint"):
        merged = {sp: v for sp, v in (extra.get(key) or {}).items() if sp not in splits}
        merged.update({sp: v for sp, v in (cur.get(key) or {}).items() if sp in splits})
        extra[key] = merged
    done = dict(extra.get("completed") or {})
    done.update({sp: store.count(target, sp) for sp in splits})
    extra.update(completed=done, **{k: cur[k] for k in ("class_names", "n_classes", "rows_may_be_skipped",
                                                         "archive", "point_ids") if k in cur})
    extra.pop("sync_pending", None)
    meta.extra = extra
    store.write_meta(target, meta)


def record_if_in_sync(store, target: str, meta, source) -> bool:
    """After single items were added or deleted (:mod:`cbmir.app.items`): when collection ``target`` now
    equals ``source`` on the splits it holds, record that (:func:`record_sync`) so that readers and
    ``cbmir verify`` need not compare file by file. Returns whether it was recorded."""
    done = (meta.extra or {}).get("completed") or {}
    splits = tuple(sp for sp in SPLITS if sp in done or store.count(target, sp))
    if plan_sync(source, store, target, splits, detect_moves=False).changes:
        return False
    record_sync(store, target, meta, source, splits)
    return True


def count_added(store, name: str) -> dict[str, int]:
    """Per split, the points of ``name`` given to ``cbmir add`` that are not archive files (``origin: added``);
    splits without any are left out."""
    from cbmir.search.filters import Selection

    counts = {sp: store.count(name, Selection(sp, (("origin", ("added",)),))) for sp in SPLITS
              if store.count(name, sp)}
    return {sp: n for sp, n in counts.items() if n}


def check_same_archive(name: str, stored, source) -> None:
    """Refuse to sync collection ``name`` from another archive folder than the one it was built from (two
    archives of the same name would otherwise replace each other's points).

    Raises:
        CbmirError: naming both folders, ``--recreate`` and ``--name``.
    """
    root = ((stored.extra or {}).get("archive") or {}).get("root")
    here = str(source.root.expanduser().resolve())
    if root and root != here:
        raise CbmirError(
            f"collection {name!r}: the source ({source.root}) changed since it was ingested: it was built from "
            f"another archive of the same name ({root}). Re-run with --recreate to rebuild it from "
            f"{source.root}, or use --name for another collection.")


def sync_splits(source, embedder, store, target: str, meta, splits, *, batch_size: int = 64,
                progress: bool = True, name: str | None = None, report=None):
    """Plan and apply the sync of ``splits`` of ``source`` into ``target``; record it when complete (no
    vector was refused). Returns the :class:`cbmir.ingest.job.IngestReport`."""
    from cbmir.ingest.job import IngestReport

    report = report or IngestReport(collection=name or target, meta=meta)
    plan = plan_sync(source, store, target, tuple(splits))
    apply_sync(plan, source, embedder, store, target, meta, batch_size=batch_size, progress=progress,
               report=report, name=name)
    if not report.rejected:
        record_sync(store, target, meta, source, tuple(splits))
    return report


__all__ = ["COUNTS", "SyncPlan", "apply_sync", "check_same_archive", "key_index", "plan_sync", "record_sync",
           "rebase_payload", "stored_points", "sync_splits"]

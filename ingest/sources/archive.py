"""Shared machinery of the user-archive sources: folder layout, stable row ids, labels, the run summary.

Every user archive (:mod:`~cbmir.ingest.sources.folder`, :mod:`~cbmir.ingest.sources.manifest`,
:mod:`~cbmir.ingest.sources.dicom`, :mod:`~cbmir.ingest.sources.nifti`) becomes a list of :class:`Item` per
split; :class:`ArchiveSource` turns that into the :class:`cbmir.ingest.base.DatasetSource` interface.

**Folder layout** (:func:`scan_tree`, torchvision ``ImageFolder`` convention)::

    root/[train|database]/<class>/.../file     root/[test|query]/<class>/.../file     root/[val]/...
    root/<class>/.../file                      (no split folders: everything is ``train``)

Split folder names are case-insensitive; ``database`` means ``train`` (the database) and
``query`` means ``test`` (the queries); ``validation``/``valid`` mean ``val``. Inside a split,
each sub-folder is a class, searched recursively; a split without sub-folders holds unlabelled
files (label -1). Hidden entries (name starting with ``.``) are skipped; files of other kinds are
listed in the summary as ignored, never dropped silently.

**Row ids.** Within a split, items are sorted by their key — the relative POSIX path (``/``
separators, code-point order, the same on every OS), or a manifest's row key. A collection ingested by
this cbmir gives each item the point id ``split code << 40 | key_index(key)``
(:func:`cbmir.search.schema.key_index`: 40 bits of SHA-256 of the key), so the id of a file never
changes while it stays where it is, whatever is added or removed; its payload ``index`` (the "row") is
that number, and similarity ties are broken by it. ``cbmir ingest`` on a changed archive *syncs* its
collection (:mod:`cbmir.ingest.sync`): only new and changed files are embedded, moved / relabelled ones
keep their vector, removed ones are deleted. :meth:`ArchiveSource.iter_batches` still numbers rows by
position (collections of an older cbmir, whose changed archives need ``--recreate``);
:meth:`ArchiveSource.iter_items` streams the items a sync embeds. An unreadable file has no point;
``cbmir verify`` re-decodes just the missing files and accepts those that are still unreadable.

**Labels.** Class names are mapped to integer ids in sorted order over *all* splits together
(so ``train`` and ``test`` agree even when a class is missing from one); the payload keeps
``label_name``. Manifests whose labels are all integers keep those integers. Unlabelled items
have label -1.

**Unreadable files** (:class:`~cbmir.ingest.sources.pixels.PixelError`, decoder errors) are skipped and
listed in :meth:`ArchiveSource.summary` (``problems``), or stop the run at once with ``strict``.
If every file of a split fails, the run stops anyway (a systematic problem, not a bad file).
A sync tries an unreadable file again on every run (it has no point yet).
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cbmir.core.splits import SPLITS

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Batch
from cbmir.ingest.sources.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS, IntensityRule, PixelError

#: Folder / manifest split names (lower case) -> cbmir split.
SPLIT_ALIASES = {"train": "train", "database": "train", "test": "test", "query": "test",
                 "val": "val", "validation": "val", "valid": "val"}
#: Payload keys set by cbmir itself; manifest columns of these names are renamed ``manifest_<name>``.
#: Payload keys of the points of a synced archive (:mod:`cbmir.ingest.sync`): the item's key, ``origin``
#: (``archive``: a file of the archive; ``added``: a file given to ``cbmir add``), the SHA-256 of its bytes
#: and of its files' (path, size, mtime) list, and the names of the item's own payload fields.
SYNC_PAYLOAD = ("item_key", "origin", "content_sha256", "stat_sha256", "item_fields")
RESERVED_PAYLOAD = ("dataset", "split", "index", "label", "model", "size", "image_id", "source_path",
                    "label_name", "source_kind", *SYNC_PAYLOAD)
#: Errors of decoders (Pillow, pydicom, nibabel, numpy) that mean "this file cannot be read".
DECODE_ERRORS = (PixelError, OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error, KeyError,
                 IndexError, TypeError, AttributeError, NotImplementedError, RuntimeError)
MAX_EXAMPLES = 20


@dataclass
class Item:
    """One database/query item of a user archive (a 2D image, or a volume).

    Attributes:
        key: sort key within its split (relative POSIX path, or a manifest row key).
        source_path: path relative to the archive root, stored in the payload.
        files: absolute paths read for this item (one file; a DICOM series: its slices in order).
        label: integer class id (-1 = unlabelled); label_name: class name (None = unlabelled).
        payload: static extra payload (manifest columns, DICOM tags), JSON-serialisable.
    """

    key: str
    source_path: str
    files: tuple[Path, ...]
    label: int = -1
    label_name: str | None = None
    payload: dict = field(default_factory=dict)


@dataclass
class Problem:
    """A file that could not be read: ``split``, row ``index`` (None when found before indexing),
    ``path`` (relative to the archive root) and ``reason``."""

    split: str
    index: int | None
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.split}[{self.index}] " if self.index is not None else f"{self.split} "
        return f"{where}{self.path}: {self.reason}"


@dataclass
class Layout:
    """Result of :func:`scan_tree`: per split, sorted ``(relative path, class name | None)``;
    ``ignored``: relative paths of files that are not of the accepted kind."""

    files: dict[str, list[tuple[str, str | None]]]
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(top: Path) -> Iterator[Path]:
    """Every visible regular file under ``top`` (recursive, hidden entries skipped)."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for f in sorted(filenames):
            if _visible(f):
                p = Path(dirpath) / f
                if p.is_file():
                    yield p


def rel_posix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators (the key rows are sorted by)."""
    return Path(os.path.relpath(path, root)).as_posix()


def scan_tree(root: Path, accept: Callable[[Path], bool], *, class_folders: bool = True) -> Layout:
    """Find the accepted files of a folder archive, by split and class (module docstring).

    Args:
        root: the archive folder (or a single file: one unlabelled ``train`` item).
        accept: ``accept(path) -> bool`` for files of the source's kind.
        class_folders: ``False``: sub-folders are not classes (everything unlabelled, searched
            recursively) — e.g. DICOM trees laid out by patient/study/series.

    Returns:
        :class:`Layout` with relative paths sorted in code-point order.

    Raises:
        CbmirError: split folders mixed with other folders at the top, two folders naming one split,
            or nothing accepted found.
    """
    root = Path(root)
    if root.is_file():
        if not accept(root):
            raise CbmirError(f"{root} is not a file of the expected kind")
        return Layout(files={"train": [(root.name, None)]})
    layout = Layout(files={})
    top_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    split_dirs: dict[str, Path] = {}
    for d in top_dirs:
        split = SPLIT_ALIASES.get(d.name.lower())
        if split is None:
            continue
        if split in split_dirs:
            raise CbmirError(f"{root}: folders {split_dirs[split].name!r} and {d.name!r} both name the "
                             f"{split!r} split; keep one")
        split_dirs[split] = d
    if split_dirs:
        others = [d.name for d in top_dirs if d not in split_dirs.values()]
        if others:
            raise CbmirError(f"{root}: has split folders "
                             f"({', '.join(sorted(p.name for p in split_dirs.values()))}) "
                             f"and other folders ({', '.join(others[:10])}); put every class folder inside "
                             "train/ and test/ (or database/ and query/), or remove the split folders")
        for f in sorted(p for p in root.iterdir() if p.is_file() and _visible(p.name)):
            layout.ignored.append(f"{f.name} (file outside the split folders)")
        for split, d in split_dirs.items():
            layout.files[split] = _scan_split(d, root, accept, layout, class_folders)
    else:
        layout.files["train"] = _scan_split(root, root, accept, layout, class_folders)
    if not any(layout.files.values()):
        raise CbmirError(f"{root}: no files of the expected kind found (see the source's accepted formats); "
                         f"ignored: {', '.join(layout.ignored[:5]) or 'nothing'}")
    return layout


def _scan_split(d: Path, root: Path, accept, layout: Layout,
                class_folders: bool) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    sub = sorted(p for p in d.iterdir() if p.is_dir() and _visible(p.name))
    if not class_folders or not sub:
        for f in _walk_files(d):
            (out.append((rel_posix(f, root), None)) if accept(f)
             else layout.ignored.append(rel_posix(f, root)))
        return sorted(out)
    for f in sorted(p for p in d.iterdir() if p.is_file() and _visible(p.name)):
        layout.ignored.append(f"{rel_posix(f, root)} (not in a class folder)")
    for c in sub:
        for f in _walk_files(c):
            (out.append((rel_posix(f, root), c.name)) if accept(f)
             else layout.ignored.append(rel_posix(f, root)))
    return sorted(out)


def label_map(names) -> dict[str, int]:
    """Class names -> integer ids in sorted (code-point) order; ``None`` is skipped (unlabelled)."""
    return {n: i for i, n in enumerate(sorted({n for n in names if n is not None}))}


def archive_name(path: str | Path, name: str | None = None) -> str:
    """Dataset name of a user archive: ``name`` or the folder/file stem, lower case, characters other
    than letters, digits, ``_ - .`` replaced by ``_`` (``My Scans.nii.gz`` -> ``my_scans``).

    Raises:
        CbmirError: empty name, or a name shaped like a MedMNIST flag (``<letters>mnist[3d]``), which
            could share a MedMNIST dataset's collections.
    """
    if name is None:
        p = Path(path)
        base = p.name if p.is_dir() or not p.suffix else p.name[: -len(p.suffix)]
        if base.lower().endswith(".nii"):
            base = base[:-4]
        name = base or p.resolve().name
    out = re.sub(r"[^a-z0-9_.\-]+", "_", str(name).strip().lower()).strip("_")
    if not out:
        raise CbmirError(f"cannot derive a collection name from {path!r}; pass --name")
    if re.fullmatch(r"[a-z]+mnist(3d)?", out):  # MedMNIST flags (checked without importing medmnist/torch)
        raise CbmirError(f"archive name {out!r} looks like a MedMNIST dataset name and could share its "
                         "collections; pass another --name")
    return out


def json_value(v):
    """A payload-safe (JSON) version of ``v``: numpy scalars -> Python, NaN/inf -> None, dates -> ISO
    strings, sequences -> lists, anything else -> ``str``."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [json_value(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    iso = getattr(v, "isoformat", None)
    if callable(iso):
        try:
            return iso()
        except (TypeError, ValueError):
            pass
    return str(v)


class ArchiveSource:
    """A user archive behind the :class:`cbmir.ingest.base.DatasetSource` interface.

    Subclasses build ``items`` (per split, sorted by key) and implement :meth:`load_item`.

    Attributes:
        kind: ``folder``, ``manifest``, ``dicom`` or ``nifti``.
        name (str): dataset name (collection prefix); root (Path): the archive root.
        size (int): 2D image side / volume side every item is resized to.
        is_3d (bool): items are volumes ``(size, size, size)``.
        n_classes (int), class_names (list[str], index = label id).
        rule (IntensityRule), strict (bool), max_pixels (int), max_voxels (int), fit (str).
        problems (list[Problem]): unreadable files met so far (also those found while scanning).
        ignored (list[str]): files not of the source's kind (relative paths).
        notes (list[str]): other facts for the summary (multi-frame files, clipped windows ...).
    """

    kind = "archive"
    #: ``image_id`` is ``<name>/<split>/<source_path>`` (manifests: one file may be listed in two splits);
    #: scanned folders already have the split folder in ``source_path``: ``<name>/<source_path>``.
    split_in_image_id = False

    def __init__(self, root: str | Path, size: int, *, name: str | None = None,
                 rule: IntensityRule | None = None, strict: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_voxels: int = DEFAULT_MAX_VOXELS,
                 fit: str = "stretch") -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise CbmirError(f"{self.root} does not exist")
        try:
            size = int(size)
        except (TypeError, ValueError):
            raise CbmirError(f"size must be an integer number of pixels, got {size!r}") from None
        if not 8 <= size <= 4096:
            raise CbmirError(f"size must be between 8 and 4096 pixels, got {size}")
        self.size = size
        self.name = archive_name(self.root, name)
        self.rule = rule or IntensityRule()
        self.strict = bool(strict)
        self.max_pixels = int(max_pixels)
        self.max_voxels = int(max_voxels)
        self.fit = fit
        self.is_3d = False
        self.items: dict[str, list[Item]] = {}
        self.class_names: list[str] = []
        self.n_classes = 0
        self.problems: list[Problem] = []
        self._problem_keys: set[tuple[str, str]] = set()
        self.ignored: list[str] = []
        self.notes: list[str] = []
        self._clipped: list[float] = []
        self._multi_frame = 0

    # ------------------------------------------------------------------ set-up helpers
    def _set_scanned_items(self, accept: Callable[[Path], bool], class_folders: bool = True) -> None:
        """Scan ``root`` with :func:`scan_tree` and set one item per accepted file: key and
        ``source_path`` its path relative to the archive folder, label its class folder (ids by
        :func:`label_map`, -1 when unlabelled); records the scan's ``ignored`` files and ``notes``."""
        layout = scan_tree(self.root, accept, class_folders=class_folders)
        base = self.root.parent if self.root.is_file() else self.root
        classes = label_map(c for files in layout.files.values() for _, c in files)
        items = {split: [Item(key=rel, source_path=rel, files=(base / rel,),
                              label=classes.get(c, -1) if c is not None else -1, label_name=c)
                         for rel, c in files]
                 for split, files in layout.files.items()}
        self.ignored = layout.ignored
        self.notes += layout.notes
        self._set_items(items, sorted(classes, key=classes.get))

    def _set_items(self, items: dict[str, list[Item]], class_names: list[str] | None = None) -> None:
        for split, lst in items.items():
            if split not in SPLITS:
                raise CbmirError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
            lst.sort(key=lambda it: it.key)
            for a, b in zip(lst, lst[1:]):
                if a.key == b.key:
                    raise CbmirError(f"{self.root}: two {split} items share the key {a.key!r}; "
                                     "row ids must be unique")
        self.items = {s: items.get(s, []) for s in SPLITS}
        if class_names is None:
            names: dict[int, str] = {}
            for lst in self.items.values():
                for it in lst:
                    if it.label >= 0 and it.label_name is not None:
                        names.setdefault(it.label, it.label_name)
            class_names = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
        self.class_names = list(class_names)
        self.n_classes = len(self.class_names)

    def _problem(self, split: str, index: int | None, path: str, reason: str) -> None:
        """Record (or, with ``strict``, raise) an unreadable file."""
        if self.strict:
            raise CbmirError(f"{self.kind} archive {self.root}: cannot read {split} file {path}: {reason} "
                             "(--strict; without it unreadable files are skipped and listed)")
        key = (split, path)
        if key not in self._problem_keys:
            self._problem_keys.add(key)
            self.problems.append(Problem(split, index, path, reason))

    # ------------------------------------------------------------------ DatasetSource
    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise CbmirError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return split

    def split_size(self, split: str) -> int:
        """Number of items of ``split`` (0 when the archive has no such split), unreadable ones included."""
        return len(self.items[self._check_split(split)])

    def reopen_spec(self) -> dict:
        """How to open this archive again as it was ingested: ``{"path": absolute archive path, "options":
        keyword arguments of :func:`cbmir.ingest.sources.open_source`}``. Recorded in the collection
        metadata at ingest (``extra["archive"]``) so that the stored points' images can be rendered from
        their files with the same pixel rules (:mod:`cbmir.app.images`)."""
        win = self.rule.window
        opts = {"source": self.kind, "name": self.name, "intensity": self.rule.mode,
                "window": f"{win[0]:g},{win[1]:g}" if win is not None else None}
        if self.kind != "nifti":
            opts["fit"] = self.fit
        if getattr(self, "slice_axis", None) is not None:
            opts["slice_axis"] = int(self.slice_axis)
        if self.kind == "dicom":
            opts["dicom_mode"] = getattr(self, "mode", "auto")
        opts.update(getattr(self, "reopen_extra", {}))
        path = getattr(self, "manifest", None) or self.root
        return {"path": str(Path(path).resolve()), "options": opts}

    def fingerprint(self) -> dict[str, str]:
        """Per split (with items), sha256 over the sorted rows: key, source path, label, label name, static
        payload, and each file's path, size and ``mtime_ns`` (a cheap ``stat``, no pixel read). Stored in
        the collection metadata at ingest (``extra["source_fingerprint"]``): a re-run on an archive that
        changed since (files added/removed/renamed/relabelled/rewritten) is refused instead of mixing rows."""
        import hashlib
        import json

        out = {}
        for split, items in self.items.items():
            if not items:
                continue
            h = hashlib.sha256()
            for it in items:
                row = [it.key, it.source_path, int(it.label), it.label_name, it.payload, self._file_stats(it)]
                h.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
            out[split] = h.hexdigest()
        return out

    @property
    def base(self) -> Path:
        """The folder item paths are relative to (the archive folder, or a single file's folder)."""
        return self.root.parent if self.root.is_file() else self.root

    def _file_stats(self, item: Item) -> list:
        """``[[relative path, size, mtime_ns], ...]`` of the item's files (``-1`` for a missing one)."""
        files = []
        for f in item.files:
            try:
                st = os.stat(f)
                files.append([rel_posix(Path(f), self.base), st.st_size, st.st_mtime_ns])
            except (OSError, ValueError):
                files.append([str(f), -1, -1])
        return files

    def stat_digest(self, item: Item) -> str:
        """SHA-256 of the item's files' paths, sizes and modification times (a ``stat`` each, no read):
        equal digests mean the item's files were not touched since (the sync's fast path)."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self._file_stats(item)).encode()).hexdigest()

    def content_digest(self, item: Item) -> str | None:
        """SHA-256 of the bytes of the item's files, in order (each preceded by its length); None when
        a file cannot be read. Tells a changed file from one only touched (new mtime, same bytes), and
        finds a moved or renamed file among the removed ones."""
        import hashlib

        h = hashlib.sha256()
        try:
            for f in item.files:
                h.update(f"{os.path.getsize(f)}\n".encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
        except OSError:
            return None
        return h.hexdigest()

    def image_id(self, split: str, item: Item) -> str:
        """``<name>/<source_path>`` (manifests: ``<name>/<split>/<source_path>``)."""
        if self.split_in_image_id:
            return f"{self.name}/{split}/{item.source_path}"
        return f"{self.name}/{item.source_path}"

    def static_payload(self, split: str, item: Item) -> dict:
        """The payload a synced point of ``item`` takes from the archive (no pixel read): ``label``,
        ``image_id``, ``source_path``, ``label_name``, ``source_kind``, ``item_key``, ``origin``
        (``archive``), ``item_fields`` (names of the item's own fields) and those fields (manifest
        columns, DICOM tags). Decoding facts and digests are added when the item is embedded."""
        own = {k: json_value(v) for k, v in item.payload.items()}
        return {"label": int(item.label), "image_id": self.image_id(split, item), "source_path": item.source_path,
                "label_name": item.label_name, "source_kind": self.kind, "item_key": item.key, "origin": "archive",
                "item_fields": sorted(own), **own}

    def options(self) -> dict:
        """How this archive was opened, as :func:`cbmir.ingest.sources.open_source` keyword arguments
        (recorded in the collection metadata, so that ``cbmir add`` reads files with the same rules)."""
        opts = {"source": self.kind, "name": self.name, "intensity": self.rule.mode,
                "window": list(self.rule.window) if self.rule.window else None, "fit": self.fit}
        for attr, key in (("slice_axis", "slice_axis"), ("mode", "dicom_mode")):
            if getattr(self, attr, None) is not None:
                opts[key] = getattr(self, attr)
        return opts

    def find_item(self, path: str | os.PathLike) -> tuple[str, Item] | None:
        """``(split, item)`` of the archive item that reads file ``path``, or None."""
        want = Path(path).expanduser().resolve()
        for split, items in self.items.items():
            for it in items:
                if any(Path(f).resolve() == want for f in it.files):
                    return split, it
        return None

    def unreadable_rows(self, split: str, rows) -> list[int]:
        """Those of ``rows`` of ``split`` that the ingest rules skip (the file cannot be decoded): what
        ``cbmir verify`` accepts as missing after a non-strict ingest."""
        items = self.items[self._check_split(split)]
        return [int(i) for i in rows if self.item_unreadable(items[int(i)])]

    def item_unreadable(self, item: Item) -> bool:
        """True when ``item`` cannot be decoded (the ingest skips it, or fails under ``strict``)."""
        try:
            self.load_item(item)
        except MemoryError:
            raise
        except DECODE_ERRORS:
            return True
        return False

    def labels(self, split: str) -> np.ndarray:
        """int64 ``(N,)`` labels of ``split`` in row order (-1 = unlabelled)."""
        return np.asarray([it.label for it in self.items[self._check_split(split)]], dtype=np.int64)

    def load_item(self, item: Item) -> tuple[np.ndarray, dict]:
        """Pixels of one item: uint8 ``(size, size, 3)`` for 2D, ``(size, size, size)`` for 3D, and a
        payload dict of facts about the decoding. Raises :class:`PixelError` (or a decoder error)."""
        raise NotImplementedError

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """Stream ``split`` from row ``start`` in batches of at most ``batch_size`` readable items.

        Yields:
            :class:`cbmir.ingest.base.Batch`: ``images`` uint8 ``(B, size, size, 3)`` (2D, grey replicated)
            or ``(B, size, size, size)`` (3D); ``indices`` the rows (unreadable rows are absent: listed
            in :attr:`problems`); ``image_ids`` ``<name>/<source_path>`` (manifests:
            ``<name>/<split>/<source_path>``); ``extra_payload``
            with ``source_path``, ``label_name``, ``source_kind``, the item's static payload and
            decoding facts (``intensity``, ``intensity_low``/``_high``, ``clipped_fraction``,
            ``orig_*``, ``n_slices`` ...).

        Raises:
            CbmirError: unknown split, bad ``batch_size``/``start``; an unreadable file under
                ``strict``; every file of the split unreadable.
        """
        items = self.items[self._check_split(split)]
        n = len(items)
        if not 0 <= int(start) <= n:
            raise CbmirError(f"start must be in [0, {n}] for {self.name}/{split}, got {start}")
        yield from self._batches(split, list(enumerate(items))[int(start):], batch_size, whole=int(start) == 0,
                                 synced=False)

    def iter_items(self, split: str, entries, batch_size: int, *, whole: bool = False) -> Iterator[Batch]:
        """Stream the given items of ``split`` in batches, as the sync embeds them (:mod:`cbmir.ingest.sync`).

        Args:
            entries: ``[(index, item), ...]`` in the order to embed; ``index`` is the point's row index
                (:func:`cbmir.search.schema.key_index`), returned in ``Batch.indices``.
            whole: the entries are the whole split (a first ingest): when none of them decodes, the run
                stops (a systematic problem); otherwise unreadable files are only skipped and listed.

        Yields:
            :class:`cbmir.ingest.base.Batch` as :meth:`iter_batches`, whose ``extra_payload`` also holds
            :meth:`static_payload` and ``stat_sha256`` / ``content_sha256`` (files ``stat``-ed before they
            are read, so a file changed meanwhile is seen as changed by the next sync).
        """
        yield from self._batches(self._check_split(split), list(entries), batch_size, whole=whole, synced=True)

    def _batches(self, split: str, entries: list, batch_size: int, *, whole: bool, synced: bool) -> Iterator[Batch]:
        if int(batch_size) < 1:
            raise CbmirError(f"batch_size must be >= 1, got {batch_size}")
        ok = failed = 0
        first_error = ""
        for lo in range(0, len(entries), int(batch_size)):
            images, idx, labels, ids, pays = [], [], [], [], []
            for i, it in entries[lo:lo + int(batch_size)]:
                digests = {"stat_sha256": self.stat_digest(it), "content_sha256": self.content_digest(it)} \
                    if synced else {}
                try:
                    arr, info = self.load_item(it)
                except MemoryError:
                    raise
                except DECODE_ERRORS as exc:
                    reason = str(exc) if isinstance(exc, PixelError) else f"{type(exc).__name__}: {exc}"
                    self._problem(split, None if synced else i, it.source_path, reason)
                    failed += 1
                    first_error = first_error or f"{it.source_path}: {reason}"
                    continue
                ok += 1
                images.append(arr)
                idx.append(i)
                labels.append(it.label)
                ids.append(self.image_id(split, it))
                if info.get("clipped_fraction"):
                    self._clipped.append(float(info["clipped_fraction"]))
                if info.get("n_frames", 1) > 1 and not self.is_3d:
                    self._multi_frame += 1
                pay = {"source_path": it.source_path, "label_name": it.label_name, "source_kind": self.kind}
                pay.update(it.payload)
                pay.update(info)
                pay = {k: json_value(v) for k, v in pay.items()}
                if synced:
                    pay.update(self.static_payload(split, it), **digests)
                pays.append(pay)
            if images:
                yield Batch(images=np.stack(images), labels=np.asarray(labels, dtype=np.int64),
                            indices=np.asarray(idx, dtype=np.int64), image_ids=ids, extra_payload=pays)
        if failed and not ok and whole:
            raise CbmirError(f"{self.kind} archive {self.root}: none of the {failed} {split} files "
                             f"could be decoded (first: {first_error}); check the pixel "
                             "rules and the file formats")

    # ------------------------------------------------------------------ reporting
    def describe(self) -> str:
        """One line: kind, name, root, counts per split, classes, size and pixel rule."""
        counts = ", ".join(f"{s} {len(v)}" for s, v in self.items.items() if v)
        classes = (f"{self.n_classes} classes [{', '.join(self.class_names[:10])}"
                   f"{', ...' if self.n_classes > 10 else ''}]") if self.n_classes else "unlabelled"
        shape = f"{self.size}^3 volumes" if self.is_3d else f"{self.size}x{self.size} RGB ({self.fit})"
        return (f"{self.kind} archive {self.name!r} ({self.root}): {counts}; {classes}; {shape}; "
                f"intensity: {self.rule.describe()}")

    def summary(self) -> str:
        """The run summary: :meth:`describe`, then unreadable files (skipped), ignored files and notes."""
        lines = [self.describe()]
        if self.problems:
            lines.append(f"skipped {len(self.problems)} unreadable file(s) (--strict makes this an error):")
            lines += [f"  {p}" for p in self.problems[:MAX_EXAMPLES]]
            if len(self.problems) > MAX_EXAMPLES:
                lines.append(f"  ... and {len(self.problems) - MAX_EXAMPLES} more")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} file(s) that are not {self.accepts()}: "
                         + ", ".join(self.ignored[:5]) + (" ..." if len(self.ignored) > 5 else ""))
        if self._clipped:
            lines.append(f"window clipped pixels in {len(self._clipped)} item(s): mean "
                         f"{100 * float(np.mean(self._clipped)):.2f}% of their pixels, max "
                         f"{100 * max(self._clipped):.2f}% (payload clipped_fraction)")
        if self._multi_frame:
            lines.append(f"{self._multi_frame} multi-frame image file(s): first frame used "
                         "(payload n_frames)")
        lines += self.notes
        return "\n".join(lines)

    def accepts(self) -> str:
        """Human description of the accepted file kinds (for the summary)."""
        return "readable files"

    @property
    def preprocessing(self) -> str:
        """The pixel rules of this source, in words."""
        shape = f"resized to {self.size}^3 (cbmir.ingest.volumes recipe)" if self.is_3d else \
            f"{self.fit} to {self.size}x{self.size} bicubic, grey -> RGB"
        return f"{self.kind}: intensity {self.rule.describe()}; {shape}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, size={self.size}, name={self.name!r})"

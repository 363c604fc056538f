"""CSV / TSV / Parquet manifests: one row per image (or volume), any extra columns kept as payload.

Columns (names case-insensitive, settable):

* ``path`` (required): the file, relative to the manifest's folder (or ``root``), or absolute.
  Images (PNG, JPEG, TIFF, ... 2D ``.npy``, single-frame ``.dcm``) make a 2D archive; volumes
  (``.nii``, ``.nii.gz``, 3D ``.npy``) a 3D one; mixing both is refused.
* ``label`` (optional): class per row. All-integer labels (int column, integral floats, or
  strings of digits) keep their integer value; anything else is a class name, mapped to ids in
  sorted order over all splits. ``label_name`` in the payload keeps the name. Empty cells: -1
  (unlabelled), counted in the summary.
* ``split`` (optional): ``train``/``database``, ``test``/``query``, ``val``/``validation``;
  without the column every row is ``train``.
* every other column goes into the payload unchanged (patient pseudonym, study date, modality ...);
  values are made JSON-safe (NaN -> null, dates -> ISO strings). A column named like a cbmir
  payload field (``dataset``, ``index``, ``source_path`` ...) is stored as ``manifest_<name>``.

**Row key.** Within a split rows are sorted by ``key_column`` when given (e.g. an image id),
else by ``path``; the row index is the position in that order, so re-ordering the manifest does
not move any point, and re-ingesting overwrites. Duplicate keys within a split are refused.
Files that do not exist are listed as unreadable at once (or stop the run with ``strict``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.ingest.sources.archive import RESERVED_PAYLOAD, SPLIT_ALIASES, ArchiveSource, Item, rel_posix
from cbmir.ingest.sources.pixels import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    as_rgb,
    extension,
    fit_to_size,
    load_image,
    resize_volume,
)

MANIFEST_EXTENSIONS = (".csv", ".tsv", ".parquet", ".pq")


def read_table(path: Path):
    """The manifest as a pandas DataFrame (``.csv``, ``.tsv``, ``.parquet``/``.pq`` via pyarrow).

    Raises:
        CbmirError: unknown extension or unreadable file.
    """
    import pandas as pd

    ext = extension(path)
    try:
        if ext == ".csv":
            return pd.read_csv(path)
        if ext == ".tsv":
            return pd.read_csv(path, sep="\t")
        if ext in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as exc:
        raise CbmirError(f"cannot read manifest {path}: {type(exc).__name__}: {exc}") from exc
    raise CbmirError(f"manifest {path} must be .csv, .tsv, .parquet or .pq")


def _column(df, wanted: str | None, required: bool, what: str):
    if wanted is None:
        return None
    cols = {str(c).lower(): c for c in df.columns}
    c = cols.get(wanted.lower())
    if c is None and required:
        raise CbmirError(f"manifest has no {what} column {wanted!r}; columns: {', '.join(map(str, df.columns))}")
    return c


def typed_labels(values) -> tuple[list[int], list[str | None], list[str]]:
    """Label cells -> ``(ids, names, class_names)`` with one consistent type (module docstring).

    Returns:
        ids: int per row (-1 for empty cells); names: ``str`` per row (None when empty);
        class_names: index = id (integer labels: ``str(i)`` for ``0..max``).

    Raises:
        CbmirError: negative integer labels (-1 means unlabelled).
    """
    cells = list(values)

    def empty(v) -> bool:
        return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())

    present = [v for v in cells if not empty(v)]

    def as_int(v):
        if isinstance(v, (bool, np.bool_)):
            return int(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return int(v)
        if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
            return int(v.strip())
        return None

    ints = [as_int(v) for v in present]
    if present and all(i is not None for i in ints):
        if min(ints) < 0:
            raise CbmirError(f"manifest labels must be >= 0 (-1 means unlabelled); found {min(ints)}")
        ids = [-1 if empty(v) else as_int(v) for v in cells]
        names = [None if empty(v) else str(as_int(v)) for v in cells]
        return ids, names, [str(i) for i in range(max(ints) + 1)]
    strs = [None if empty(v) else str(v).strip() for v in cells]
    classes = sorted({s for s in strs if s is not None})
    cid = {c: i for i, c in enumerate(classes)}
    return [-1 if s is None else cid[s] for s in strs], strs, classes


class ManifestSource(ArchiveSource):
    """Images or volumes listed in a CSV / TSV / Parquet manifest (a :class:`cbmir.ingest.base.DatasetSource`).

    Args:
        manifest: the manifest file.
        size: side every image (volume) is resized to.
        name: dataset name; default the manifest's file stem.
        root: folder relative paths are resolved against; default the manifest's folder.
        rule, strict, max_pixels, max_voxels, fit: see :class:`~cbmir.ingest.sources.archive.ArchiveSource`.
        slice_axis: for volume manifests, see :mod:`cbmir.ingest.sources.nifti`.
        path_column, label_column, split_column: column names (case-insensitive); ``label`` and
            ``split`` are optional.
        key_column: column giving the row key (default: the path).

    Raises:
        CbmirError: unreadable manifest, missing path column, empty paths, unknown split values,
            duplicate keys in a split, images mixed with volumes.
    """

    kind = "manifest"
    split_in_image_id = True  # one file may be listed in two splits

    def __init__(self, manifest, size: int = 28, *, name=None, root=None, rule=None, strict=False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_voxels: int = DEFAULT_MAX_VOXELS,
                 fit: str = "stretch", slice_axis: int | None = None, path_column: str = "path",
                 label_column: str = "label", split_column: str = "split", key_column: str | None = None) -> None:
        super().__init__(manifest, size, name=name, rule=rule, strict=strict, max_pixels=max_pixels,
                         max_voxels=max_voxels, fit=fit)
        if not self.root.is_file():
            raise CbmirError(f"manifest {self.root} is not a file")
        self.manifest = self.root
        self.root = Path(root).expanduser() if root is not None else self.manifest.parent
        self.slice_axis = slice_axis
        self.reopen_extra = {"root": str(self.root.resolve()), "path_column": path_column,
                             "label_column": label_column, "split_column": split_column, "key_column": key_column}
        df = read_table(self.manifest)
        pcol = _column(df, path_column, True, "path")
        lcol = _column(df, label_column, False, "label")
        scol = _column(df, split_column, False, "split")
        kcol = _column(df, key_column, True, "key") if key_column else None
        if len(df) == 0:
            raise CbmirError(f"manifest {self.manifest} has no rows")
        paths = df[pcol].tolist()
        empty = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise CbmirError(f"manifest {self.manifest}: empty path in row(s) {[i + 2 for i in empty[:10]]} "
                             "(line numbers, header = line 1)")
        if scol is not None:
            raw = df[scol].tolist()
            splits = [SPLIT_ALIASES.get(str(v).strip().lower()) if isinstance(v, str) else None for v in raw]
            bad = sorted({str(v) for v, s in zip(raw, splits) if s is None})
            if bad:
                raise CbmirError(f"manifest {self.manifest}: unknown split value(s) {bad[:10]}; valid: "
                                 f"{', '.join(SPLIT_ALIASES)}")
        else:
            splits = ["train"] * len(df)
        if lcol is not None:
            ids, names, classes = typed_labels(df[lcol].tolist())
            n_empty = sum(1 for i in ids if i < 0)
            if n_empty:
                self.notes.append(f"{n_empty} manifest row(s) without a label (label -1)")
        else:
            ids, names, classes = [-1] * len(df), [None] * len(df), []
        extra_cols = [c for c in df.columns if c not in (pcol, lcol, scol)]
        renamed = {c: (f"manifest_{c}" if str(c) in RESERVED_PAYLOAD else str(c)) for c in extra_cols}
        records = df[extra_cols].to_dict("records") if extra_cols else [{}] * len(df)
        kinds = {"volume" if _is_volume_path(self.root, p) else "image" for p in paths}
        if len(kinds) > 1:
            raise CbmirError(f"manifest {self.manifest} lists both 2D images and volumes; one collection holds "
                             "one kind: split the manifest")
        self.is_3d = kinds == {"volume"}
        if self.is_3d and self.size > 256:
            raise CbmirError(f"volume side must be at most 256 voxels, got {self.size}")
        items: dict[str, list[Item]] = {}
        for i, p in enumerate(paths):
            full = Path(p.strip()).expanduser()
            full = full if full.is_absolute() else self.root / full
            try:
                rel = rel_posix(full, self.root)
            except ValueError:  # another drive (Windows)
                rel = full.as_posix()
            if rel.startswith("../"):
                rel = full.as_posix()
            key = str(records[i][kcol]) if kcol is not None else rel
            payload = {renamed[c]: v for c, v in records[i].items()}
            payload["manifest_row"] = i  # 0-based data row in the file (informative; ids use the key)
            items.setdefault(splits[i], []).append(
                Item(key=key, source_path=rel, files=(full,), label=ids[i], label_name=names[i], payload=payload))
        self._set_items(items, classes)
        for split, lst in self.items.items():
            for idx, it in enumerate(lst):
                if not it.files[0].is_file():
                    self._problem(split, idx, it.source_path, "file not found")

    def load_item(self, item: Item) -> tuple[np.ndarray, dict]:
        """uint8 ``(size, size, 3)`` (2D) or ``(size, size, size)`` (3D) and decoding facts."""
        if self.is_3d:
            from cbmir.ingest.sources.nifti import read_volume

            vol, info = read_volume(item.files[0], self.rule, slice_axis=self.slice_axis, max_voxels=self.max_voxels)
            return resize_volume(vol, self.size), info
        arr, info = load_image(item.files[0], self.rule, max_pixels=self.max_pixels)
        return as_rgb(fit_to_size(arr, self.size, self.fit)), info

    def accepts(self) -> str:
        return "listed in the manifest"

    def describe(self) -> str:
        return super().describe().replace(f"({self.root})", f"({self.manifest}, paths relative to {self.root})")


def _is_volume_path(root: Path, p: str) -> bool:
    ext = extension(p)
    if ext in (".nii", ".nii.gz"):
        return True
    if ext == ".npy":
        full = Path(p.strip()).expanduser()
        full = full if full.is_absolute() else root / full
        if os.path.isfile(full):
            try:
                arr = np.load(full, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                return False
            return arr.ndim == 3 and arr.shape[-1] not in (1, 3)
    return False

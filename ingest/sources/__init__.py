"""Dataset sources: MedMNIST and users' own archives behind one :class:`cbmir.ingest.base.DatasetSource`.

============  ==================================================  ======================================================
kind          what ``--dataset`` points at                        reader
============  ==================================================  ======================================================
``medmnist``  a MedMNIST flag (``breastmnist``)                   :mod:`cbmir.ingest.medmnist_data`
``folder``    a folder ``[train|test/]<class>/*.png|jpg|tif...``  :class:`~cbmir.ingest.sources.folder.FolderSource`
``manifest``  a ``.csv``/``.tsv``/``.parquet`` with ``path`` ...  :class:`~cbmir.ingest.sources.manifest.ManifestSource`
``dicom``     a folder of DICOM files (series -> volumes)         :class:`~cbmir.ingest.sources.dicom.DicomSource`
``nifti``     a ``.nii``/``.nii.gz``/``.npy`` volume or a folder  :class:`~cbmir.ingest.sources.nifti.NiftiSource`
============  ==================================================  ======================================================

:func:`open_source` is the one entry point (the CLI's ``--source``); when ``source`` is omitted
the kind is inferred by :func:`infer_source_kind`. Pixel rules shared by every user archive:
:mod:`cbmir.ingest.sources.pixels`; folder layout, stable row ids, labels and the run summary:
:mod:`cbmir.ingest.sources.archive`.
"""

from __future__ import annotations

from pathlib import Path

from cbmir.core.errors import CbmirError
from cbmir.ingest.sources.archive import ArchiveSource, Problem, archive_name
from cbmir.ingest.sources.dicom import MODES as DICOM_MODES
from cbmir.ingest.sources.pixels import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    FITS,
    IMAGE_EXTENSIONS,
    IntensityRule,
    PixelError,
    extension,
)

SOURCE_KINDS = ("medmnist", "folder", "manifest", "dicom", "nifti")
_SCAN_LIMIT = 2000


def looks_like_path(dataset: str) -> bool:
    """True when ``dataset`` names a user archive by path (a separator, ``.``/``~`` start or a file
    extension) rather than a MedMNIST flag."""
    return any(ch in dataset for ch in "/\\") or dataset.startswith((".", "~")) or bool(extension(dataset))


def infer_source_kind(dataset: str | Path) -> str:
    """The source kind of ``dataset`` (rules, first match wins):

    * an existing file: ``.csv``/``.tsv``/``.parquet``/``.pq`` -> ``manifest``; ``.nii``/``.nii.gz``/``.npy``
      -> ``nifti``; a DICOM file (``.dcm`` or the ``DICM`` magic) -> ``dicom``; an image -> ``folder``;
    * an existing directory: looks at up to 2,000 files: any NIfTI, or ``.npy`` volumes (3D, not
      ``(H, W, 1|3)``) -> ``nifti``; else more DICOM files than images -> ``dicom``; else images ->
      ``folder``;
    * a string that is not a path (no ``/``, no extension) -> ``medmnist`` (a flag).

    Raises:
        CbmirError: a path that does not exist, or a directory holding nothing recognisable.
    """
    p = Path(str(dataset)).expanduser()
    if p.is_file():
        ext = extension(p)
        if ext in (".csv", ".tsv", ".parquet", ".pq"):
            return "manifest"
        if ext in (".nii", ".nii.gz", ".npy"):
            return "nifti"
        from cbmir.ingest.sources.dicom import looks_like_dicom

        if looks_like_dicom(p):
            return "dicom"
        if ext in IMAGE_EXTENSIONS:
            return "folder"
        raise CbmirError(f"cannot tell what kind of archive {p} is; pass --source "
                         f"({', '.join(SOURCE_KINDS[1:])})")
    if p.is_dir():
        return _infer_dir(p)
    if looks_like_path(str(dataset)):
        raise CbmirError(f"{dataset} does not exist (for a MedMNIST dataset give its flag, e.g. breastmnist)")
    return "medmnist"


def _infer_dir(root: Path) -> str:
    import numpy as np

    from cbmir.ingest.sources.archive import _walk_files
    from cbmir.ingest.sources.dicom import looks_like_dicom

    counts = {"nifti": 0, "dicom": 0, "folder": 0}
    for i, f in enumerate(_walk_files(root)):
        if i >= _SCAN_LIMIT:
            break
        ext = extension(f)
        if ext in (".nii", ".nii.gz"):
            counts["nifti"] += 1
        elif ext == ".npy":
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                is_vol = a.ndim == 4 or (a.ndim == 3 and a.shape[-1] not in (1, 3))
            except (OSError, ValueError):
                is_vol = False
            counts["nifti" if is_vol else "folder"] += 1
        elif ext in IMAGE_EXTENSIONS:
            counts["folder"] += 1
        elif looks_like_dicom(f):
            counts["dicom"] += 1
    if counts["nifti"]:
        return "nifti"
    if counts["dicom"] and counts["dicom"] >= counts["folder"]:
        return "dicom"
    if counts["folder"]:
        return "folder"
    raise CbmirError(f"{root}: found no images, DICOM files or volumes; pass --source "
                     f"({', '.join(SOURCE_KINDS[1:])}) or check the path")


def open_source(dataset: str | Path, size: int = 28, *, source: str | None = None, name: str | None = None,
                data_dir=None, download: bool = True, strict: bool = False, intensity: str | None = None,
                window=None, slice_axis: int | None = None, dicom_mode: str = "auto", fit: str = "stretch",
                class_folders: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_voxels: int = DEFAULT_MAX_VOXELS, **kwargs):
    """Open any dataset as a :class:`cbmir.ingest.base.DatasetSource`.

    Args:
        dataset: a MedMNIST flag, or the path of a user archive (folder, manifest, DICOM folder,
            NIfTI / ``.npy`` file or folder).
        size: image side (2D) or volume side (3D) every item is resized to.
        source: ``medmnist``, ``folder``, ``manifest``, ``dicom`` or ``nifti``; None infers it
            (:func:`infer_source_kind`).
        name: dataset / collection name of a user archive (default: the folder or file stem).
        data_dir, download: MedMNIST only (folder of the npz files; fetch when missing and reachable).
        strict: stop at the first unreadable file instead of skipping and listing it.
        intensity: ``auto`` | ``minmax`` | ``window`` | ``range`` (:mod:`cbmir.ingest.sources.pixels`).
        window: ``"C,W"`` or ``(center, width)``; implies ``intensity="window"``.
        slice_axis: volumes: voxel axis to slice along (:mod:`cbmir.ingest.sources.nifti`).
        dicom_mode: ``auto`` | ``2d`` | ``3d`` (:mod:`cbmir.ingest.sources.dicom`).
        fit: 2D resize: ``stretch`` | ``pad`` | ``crop``.
        class_folders: ``False``: sub-folders are not classes (unlabelled archive).
        max_pixels, max_voxels: decode limits per image / per volume.
        **kwargs: passed to the reader (e.g. ``path_column``, ``key_column``, ``tags``).

    Returns:
        :class:`cbmir.ingest.medmnist_data.MedMNISTSource` or an :class:`~cbmir.ingest.sources.archive.ArchiveSource`.

    Raises:
        CbmirError: unknown source kind, MedMNIST-only or archive-only options in the wrong place,
            and every error of the readers.
    """
    kind = (source or infer_source_kind(dataset)).lower()
    if kind not in SOURCE_KINDS:
        raise CbmirError(f"unknown source {source!r}; valid: {', '.join(SOURCE_KINDS)}")
    # option values are checked here, before anything is read or a collection is created
    fit, dicom_mode = str(fit).lower(), str(dicom_mode).lower()
    if fit not in FITS:
        raise CbmirError(f"unknown --fit {fit!r}; valid: {', '.join(FITS)}")
    if dicom_mode not in DICOM_MODES:
        raise CbmirError(f"unknown --dicom-mode {dicom_mode!r}; valid: {', '.join(DICOM_MODES)}")
    if dicom_mode != "auto" and kind != "dicom":
        raise CbmirError(f"--dicom-mode {dicom_mode} applies to DICOM archives; {dataset} is a {kind} source")
    if kind == "medmnist":
        if any(v is not None for v in (name, intensity, window, slice_axis)) or kwargs or fit != "stretch":
            raise CbmirError("--name, --intensity, --window, --slice-axis and --fit apply to user archives, "
                             "not to MedMNIST datasets")
        from cbmir.ingest.medmnist_data import open_medmnist

        return open_medmnist(str(dataset).lower(), size, data_dir, download=download)
    rule = IntensityRule.from_options(intensity, window)
    common = dict(name=name, rule=rule, strict=strict)
    if kind == "folder":
        from cbmir.ingest.sources.folder import FolderSource

        return FolderSource(dataset, size, max_pixels=max_pixels, fit=fit, class_folders=class_folders,
                            **common, **kwargs)
    if kind == "manifest":
        from cbmir.ingest.sources.manifest import ManifestSource

        return ManifestSource(dataset, size, max_pixels=max_pixels, max_voxels=max_voxels, fit=fit,
                              slice_axis=slice_axis, **common, **kwargs)
    if kind == "dicom":
        from cbmir.ingest.sources.dicom import DicomSource

        return DicomSource(dataset, size, mode=dicom_mode, max_pixels=max_pixels, max_voxels=max_voxels, fit=fit,
                           class_folders=class_folders, **common, **kwargs)
    from cbmir.ingest.sources.nifti import NiftiSource

    return NiftiSource(dataset, size, max_voxels=max_voxels, slice_axis=slice_axis, class_folders=class_folders,
                       **common, **kwargs)


def dataset_identity(dataset: str | Path, size: int = 28, *, source: str | None = None, name: str | None = None,
                     aggregation: str = "concat", **opts) -> tuple[str, str, bool | None]:
    """``(kind, dataset name, is_3d)`` of ``dataset`` for collection naming, reading as little as possible.

    ``is_3d`` is None when it was not needed and not determined (a ``dicom`` / ``manifest`` archive
    with ``concat`` aggregation, whose collection name is the same for 2D and 3D).

    MedMNIST: the lower-case flag and its 3D-ness. User archives: :func:`~cbmir.ingest.sources.archive.archive_name`;
    ``is_3d`` matters for the name only with a non-``concat`` volume aggregation, so the archive is
    scanned (headers only) only then, and only when its kind does not settle it (``nifti`` is 3D,
    ``folder`` 2D; ``dicom`` and ``manifest`` are opened).

    Raises:
        CbmirError: as :func:`infer_source_kind` / :func:`open_source`.
    """
    kind = (source or infer_source_kind(dataset)).lower()
    if kind not in SOURCE_KINDS:
        raise CbmirError(f"unknown source {source!r}; valid: {', '.join(SOURCE_KINDS)}")
    if kind == "medmnist":
        from cbmir.ingest.medmnist_data import is_3d_flag

        flag = str(dataset).lower()
        return kind, flag, bool(flag in _medmnist_flags() and is_3d_flag(flag))
    ds_name = archive_name(dataset, name)
    if kind in ("nifti", "folder"):
        return kind, ds_name, kind == "nifti"
    if aggregation == "concat":  # 2D and 3D names are the same: no need to read the archive
        return kind, ds_name, None
    src = open_source(dataset, size, source=kind, name=name, **opts)
    return kind, src.name, bool(src.is_3d)


def _medmnist_flags() -> tuple[str, ...]:
    from cbmir.ingest.medmnist_data import MEDMNIST_FLAGS

    return MEDMNIST_FLAGS


def check_evaluable(store, name: str, *, database_split: str = "train", query_split: str = "test") -> list[str]:
    """Refuse, with a clear message, to evaluate a collection that is unfinished, without queries or
    without labels. Cheap: point counts and metadata only.

    Returns:
        Notes for the user: a non-strict user archive with fewer points than files (unreadable files
        were skipped at ingest, or the ingest did not finish; ``cbmir verify`` tells which).

    Raises:
        CbmirError: fewer ``database_split`` / ``query_split`` points stored than the source has rows
            (``split_sizes`` recorded at ingest) for a MedMNIST or ``--strict`` source, or for a
            non-strict archive whose split ingest did not run to its end: an unfinished ingest; no
            ``database_split`` / ``query_split`` points (a user archive needs ``test/`` or ``query/``
            sub-folders, or a manifest ``split`` column); a sync of an archive that did not finish
            (``sync_pending``); or the collection's metadata records 0 classes (an unlabelled archive).
    """
    n_db, n_q = store.count(name, database_split), store.count(name, query_split)
    extra = store.meta(name).extra or {}
    sizes = extra.get("split_sizes") or {}  # recorded at ingest (cbmir.ingest.job.build_meta)
    short = {sp: (n, int(sizes[sp])) for sp, n in ((database_split, n_db), (query_split, n_q))
             if sp in sizes and n < int(sizes[sp])}
    # a non-strict archive may have fewer points than files (unreadable files skipped): accepted when
    # the ingest of that split ran to its end with exactly this many points (``extra["completed"]``,
    # cbmir.ingest.job._mark_complete), or, for collections made before that was recorded, with a note
    done = extra.get("completed")
    unfinished = {sp: v for sp, v in short.items()
                  if not extra.get("rows_may_be_skipped") or (done is not None and done.get(sp) != v[0])}
    if unfinished:
        have = "; ".join(f"{sp}: {n} of {m} points stored" + (" (never ingested)" if n == 0 else "")
                         for sp, (n, m) in unfinished.items())
        raise CbmirError(
            f"collection {name!r} is incomplete ({have}): its ingest did not finish, so metrics would "
            "cover only part of the data. Re-run the ingest with these splits (`cbmir run`, or `cbmir "
            f"ingest --splits {','.join(unfinished)}`) to embed the missing rows (it resumes), then "
            "evaluate; `cbmir verify` lists them.")
    if extra.get("sync_pending"):  # cbmir.ingest.sync: cleared when a sync completes
        raise CbmirError(
            f"collection {name!r}: a sync with its archive did not finish (interrupted, or it failed), so its "
            "points may mix old and new files. Re-run `cbmir ingest` with the same options to complete it, "
            "then evaluate.")
    if n_db == 0 or n_q == 0:
        raise CbmirError(
            f"collection {name!r} has {n_db} {database_split} (database) and {n_q} {query_split} (query) points; "
            "evaluation needs both. A user archive needs a query split: test/ (or query/) next to train/ "
            "(or database/) folders, or a 'split' column in the manifest. Search still works: `cbmir search`.")
    n_classes = extra.get("n_classes")  # recorded at ingest (cbmir.ingest.job.build_meta)
    if n_classes is not None and int(n_classes) == 0:
        raise CbmirError(
            f"collection {name!r} holds an unlabelled archive (no classes), so relevance (same class) is "
            "undefined and evaluation is impossible. Give labels by class sub-folders or a manifest "
            "'label' column. Search still works: `cbmir search`.")
    return [f"collection {name!r}: {sp}: {n} of {m} files stored ("
            + ("unreadable files skipped at ingest" if done is not None else
               "unreadable files skipped at ingest, or an unfinished ingest: `cbmir verify` tells which")
            + ")" for sp, (n, m) in short.items()]


def load_query(path: str | Path, meta, *, intensity: str | None = None, window=None,
               slice_axis: int | None = None, fit: str = "stretch", max_pixels: int = DEFAULT_MAX_PIXELS,
               max_voxels: int = DEFAULT_MAX_VOXELS):
    """A query file prepared like the collection's items: uint8 ``(1, size, size, 3)`` for a 2D
    collection (any image format, ``.dcm``, 2D ``.npy``), ``(1, size, size, size)`` for a 3D one
    (``.nii``/``.nii.gz``/``.npy``, or a multi-frame ``.dcm``), with the same pixel rules as ingest
    (pass the same ``intensity`` / ``window`` / ``slice_axis`` as when ingesting).

    Raises:
        CbmirError: missing file; :class:`PixelError` for an unreadable one.
    """
    from cbmir.ingest.sources.pixels import as_rgb, fit_to_size, load_image, resize_volume

    p = Path(path).expanduser()
    if not p.is_file():
        raise CbmirError(f"query file {p} does not exist")
    rule = IntensityRule.from_options(intensity, window)
    size = int(meta.size)
    if not meta.is_3d:
        arr, _ = load_image(p, rule, max_pixels=max_pixels)
        return as_rgb(fit_to_size(arr, size, fit))[None]
    if extension(p) in (".dcm", ".dicom", ".ima"):
        from cbmir.ingest.sources.dicom import DicomSource

        src = DicomSource(p, size, rule=rule, mode="3d", max_voxels=max_voxels, name="query")
        vol, _ = src.load_item(src.items["train"][0])
        return vol[None]
    from cbmir.ingest.sources.nifti import read_volume

    vol, _ = read_volume(p, rule, slice_axis=slice_axis, max_voxels=max_voxels)
    return resize_volume(vol, size)[None]


def source_summary(source) -> str | None:
    """The run summary of a user archive (``summary()``), None for MedMNIST."""
    fn = getattr(source, "summary", None)
    return fn() if callable(fn) else None


__all__ = ["SOURCE_KINDS", "ArchiveSource", "IntensityRule", "PixelError", "Problem", "archive_name",
           "check_evaluable", "dataset_identity", "infer_source_kind", "load_query", "looks_like_path",
           "open_source", "source_summary"]

"""DICOM archives (pydicom): single images, multi-frame files and series as volumes.

Layout: the folder layout of :mod:`cbmir.ingest.sources.archive` (``train/<class>/...``, ``test/...``,
or class folders only; ``class_folders=False`` for trees laid out by patient/study/series). Every
visible file is tried as DICOM: a file that is not DICOM is listed as ignored (``.dcm`` files that
fail are listed as unreadable); files without pixel data (DICOMDIR, reports) are ignored.

**2D or 3D** (``mode``): ``2d`` — every file is one image; ``3d`` — every series is one volume;
``auto`` (default) — 3D when some file has several frames or some series has several files with
an ``ImagePositionPatient`` (CT, MR, PET ...), else 2D (CR, DX, MG, US stills).

**Series as volumes.** Files of one split and class sharing ``SeriesInstanceUID`` form a volume.
Slices are sorted by their position along the slice normal (``ImagePositionPatient`` projected on
``ImageOrientationPatient``'s row x column direction), else by ``InstanceNumber``, else by path;
the payload says which (``slice_order``). A multi-frame file is one volume, frames in stored order.
All slices must share ``Rows`` x ``Columns``. A lone 2D file in a 3D archive is a one-slice volume.

**Pixel values** (:func:`slice_values`): decoded by pydicom (compressed transfer syntaxes need
pydicom's optional decoders, e.g. ``pylibjpeg``; without them the file is listed as unreadable),
then the modality transform: ``RescaleSlope`` / ``RescaleIntercept`` (top level, or the shared
functional groups of enhanced multi-frame files) or a Modality LUT — CT values become Hounsfield
units. Then to uint8 by the intensity rule (:mod:`cbmir.ingest.sources.pixels`): ``auto`` uses the window
stored in the file (``WindowCenter`` / ``WindowWidth``, first value; for a series, the first
slice's), or min-max over the image/volume when there is none; a user window (``--window``) wins.
``range`` scales the stored values by ``BitsStored``. The window is linear (``c - w/2`` -> 0,
``c + w/2`` -> 255); clipped pixels are counted (``clipped_fraction``). ``MONOCHROME1`` images are
inverted after scaling so that bright means dense, as in ``MONOCHROME2``. Colour images (RGB, YBR,
palette) are converted to RGB by pydicom and used as they are (2D only).

**Payload**: ``source_path`` (first file of the item), ``label_name``, ``n_slices``,
``series_files``, ``slice_order``, ``photometric``, the intensity fields, and those of the tags of
``tags`` (default :data:`DEFAULT_TAGS`: Modality, SeriesDescription, SliceThickness, PixelSpacing
...) that the file has (absent ones are left out). Identifying tags (:data:`IDENTIFYING_TAGS`: PatientName,
PatientID, birth date, accession number ...) are never stored unless asked for with
``allow_identifying=True``, and never printed: messages name files by their path relative to the
archive only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.ingest.sources.archive import ArchiveSource, Item, label_map, rel_posix, scan_tree
from cbmir.ingest.sources.pixels import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    DICOM_EXTENSIONS,
    IntensityRule,
    PixelError,
    as_rgb,
    extension,
    fit_to_size,
    resize_volume,
    scale_to_uint8,
)

DEFAULT_TAGS = ("Modality", "SeriesDescription", "StudyDescription", "BodyPartExamined", "SliceThickness",
                "SpacingBetweenSlices", "PixelSpacing", "Manufacturer", "ManufacturerModelName", "ImageType",
                "KVP", "ConvolutionKernel", "MagneticFieldStrength", "RepetitionTime", "EchoTime",
                "ProtocolName", "ViewPosition", "Laterality", "ImageLaterality")
IDENTIFYING_TAGS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StudyID", "IssuerOfPatientID",
    "MedicalRecordLocator", "PatientInsurancePlanCodeSequence", "DeviceSerialNumber",
    "StationName", "InstitutionalDepartmentName", "PersonName",
})
MODES = ("auto", "2d", "3d")
#: Extensions never tried as DICOM (documents, images, archives ...).
_NOT_DICOM = (".txt", ".md", ".csv", ".tsv", ".json", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg",
              ".tif", ".tiff", ".bmp", ".gif", ".zip", ".gz", ".tar", ".py", ".nii", ".npy", ".npz")


def _first(v):
    """First value of a possibly multi-valued DICOM element."""
    try:
        from pydicom.multival import MultiValue

        if isinstance(v, (MultiValue, list, tuple)):
            return v[0] if len(v) else None
    except ImportError:  # pragma: no cover
        pass
    return v


def tag_value(ds, keyword: str):
    """A JSON-safe value of tag ``keyword`` (None when absent): numbers as float/int, multi-values as
    lists, person names and everything else as strings."""
    if keyword not in ds:
        return None
    elem = ds.data_element(keyword)
    if elem.VR == "SQ":  # nested datasets may hold anything (identifying data included): never stored
        return None
    v = elem.value
    if v is None or v == "":
        return None
    from pydicom.multival import MultiValue

    if isinstance(v, (MultiValue, list, tuple)):
        return [tag_value_scalar(x) for x in v]
    return tag_value_scalar(v)


def present_tags(ds, tags) -> dict:
    """``{keyword: value}`` of the ``tags`` present in ``ds`` (absent or empty tags are left out)."""
    out = {k: tag_value(ds, k) for k in tags}
    return {k: v for k, v in out.items() if v is not None}


def tag_value_scalar(x):
    """One DICOM value -> float (DS), int (IS / US ...), None (bytes) or str (names, dates, codes)."""
    from pydicom.valuerep import DSfloat, IS

    if isinstance(x, (DSfloat, float)):
        return float(x)
    if isinstance(x, (IS, int)):
        return int(x)
    if isinstance(x, bytes):
        return None
    return str(x)


def _rescale(ds) -> tuple[float, float]:
    """``(slope, intercept)`` of the modality transform: top level, else the shared functional groups."""
    slope, inter = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and inter is None and "SharedFunctionalGroupsSequence" in ds:
        try:
            pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
            slope, inter = pvt.get("RescaleSlope"), pvt.get("RescaleIntercept")
        except (AttributeError, IndexError, KeyError):
            pass
    return float(slope if slope is not None else 1.0), float(inter if inter is not None else 0.0)


def file_window(ds) -> tuple[float, float] | None:
    """The window stored in the file, ``(center, width)`` (first value), or None (also when width <= 0)."""
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if (c is None or w is None) and "SharedFunctionalGroupsSequence" in ds:
        try:
            voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
            c, w = voi.get("WindowCenter"), voi.get("WindowWidth")
        except (AttributeError, IndexError, KeyError):
            pass
    if c is None or w is None:
        return None
    try:
        c, w = float(_first(c)), float(_first(w))
    except (TypeError, ValueError):
        return None
    return (c, w) if w > 0 else None


def slice_values(ds, *, max_pixels: int, raw: bool = False) -> np.ndarray:
    """Pixel data of a dataset after the modality transform.

    Args:
        ds: a full pydicom dataset (pixels included).
        max_pixels: refuse ``Rows x Columns x frames`` above this before decoding.
        raw: return stored values (no modality transform; for the ``range`` rule).

    Returns:
        ``(H, W)`` or ``(frames, H, W)`` (grey; float64 when a rescale applies, else the stored
        integer type), or ``(H, W, 3)`` / ``(frames, H, W, 3)`` uint8 RGB for colour data.

    Raises:
        PixelError: no pixel data, too many pixels, no decoder for the transfer syntax.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PixelError("no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > max_pixels:
        raise PixelError(f"{rows}x{cols}x{frames} = {rows * cols * frames:,} pixels exceeds the limit of "
                         f"{max_pixels:,}")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, TypeError, KeyError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise PixelError(f"cannot decode pixel data (transfer syntax {name}): {type(exc).__name__}: {exc}; "
                         "compressed files need pydicom's optional decoders (e.g. pip install pylibjpeg "
                         "pylibjpeg-libjpeg pylibjpeg-openjpeg)") from exc
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or raw:
        return arr
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(arr, ds)
    slope, inter = _rescale(ds)
    if slope == 1.0 and inter == 0.0:
        return arr
    return arr.astype(np.float64) * slope + inter


def _to_uint8(values: np.ndarray, ds, rule: IntensityRule) -> tuple[np.ndarray, dict]:
    """Grey values (after the modality transform) -> uint8 by ``rule``; MONOCHROME1 inverted."""
    bits = int(ds.get("BitsStored", 0) or 0) or None
    out, info = scale_to_uint8(values, rule, bits=bits if rule.mode == "range" else None,
                               window=file_window(ds) if rule.mode == "auto" else None)
    if rule.mode == "auto" and info["intensity"] == "window":
        info["window_from"] = "file"
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    if pi == "MONOCHROME1":
        out = np.uint8(255) - out
        info["inverted"] = "MONOCHROME1"
    return out, info


def read_dicom_image(path: str | Path, rule: IntensityRule = IntensityRule(), *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, tags=DEFAULT_TAGS) -> tuple[np.ndarray, dict]:
    """One DICOM file as a 2D image: uint8 ``(H, W, 1)`` grey or ``(H, W, 3)`` RGB, and ``info``
    (intensity fields, ``photometric``, ``n_frames`` when > 1 — the first frame is used — and ``tags``).

    Raises:
        PixelError: not DICOM, no pixel data, undecodable, too large, NaN.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), force=extension(path) in DICOM_EXTENSIONS)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise PixelError(f"not a readable DICOM file: {type(exc).__name__}") from exc
    values = slice_values(ds, max_pixels=max_pixels, raw=rule.mode == "range")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    if frames > 1:
        values = values[0]
    info: dict = {"photometric": str(ds.get("PhotometricInterpretation", ""))}
    if colour:
        out, sinfo = scale_to_uint8(values, rule)
    else:
        out, sinfo = _to_uint8(values, ds, rule)
    info.update(sinfo)
    if frames > 1:
        info.update(n_frames=frames, frame_used=0)
    info.update(present_tags(ds, tags))
    info.update(orig_height=int(out.shape[0]), orig_width=int(out.shape[1]))
    return (out[..., None] if out.ndim == 2 else out), info


@dataclass
class _Header:
    rel: str
    path: Path
    label_name: str | None
    series: str | None
    instance: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    frames: int
    rows: int
    cols: int
    tags: dict = field(default_factory=dict)


class DicomSource(ArchiveSource):
    """A folder of DICOM files: 2D images or series/multi-frame volumes (module docstring).

    Args:
        root: the archive folder (or one DICOM file).
        size: 2D image side, or volume side (volumes resized to ``size x size x size``).
        mode: ``auto`` (default), ``2d`` or ``3d``.
        window: ``(center, width)`` overriding the files' windows (same as ``rule=IntensityRule("window", ...)``).
        tags: DICOM keywords stored in the payload (default :data:`DEFAULT_TAGS`).
        allow_identifying: permit :data:`IDENTIFYING_TAGS` in ``tags``.
        name, rule, strict, max_pixels, max_voxels, fit, class_folders: see
            :class:`~cbmir.ingest.sources.folder.FolderSource`.

    Raises:
        CbmirError: unknown mode or tag keyword, identifying tags without ``allow_identifying``,
            no DICOM images found, a confusing folder layout.
    """

    kind = "dicom"

    def __init__(self, root, size: int = 28, *, name=None, rule=None, strict=False, mode: str = "auto",
                 window=None, tags=DEFAULT_TAGS, allow_identifying: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_voxels: int = DEFAULT_MAX_VOXELS,
                 fit: str = "stretch", class_folders: bool = True) -> None:
        from pydicom.datadict import keyword_dict

        if rule is None and window is not None:
            rule = IntensityRule.from_options(None, window)
        super().__init__(root, size, name=name, rule=rule, strict=strict, max_pixels=max_pixels,
                         max_voxels=max_voxels, fit=fit)
        if mode not in MODES:
            raise CbmirError(f"unknown DICOM mode {mode!r}; valid: {', '.join(MODES)}")
        tags = tuple(tags)
        unknown = [t for t in tags if t not in keyword_dict]
        if unknown:
            raise CbmirError(f"unknown DICOM keyword(s) {unknown}; use keywords such as Modality, SliceThickness")
        ident = sorted(set(tags) & IDENTIFYING_TAGS)
        if ident and not allow_identifying:
            raise CbmirError(f"tags {ident} identify patients or staff; they are not stored unless "
                             "allow_identifying=True")
        self.tags = tags
        layout = scan_tree(self.root, _maybe_dicom, class_folders=class_folders)
        self.ignored = layout.ignored
        base = self.root.parent if self.root.is_file() else self.root
        headers: dict[str, list[_Header]] = {}
        for split, files in layout.files.items():
            headers[split] = [h for rel, c in files if (h := self._header(split, base, rel, c)) is not None]
        if not any(headers.values()):
            raise CbmirError(f"{self.root}: no DICOM images found"
                             + (f" ({len(self.problems)} unreadable, {len(self.ignored)} ignored)"
                                if self.problems or self.ignored else ""))
        all_h = [h for hs in headers.values() for h in hs]
        if mode == "auto":
            by_series = defaultdict(list)
            for split, hs in headers.items():
                for h in hs:
                    if h.series is not None:
                        by_series[(split, h.label_name, h.series)].append(h)
            multi = any(h.frames > 1 for h in all_h) or any(
                len(g) > 1 and all(h.position is not None for h in g) for g in by_series.values())
            mode = "3d" if multi else "2d"
        self.mode = mode
        self.is_3d = mode == "3d"
        if self.is_3d and self.size > 256:
            raise CbmirError(f"volume side must be at most 256 voxels, got {self.size}")
        classes = label_map(h.label_name for h in all_h)
        items = {split: (self._volumes(hs, classes) if self.is_3d else self._images(hs, classes))
                 for split, hs in headers.items()}
        self._set_items(items, sorted(classes, key=classes.get))

    # ------------------------------------------------------------------ scanning
    def _header(self, split: str, base: Path, rel: str, label_name: str | None) -> _Header | None:
        import pydicom
        from pydicom.errors import InvalidDicomError

        path = base / rel
        is_dcm = extension(path) in DICOM_EXTENSIONS
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=is_dcm)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if is_dcm:
                self._problem(split, None, rel, f"not a readable DICOM file ({type(exc).__name__})")
            else:
                self.ignored.append(f"{rel} (not DICOM)")
            return None
        if is_dcm and not any(el.tag.group >= 0x0008 for el in ds):  # force=True parses garbage as group 0
            self._problem(split, None, rel, "not a readable DICOM file (no data elements)")
            return None
        if "Rows" not in ds or "Columns" not in ds:
            self.ignored.append(f"{rel} (DICOM without an image)")
            return None
        try:
            pos = tuple(float(x) for x in ds.ImagePositionPatient) if "ImagePositionPatient" in ds else None
            ori = tuple(float(x) for x in ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None
            inst = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (TypeError, ValueError) as exc:
            self._problem(split, None, rel, f"malformed geometry tags ({type(exc).__name__})")
            return None
        series = str(ds.SeriesInstanceUID) if ds.get("SeriesInstanceUID") else None
        return _Header(rel, path, label_name, series, inst, pos if pos and len(pos) == 3 else None,
                       ori if ori and len(ori) == 6 else None, frames, rows, cols,
                       present_tags(ds, self.tags))

    def _images(self, hs: list[_Header], classes: dict) -> list[Item]:
        return [Item(key=h.rel, source_path=h.rel, files=(h.path,), label=classes.get(h.label_name, -1),
                     label_name=h.label_name, payload=dict(h.tags)) for h in hs]

    def _volumes(self, hs: list[_Header], classes: dict) -> list[Item]:
        groups: dict[tuple, list[_Header]] = defaultdict(list)
        for h in hs:
            if h.series is None or h.frames > 1:
                groups[("file", h.rel)].append(h)
            else:
                groups[(h.label_name, h.series)].append(h)
        items = []
        single = 0
        for g in groups.values():
            ordered, how = _order_slices(g)
            if len(ordered) == 1 and ordered[0].frames == 1:
                single += 1
            first = min(h.rel for h in g)
            head = ordered[0]
            payload = dict(head.tags)
            payload.update(series_files=len(g), slice_order=how)
            items.append(Item(key=first, source_path=first, files=tuple(h.path for h in ordered),
                              label=classes.get(head.label_name, -1), label_name=head.label_name, payload=payload))
        if single:
            self.notes.append(f"{single} DICOM item(s) with a single slice, ingested as one-slice volumes")
        return items

    # ------------------------------------------------------------------ loading
    def load_item(self, item: Item) -> tuple[np.ndarray, dict]:
        """2D: uint8 ``(size, size, 3)``; 3D: uint8 ``(size, size, size)``; and decoding facts."""
        if not self.is_3d:
            arr, info = read_dicom_image(item.files[0], self.rule, max_pixels=self.max_pixels, tags=())
            return as_rgb(fit_to_size(arr, self.size, self.fit)), info
        import pydicom

        slices, first_ds = [], None
        total = 0
        for p in item.files:
            ds = pydicom.dcmread(str(p), force=extension(p) in DICOM_EXTENSIONS)
            if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
                raise PixelError("colour DICOM data cannot form a grey volume")
            v = slice_values(ds, max_pixels=self.max_voxels, raw=self.rule.mode == "range")
            v = v if v.ndim == 3 else v[None]
            total += v.size
            if total > self.max_voxels:
                raise PixelError(f"series exceeds the limit of {self.max_voxels:,} voxels")
            if slices and v.shape[1:] != slices[0].shape[1:]:
                raise PixelError(f"slices of different sizes in one series ({slices[0].shape[1:]} and {v.shape[1:]})")
            slices.append(v)
            first_ds = first_ds or ds
        vol = np.concatenate(slices) if len(slices) > 1 else slices[0]  # numpy's common type (float if any rescale)
        out, info = _to_uint8(vol, first_ds, self.rule)
        info.update(n_slices=int(out.shape[0]), orig_shape=[int(s) for s in out.shape],
                    photometric=str(first_ds.get("PhotometricInterpretation", "")),
                    slice_axis="series order (slice normal)")
        return resize_volume(out, self.size), info

    def accepts(self) -> str:
        return "DICOM images"

    def describe(self) -> str:
        return f"{super().describe()}; mode {self.mode}"


def _order_slices(g: list[_Header]) -> tuple[list[_Header], str]:
    """Slices of one series in order and the rule used (``position``, ``instance`` or ``path``)."""
    if len(g) == 1:
        return g, "single file"
    if all(h.position is not None and h.orientation is not None for h in g):
        o = np.asarray(g[0].orientation)
        normal = np.cross(o[:3], o[3:])
        return sorted(g, key=lambda h: (float(np.dot(normal, h.position)), h.rel)), "ImagePositionPatient"
    if all(h.instance is not None for h in g):
        return sorted(g, key=lambda h: (h.instance, h.rel)), "InstanceNumber"
    return sorted(g, key=lambda h: h.rel), "path"


def _maybe_dicom(path: Path) -> bool:
    return extension(path) not in _NOT_DICOM and path.name.upper() != "DICOMDIR"


def looks_like_dicom(path: Path) -> bool:
    """True for a ``.dcm``-like extension or the ``DICM`` magic at byte 128 (Part 10 files)."""
    if extension(path) in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


__all__ = ["DicomSource", "read_dicom_image", "slice_values", "file_window", "DEFAULT_TAGS", "IDENTIFYING_TAGS",
           "looks_like_dicom", "rel_posix"]

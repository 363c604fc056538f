"""3D volumes from NIfTI files (nibabel) and numpy ``.npy`` arrays.

Accepted inputs (``--dataset``):

* one ``.nii`` / ``.nii.gz`` file, or one ``.npy`` holding a volume ``(X, Y, Z)`` -> one ``train`` item;
* one ``.npy`` holding a stack ``(N, D, H, W)`` -> ``N`` ``train`` items (rows in stack order,
  ``source_path`` ``<file>[i]``; the MedMNIST 3D layout, depth first);
* a folder of such files in the folder layout of :mod:`cbmir.ingest.sources.archive`
  (``train/<class>/*.nii.gz`` ...).

**Slice axis (stated, settable with ``slice_axis`` / ``--slice-axis``).** The volume is cut into
2D slices along one voxel axis, which becomes the depth axis ``D`` of ``(D, H, W)`` (the other two
keep their order):

* NIfTI: the image is first reoriented to the closest canonical RAS+ orientation
  (``nibabel.as_closest_canonical``: voxel axes i, j, k point to Right, Anterior, Superior), and the
  default slice axis is **2** (k: axial slices, inferior to superior), so the same anatomy is
  sliced the same way whatever the file's stored orientation;
* ``.npy``: the array is used as stored; the default slice axis is **0** (depth first, as MedMNIST).

Values: NIfTI scaling (``scl_slope`` / ``scl_inter``) is applied by nibabel (``dataobj``); then the
intensity rule (:mod:`cbmir.ingest.sources.pixels`; ``auto``: uint8 as stored, anything else min-max over
the **whole volume**; or ``--window`` e.g. 40,400 for CT in HU). Then resized to ``size x size x size``
by :func:`cbmir.ingest.sources.pixels.resize_volume` (the ``cbmir.ingest.volumes`` recipe). 4D files (time
series) are refused unless the 4th axis has length 1.

Payload per volume: ``source_path``, ``label_name``, ``n_slices`` (slices along the slice axis in
the file, before resizing), ``slice_axis``, ``orig_shape`` (``(D, H, W)`` before resizing),
``voxel_size`` (mm, ``(D, H, W)`` order; NIfTI only), ``orientation`` (NIfTI: ``RAS`` after
reorientation), ``orig_dtype`` and the intensity fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.ingest.sources.archive import ArchiveSource, Item
from cbmir.ingest.sources.pixels import (
    DEFAULT_MAX_VOXELS,
    IntensityRule,
    PixelError,
    extension,
    load_npy,
    resize_volume,
    scale_to_uint8,
)

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
DEFAULT_SLICE_AXIS = {"nifti": 2, "npy": 0}


def _axis(slice_axis: int | None, fmt: str) -> int:
    ax = DEFAULT_SLICE_AXIS[fmt] if slice_axis is None else int(slice_axis)
    if ax not in (-3, -2, -1, 0, 1, 2):
        raise CbmirError(f"slice axis must be 0, 1 or 2 (or -3..-1); got {slice_axis}")
    return ax % 3


def _nifti_array(path: Path, max_voxels: int, canonical: bool) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ValueError, zlib errors...
        raise PixelError(f"not a readable NIfTI file: {type(exc).__name__}: {exc}") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = shape[:3]
    if len(shape) == 2:
        img = img.slicer[:, :, None] if hasattr(img, "slicer") else img
        shape = (*shape, 1)
    if len(shape) != 3:
        raise PixelError(f"NIfTI of shape {shape} is not a 3D volume (4D time series are not supported; "
                         "split them into 3D files)")
    n = int(np.prod(shape))
    if n > max_voxels:
        raise PixelError(f"volume of shape {shape} ({n:,} voxels) exceeds the limit of {max_voxels:,}")
    info: dict = {}
    try:
        if canonical:
            img = nib.as_closest_canonical(img)
            info["orientation"] = "RAS"
        else:
            info["orientation"] = "".join(nib.aff2axcodes(img.affine))
        arr = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError) as exc:
        raise PixelError(f"cannot read NIfTI data: {type(exc).__name__}: {exc}") from exc
    info["voxel_size"] = [float(z) for z in img.header.get_zooms()[:3]]
    return np.asarray(arr), info


def read_volume(path: str | Path, rule: IntensityRule = IntensityRule(), *, slice_axis: int | None = None,
                max_voxels: int = DEFAULT_MAX_VOXELS, canonical: bool = True,
                array: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """One volume file -> uint8 ``(D, H, W)`` at its own resolution, depth along ``slice_axis``.

    Args:
        path: ``.nii`` / ``.nii.gz`` (nibabel) or ``.npy`` (3D array).
        rule: intensity rule (over the whole volume).
        slice_axis: voxel axis to slice along; default 2 for NIfTI (after RAS+ reorientation: axial),
            0 for ``.npy`` (module docstring).
        max_voxels: refuse larger volumes before reading their data.
        canonical: reorient NIfTI to RAS+ first (default True).
        array: an already loaded 3D array (one volume of an ``.npy`` stack) instead of reading ``path``.

    Returns:
        ``(uint8 (D, H, W), info)`` with ``n_slices``, ``slice_axis``, ``orig_shape``, ``orig_dtype``,
        ``voxel_size`` / ``orientation`` (NIfTI) and the intensity fields.

    Raises:
        PixelError: unreadable file, not 3D, too many voxels, NaN values.
    """
    ext = extension(path)
    if array is not None or ext == ".npy":
        fmt, info = "npy", {}
        arr = array if array is not None else load_npy(path, max_elements=max_voxels)
        if arr.ndim != 3:
            raise PixelError(f".npy volume must be 3D (X, Y, Z); got shape {arr.shape}")
    elif ext in NIFTI_EXTENSIONS:
        fmt = "nifti"
        arr, info = _nifti_array(Path(path), max_voxels, canonical)
    else:
        raise PixelError(f"not a volume file (expected {', '.join(NIFTI_EXTENSIONS)} or .npy)")
    ax = _axis(slice_axis, fmt)
    vol = np.moveaxis(arr, ax, 0)
    if "voxel_size" in info:
        vs = info["voxel_size"]
        info["voxel_size"] = [vs[ax]] + [v for i, v in enumerate(vs) if i != ax]
    out, sinfo = scale_to_uint8(vol, rule)
    info.update(n_slices=int(vol.shape[0]), slice_axis=ax, orig_shape=[int(s) for s in vol.shape],
                orig_dtype=str(arr.dtype), **sinfo)
    return np.ascontiguousarray(out), info


class NiftiSource(ArchiveSource):
    """3D volumes from NIfTI / ``.npy`` files (a :class:`cbmir.ingest.base.DatasetSource`; module docstring).

    Args:
        root: a volume file, an ``.npy`` stack ``(N, D, H, W)``, or a folder archive of volume files.
        size: volume side; every volume is resized to ``size x size x size``.
        name, rule, strict, max_voxels: see :class:`~cbmir.ingest.sources.archive.ArchiveSource`.
        slice_axis: voxel axis sliced (default: 2 for NIfTI after RAS+ reorientation, 0 for ``.npy``).
        canonical: reorient NIfTI to RAS+ before slicing (default True).
        class_folders: ``False``: sub-folders are not classes.

    Raises:
        CbmirError: missing root, bad size or slice axis, no volume files, a confusing layout.
    """

    kind = "nifti"

    def __init__(self, root, size: int = 28, *, name=None, rule=None, strict=False,
                 max_voxels: int = DEFAULT_MAX_VOXELS, slice_axis: int | None = None, canonical: bool = True,
                 class_folders: bool = True) -> None:
        super().__init__(root, size, name=name, rule=rule, strict=strict, max_voxels=max_voxels)
        if self.size > 256:
            raise CbmirError(f"volume side must be at most 256 voxels, got {self.size}")
        if slice_axis is not None:
            _axis(slice_axis, "npy")  # validate early
        self.is_3d = True
        self.slice_axis = slice_axis
        self.canonical = canonical
        self._stack: np.ndarray | None = None
        if self.root.is_file() and extension(self.root) == ".npy":
            arr = load_npy_header_checked(self.root, max_voxels)
            if arr.ndim == 4:
                self._stack = arr
                items = [Item(key=f"{i:012d}", source_path=f"{self.root.name}[{i}]", files=(self.root,),
                              payload={"stack_index": i}) for i in range(arr.shape[0])]
                self._set_items({"train": items}, [])
                return
        self._set_scanned_items(_is_volume, class_folders)

    def load_item(self, item: Item) -> tuple[np.ndarray, dict]:
        """uint8 ``(size, size, size)`` and the facts of :func:`read_volume`."""
        array = None
        if self._stack is not None:
            # one volume, copied out of the memory map
            array = np.array(self._stack[item.payload["stack_index"]])
        vol, info = read_volume(item.files[0], self.rule, slice_axis=self.slice_axis,
                                max_voxels=self.max_voxels, canonical=self.canonical, array=array)
        return resize_volume(vol, self.size), info

    def accepts(self) -> str:
        return "volumes (.nii .nii.gz .npy)"

    def describe(self) -> str:
        axis = ("default (NIfTI: 2 = axial after RAS+ reorientation; .npy: 0)" if self.slice_axis is None
                else str(self.slice_axis))
        return f"{super().describe()}; slice axis {axis}"


def load_npy_header_checked(path: Path, max_voxels: int) -> np.ndarray:
    """Memory-map an ``.npy`` volume or stack ``(N, D, H, W)``; refuse other ranks and non-numeric data.

    Raises:
        CbmirError: unreadable, not 3D/4D, or a single volume above ``max_voxels``.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CbmirError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if arr.dtype.kind not in "buif" or arr.ndim not in (3, 4):
        raise CbmirError(f"{path}: expected a numeric volume (X, Y, Z) or stack (N, D, H, W); "
                         f"got {arr.dtype} {arr.shape}")
    per = int(np.prod(arr.shape[-3:]))
    if per > max_voxels:
        raise CbmirError(f"{path}: volumes of {arr.shape[-3:]} ({per:,} voxels) exceed the limit "
                         f"of {max_voxels:,}")
    return arr


def _is_volume(path: Path) -> bool:
    return extension(path) in NIFTI_EXTENSIONS + (".npy",)

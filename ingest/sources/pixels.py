"""Pixel rules for users' own archives: from whatever a file holds to the uint8 the extractors take.

Every image or volume of a user archive goes through the same small, stated steps, so an 8-bit
PNG, a 16-bit TIFF, a float NIfTI and a CT DICOM end up comparable:

1. **Decode with a pixel limit.** Images are opened with Pillow under ``Image.MAX_IMAGE_PIXELS =
   max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, 100 M pixels); a larger image (a
   decompression bomb, or simply too big) is refused *before* its pixels are decoded
   (:class:`PixelError`). Truncated or corrupt files raise :class:`PixelError` too
   (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched on). Volumes have their own limit
   (:data:`DEFAULT_MAX_VOXELS`), checked from the header.
2. **Colour model -> grey or RGB** (:func:`pil_to_array`):

   * ``1`` (bilevel) -> grey 0 / 255; ``L`` -> grey as stored;
   * ``P`` (palette) -> RGB through its palette; a palette with transparency is treated as RGBA;
   * ``LA`` (grey + alpha) -> grey **alpha-composited on black**: ``round(v * a / 255)``;
   * ``RGBA`` / ``PA`` / premultiplied ``RGBa`` / ``La`` -> RGB (or grey) alpha-composited on black;
   * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` -> RGB by Pillow's own conversion;
   * ``I;16*`` (16-bit), ``I`` (32-bit int), ``F`` (32-bit float) -> grey, then the intensity rule.

   The EXIF orientation tag, when present, is applied first (what a viewer shows). A multi-frame
   file (TIFF stack, animated GIF) gives its **first frame**; the payload records ``n_frames``.
3. **Intensity -> uint8** (:func:`scale_to_uint8`, rule :class:`IntensityRule`):

   * ``auto`` (default): uint8 as stored (unchanged); bool -> 0 / 255; every other dtype
     (16-bit, 32-bit, signed, float) **min-max per image**;
   * ``minmax``: ``round((x - min) * 255 / (max - min))`` over the whole image (all channels
     together, so colour balance is kept; a volume is scaled as a whole, not per slice); a
     constant image maps to 0. Nothing is clipped: min -> 0, max -> 255.
   * ``window`` (``center``, ``width``): ``round((x - (c - w/2)) * 255 / w)``, values outside
     ``[c - w/2, c + w/2]`` clipped to 0 / 255. This is the one rule that clips, and it says so:
     the fraction of clipped pixels is returned (payload ``clipped_fraction``) and summed in the
     run summary.
   * ``range``: integer images scaled by their type's full range, ``(x - lo) * 255 / (hi - lo)``
     with ``lo, hi`` the dtype's (or, for DICOM, ``BitsStored``'s) limits; uint16 ``v * 257`` gives
     back ``v`` exactly. Refused for float images (no inherent range).

   NaN or infinite values are refused (:class:`PixelError`), never mapped silently.
4. **Size.** 2D images are resized to ``size x size`` (:func:`fit_to_size`: ``stretch`` by
   default, aspect ratio not kept; ``pad`` letterboxes on black; ``crop`` takes the centred
   square), bicubic with antialiasing (``cbmir.ingest.transforms.resize_batch``, equal to Pillow's
   BICUBIC), so an image already at ``size`` is passed through untouched. Grey images are
   replicated to RGB (:func:`as_rgb`) so that every batch of an archive has one shape.
   Volumes ``(D, H, W)`` of any shape are resized to ``size x size x size`` **here, by the source**
   (:func:`resize_volume`, the recipe of ``cbmir.ingest.volumes``: cubic spline along depth, then bicubic
   per slice, DESIGN.md §1), so a batch stacks; the volume embedder then treats them exactly like
   MedMNIST volumes of side ``size`` (including its own ``size -> t`` step for CNNs at 28).

Libraries: Pillow (decoding, colour conversion), numpy, scipy.ndimage (depth zoom), torch via
``cbmir.ingest.transforms.resize_batch`` (bicubic resize).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbmir.core.errors import CbmirError
#: Default decode limit for one 2D image, in pixels (width x height x frames); Pillow's own default
#: is 89,478,485 (about 0.25 GB at 24 bit).
DEFAULT_MAX_PIXELS = 100_000_000
#: Default limit for one volume, in voxels (a 512 x 512 x 2048 CT is 537 M voxels; 2 GiB as float32).
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
INTENSITY_MODES = ("auto", "minmax", "window", "range")
FITS = ("stretch", "pad", "crop")
#: File extensions read as 2D images by Pillow.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".jp2", ".j2k")
#: File extensions read as volumes (NIfTI via nibabel, numpy ``.npy``).
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".npy")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")


class PixelError(CbmirError):
    """One file could not be turned into pixels (unreadable, corrupt, too large, NaN, unsupported).

    Sources catch it per file: the file is listed in the run summary and skipped, or the run
    fails with it under ``--strict``.
    """


def extension(path: str | Path) -> str:
    """Lower-case extension of ``path``, with ``.nii.gz`` kept whole (``"scan.NII.GZ"`` -> ``.nii.gz``)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


# ----------------------------------------------------------------------------- intensity rules
@dataclass(frozen=True)
class IntensityRule:
    """How raw pixel values become uint8 (see the module docstring).

    Attributes:
        mode: ``auto``, ``minmax``, ``window`` or ``range``.
        window: ``(center, width)`` in the image's own units (Hounsfield units for CT after the
            DICOM rescale); required for ``window``. With ``auto`` it is ignored.

    Raises:
        CbmirError: unknown mode, ``window`` mode without a window, or a width <= 0.
    """

    mode: str = "auto"
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise CbmirError(f"unknown intensity rule {self.mode!r}; valid: {', '.join(INTENSITY_MODES)}")
        if self.window is not None:
            c, w = (float(v) for v in self.window)
            if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
                raise CbmirError(f"window must be finite CENTER,WIDTH with WIDTH > 0; got {self.window}")
            object.__setattr__(self, "window", (c, w))
        if self.mode == "window" and self.window is None:
            raise CbmirError("intensity rule 'window' needs a window: --window CENTER,WIDTH (e.g. 40,400 for CT)")

    @classmethod
    def from_options(cls, intensity: str | None = None, window=None) -> "IntensityRule":
        """Rule from CLI-style options: ``window`` (``"C,W"`` or a pair) alone implies ``window`` mode."""
        win = parse_window(window) if window is not None else None
        mode = (intensity or ("window" if win is not None else "auto")).lower()
        return cls(mode, win)

    def describe(self) -> str:
        if self.mode == "window":
            return f"window center={self.window[0]:g} width={self.window[1]:g}"
        return {"auto": "auto (uint8 as stored, other types min-max per image or volume)",
                "minmax": "min-max per image", "range": "full range of the pixel type"}[self.mode]


def parse_window(window) -> tuple[float, float]:
    """``"40,400"``, ``"40:400"`` or ``(40, 400)`` -> ``(center, width)`` floats.

    Raises:
        CbmirError: not two numbers, or width <= 0.
    """
    if isinstance(window, str):
        parts = window.replace(":", ",").split(",")
    else:
        parts = list(window)
    try:
        c, w = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise CbmirError(f"window must be CENTER,WIDTH (two numbers, e.g. 40,400); got {window!r}") from None
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
        raise CbmirError(f"window must be finite CENTER,WIDTH with WIDTH > 0; got {window!r}")
    return c, w


def _dtype_range(dtype: np.dtype, bits: int | None = None) -> tuple[float, float]:
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return 0.0, 1.0
    if dtype.kind not in "ui":
        raise PixelError(f"intensity rule 'range' needs an integer image, got {dtype}; use minmax or a window")
    if bits is not None:
        if dtype.kind == "u":
            return 0.0, float(2 ** bits - 1)
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def scale_to_uint8(arr: np.ndarray, rule: IntensityRule = IntensityRule(), *, bits: int | None = None,
                   window: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """Scale an image or volume of any numeric dtype to uint8 by ``rule`` (module docstring, step 3).

    Args:
        arr: numeric array of any shape (``(H, W)``, ``(H, W, C)``, ``(D, H, W)``); scaled as a whole.
        rule: the intensity rule.
        bits: significant bits for ``range`` (DICOM ``BitsStored``); default: the dtype's size.
        window: a window ``(center, width)`` to use when ``rule`` is ``auto`` (e.g. the one stored
            in a DICOM file); ignored by ``minmax`` / ``range``; an explicit ``rule.window`` wins.

    Returns:
        ``(uint8 array of the same shape, info)``; ``info`` holds ``intensity`` (the rule applied:
        ``unchanged``, ``minmax``, ``window``, ``range``), ``intensity_low`` / ``intensity_high``
        (the input values mapped to 0 and 255) and, for ``window``, ``clipped_fraction`` (fraction
        of values outside the window, clipped to 0 or 255).

    Raises:
        PixelError: NaN / infinite values, a non-numeric dtype, or ``range`` on a float image.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind not in "buif":
        raise PixelError(f"pixel data of dtype {arr.dtype} is not numeric")
    if arr.size == 0:
        raise PixelError(f"empty pixel array of shape {arr.shape}")
    if arr.dtype.kind == "f":
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise PixelError(f"{bad} NaN/infinite pixel values; refusing to guess a value for them")
    mode = rule.mode
    win = rule.window if rule.window is not None else (window if mode in ("auto", "window") else None)
    if mode == "auto":
        if arr.dtype == np.uint8:
            return arr, {"intensity": "unchanged", "intensity_low": 0.0, "intensity_high": 255.0}
        if arr.dtype.kind == "b":
            return arr.astype(np.uint8) * np.uint8(255), {"intensity": "bool", "intensity_low": 0.0,
                                                          "intensity_high": 1.0}
        mode = "window" if win is not None else "minmax"
    if mode == "window":
        c, w = win
        lo, hi = c - w / 2.0, c + w / 2.0
        x = arr.astype(np.float64)
        clipped = int(np.count_nonzero((x < lo) | (x > hi)))
        y = np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        return y, {"intensity": "window", "intensity_low": lo, "intensity_high": hi,
                   "clipped_fraction": clipped / x.size}
    if mode == "range":
        lo, hi = _dtype_range(arr.dtype, bits)
    else:  # minmax
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8), {"intensity": mode, "intensity_low": lo, "intensity_high": hi}
    x = arr.astype(np.float64)
    # Values outside [lo, hi] only occur for 'range' with bits smaller than the data: clip and count.
    y = np.rint((x - lo) * (255.0 / (hi - lo)))
    info = {"intensity": mode, "intensity_low": lo, "intensity_high": hi}
    if mode == "range":
        out = int(np.count_nonzero((y < 0) | (y > 255)))
        if out:
            info["clipped_fraction"] = out / y.size
    return np.clip(y, 0, 255).astype(np.uint8), info


# ----------------------------------------------------------------------------- decoding
@contextlib.contextmanager
def pixel_limit(max_pixels: int = DEFAULT_MAX_PIXELS):
    """Within the block, Pillow refuses images above ``max_pixels`` (``Image.MAX_IMAGE_PIXELS``) and
    its ``DecompressionBombWarning`` is an error; the previous limit is restored afterwards."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``round(colour * alpha / 255)`` channel-wise (uint8 in, uint8 out): alpha-composited on black."""
    a = alpha.astype(np.float32)[..., None] / np.float32(255.0)
    return np.rint(colour.astype(np.float32) * a).astype(np.uint8)


def pil_to_array(im, rule: IntensityRule = IntensityRule()) -> tuple[np.ndarray, dict]:
    """A decoded Pillow image -> uint8 ``(H, W, 1)`` grey or ``(H, W, 3)`` RGB (module docstring, step 2).

    Returns:
        ``(array, info)``; ``info`` has ``mode`` (Pillow mode of the file), ``orig_dtype`` and the
        intensity fields of :func:`scale_to_uint8`.

    Raises:
        PixelError: an unsupported mode, or an intensity problem (NaN).
    """
    mode = im.mode
    info: dict = {"mode": mode}
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    mode2 = im.mode
    if mode2 in ("RGBA", "LA"):
        a = np.asarray(im)
        out = _composite_on_black(a[..., :-1], a[..., -1])
        info.update(orig_dtype="uint8", alpha="composited on black")
        out, sinfo = scale_to_uint8(out, rule)
        info.update(sinfo)
        return out if out.ndim == 3 else out[..., None], info
    if mode2 in ("L", "RGB") or mode2.startswith("I") or mode2 == "F":
        a = np.asarray(im)
        if a.dtype.byteorder not in ("=", "|"):
            a = a.astype(a.dtype.newbyteorder("="))
        info["orig_dtype"] = str(a.dtype)
        out, sinfo = scale_to_uint8(a, rule)
        info.update(sinfo)
        return (out[..., None] if out.ndim == 2 else out), info
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise PixelError(f"unsupported image mode {mode!r} ({exc})") from exc
    return np.asarray(rgb), {**info, "orig_dtype": "uint8", "intensity": "unchanged"}


def load_pil_image(path: str | Path, rule: IntensityRule = IntensityRule(), *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Decode an image file with Pillow under a pixel limit and apply the pixel rules.

    Args:
        path: PNG, JPEG, TIFF, BMP, GIF, WebP, PNM, JPEG 2000 ... (anything Pillow opens).
        rule: intensity rule; ``max_pixels``: decode limit (width x height).

    Returns:
        uint8 ``(H, W, 1)`` or ``(H, W, 3)`` and ``info`` (``mode``, ``orig_height``, ``orig_width``,
        ``n_frames`` when > 1, intensity fields).

    Raises:
        PixelError: unreadable, truncated or corrupt file, above the pixel limit, unsupported mode, NaN.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with pixel_limit(max_pixels), Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise PixelError(f"image of {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            im.seek(0)
            im.load()
            im2 = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
            arr, info = pil_to_array(im2, rule)
    except PixelError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PixelError(f"refused as a possible decompression bomb (limit {max_pixels:,} pixels): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise PixelError("not an image Pillow can identify (corrupt or unsupported format)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError,
            NotImplementedError) as exc:
        raise PixelError(f"cannot decode: {type(exc).__name__}: {exc}") from exc
    info.update(orig_height=int(arr.shape[0]), orig_width=int(arr.shape[1]))
    if n_frames > 1:
        info["n_frames"] = n_frames
        info["frame_used"] = 0
    return arr, info


def load_npy(path: str | Path, *, max_elements: int) -> np.ndarray:
    """A ``.npy`` array (``allow_pickle=False``, memory-mapped), refusing more than ``max_elements``
    values before reading them.

    Raises:
        PixelError: unreadable / pickled / non-numeric file, or too large.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise PixelError(f"cannot read .npy: {type(exc).__name__}: {exc}") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "buif":
        raise PixelError(f".npy holds {getattr(arr, 'dtype', type(arr))}, not a numeric array")
    if arr.size > max_elements:
        raise PixelError(f"array of shape {arr.shape} ({arr.size:,} values) exceeds the limit of {max_elements:,}")
    return np.array(arr)  # a writable in-memory copy (the memory map is released)


def load_image(path: str | Path, rule: IntensityRule = IntensityRule(), *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Any single 2D image file -> uint8 ``(H, W, C)`` (C = 1 or 3) and ``info``.

    Dispatch on the extension: DICOM (``.dcm`` ...: modality rescale, file window,
    :func:`cbmir.ingest.sources.dicom.read_dicom_image`), ``.npy`` (2D ``(H, W)`` or ``(H, W, 1|3)``),
    anything else through Pillow (:func:`load_pil_image`).

    Raises:
        PixelError: as the format's reader.
    """
    ext = extension(path)
    if ext in DICOM_EXTENSIONS:
        from cbmir.ingest.sources.dicom import read_dicom_image

        return read_dicom_image(path, rule, max_pixels=max_pixels)
    if ext == ".npy":
        arr = load_npy(path, max_elements=max_pixels * 3)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3):
            pass
        elif arr.ndim == 2:
            arr = arr[..., None]
        else:
            raise PixelError(f".npy image must be (H, W) or (H, W, 1|3); got shape {arr.shape}")
        out, info = scale_to_uint8(arr, rule)
        info.update(orig_dtype=str(arr.dtype), orig_height=int(arr.shape[0]), orig_width=int(arr.shape[1]))
        return out, info
    return load_pil_image(path, rule, max_pixels=max_pixels)


# ----------------------------------------------------------------------------- geometry
def as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 1)`` -> ``(H, W, 3)`` by replication (DESIGN.md §1); RGB passes through."""
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 3:
        return img
    if img.shape[-1] != 1:
        raise PixelError(f"expected 1 or 3 channels, got shape {img.shape}")
    return np.repeat(img, 3, axis=-1)


def fit_to_size(img: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """Resize a uint8 ``(H, W, C)`` image to ``(size, size, C)``.

    Args:
        fit: ``stretch`` (default; both sides to ``size``, aspect ratio not kept), ``pad`` (longer
            side to ``size``, centred on black), ``crop`` (centred square of the shorter side, then
            resized).

    Bicubic with antialiasing (``cbmir.ingest.transforms.resize_batch``, equal to Pillow's BICUBIC; the
    result is rounded and clipped to 0..255 as Pillow does). An image already ``size x size`` is
    returned unchanged.
    """
    from cbmir.ingest.transforms import resize_batch

    if fit not in FITS:
        raise CbmirError(f"unknown fit {fit!r}; valid: {', '.join(FITS)}")
    h, w = img.shape[:2]
    if (h, w) != (size, size) and not img.flags.writeable:
        img = img.copy()  # torch.from_numpy warns on read-only arrays (Pillow / memory-mapped data)
    if (h, w) == (size, size):
        return img
    if fit == "crop" and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    if fit == "pad" and h != w:
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        small = resize_batch(np.ascontiguousarray(img)[None], (nh, nw))[0]
        out = np.zeros((size, size, img.shape[2]), dtype=np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top:top + nh, left:left + nw] = small
        return out
    return resize_batch(np.ascontiguousarray(img)[None], size)[0]


def resize_volume(vol: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 volume ``(D, H, W)`` to ``(size, size, size)`` with the study's volume recipe.

    :func:`cbmir.ingest.volumes.preprocess_volumes`: cubic spline zoom along depth only
    (``scipy.ndimage.zoom``, order 3), then each depth slice resized to ``size x size`` (bicubic,
    antialiased, Pillow-equivalent); interpolation overshoot rounded and clipped to 0..255 as
    ``zoom`` / Pillow do for uint8. A volume already ``size x size x size`` is returned unchanged, and
    the volume embedder then treats it exactly like a MedMNIST volume of side ``size``. A single
    slice (``D == 1``) is repeated ``size`` times.

    Raises:
        PixelError: not a 3D array.
    """
    from cbmir.ingest.volumes import preprocess_volumes

    if vol.ndim != 3:
        raise PixelError(f"a volume must be (D, H, W); got shape {vol.shape}")
    if vol.shape == (size, size, size):
        return vol
    if vol.shape[0] == 1:
        vol = np.repeat(vol, size, axis=0)
    if not vol.flags.writeable:
        vol = vol.copy()
    return np.ascontiguousarray(preprocess_volumes(np.ascontiguousarray(vol)[None], int(size))[0])

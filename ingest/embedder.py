"""From dataset items to one embedding per point.

2D images go through the extractor directly (grayscale replicated to RGB first). 3D volumes
are handled by :mod:`cbmir.ingest.volumes` (slice-wise features, DESIGN.md §1). :func:`make_embedder`
picks the right one for a dataset, so the ingest job never branches on model or modality.

Embedders take exactly what dataset sources yield — uint8, ``(B, size, size, 1|3)`` for 2D,
``(B, D, size, size)`` for 3D — and refuse anything else with a :class:`~cbmir.core.errors.CbmirError`
naming the shape and dtype received. Arrays from elsewhere (a query image in memory: 16-bit,
float, RGBA, odd-sized, one image instead of a batch) go through :func:`prepare_images` first,
which applies the pixel rules of :mod:`cbmir.ingest.sources.pixels` (the rules user archives use).
"""

from __future__ import annotations

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Extractor
from cbmir.ingest.transforms import to_rgb


class ImageEmbedder:
    """Embeds a batch of 2D images ``(B, H, W, C)`` uint8 (C = 1 or 3) -> float32 ``(B, dim)``."""

    def __init__(self, extractor: Extractor, size: int) -> None:
        self.extractor = extractor
        self.size = size
        dim_for = getattr(extractor, "dim_for", None)
        self.dim = int(dim_for(size)) if dim_for else int(extractor.spec.dim)
        self.aggregation = "none"
        self.is_3d = False

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(B, size, size, C)``, C = 1 or 3 -> float32 ``(B, dim)``.

        Raises:
            CbmirError: another rank (e.g. a 3D volume batch), dtype, channel count or side;
                :func:`prepare_images` converts such arrays by the documented rules.
        """
        images = np.asarray(images)
        hint = " (convert with cbmir.ingest.embedder.prepare_images, which applies the pixel rules)"
        if images.ndim != 4:
            raise CbmirError(f"2D images must have shape (B, H, W, C); got {images.shape} "
                             f"(a 3D volume given to a 2D collection?){hint}")
        if images.dtype != np.uint8:
            raise CbmirError(f"2D images must be uint8; got {images.dtype}{hint}")
        if images.shape[-1] not in (1, 3):
            raise CbmirError(f"2D images must have 1 (grey) or 3 (RGB) channels; got shape {images.shape}{hint}")
        if tuple(images.shape[1:3]) != (self.size, self.size):
            raise CbmirError(f"this embedder is for {self.size}x{self.size} images; got "
                             f"{images.shape[1]}x{images.shape[2]}{hint}")
        return self.extractor.extract(to_rgb(images))

    def identity(self) -> dict:
        ident = dict(self.extractor.identity())
        ident["dim"] = self.dim
        return ident

    @property
    def items_per_image(self) -> int:
        return 1


def make_embedder(extractor: Extractor, *, size: int, is_3d: bool, aggregation: str = "concat"):
    """The embedder for a dataset: :class:`ImageEmbedder` for 2D, a volume embedder for 3D.

    Raises:
        CbmirError: 3D requested and volume support is unavailable, or an unknown aggregation.
    """
    if not is_3d:
        return ImageEmbedder(extractor, size)
    from cbmir.ingest.volumes import VolumeEmbedder  # noqa: PLC0415 (3D support is its own module)

    return VolumeEmbedder(extractor, size=size, aggregation=aggregation)


def _alpha_to_unit(alpha: np.ndarray) -> np.ndarray:
    """An alpha channel -> float64 in [0, 1]: uint8 / 255, other integers / their type's maximum,
    bool as 0 / 1, floats as given (must lie in [0, 1])."""
    from cbmir.ingest.sources.pixels import PixelError

    if alpha.dtype.kind == "b":
        return alpha.astype(np.float64)
    if alpha.dtype.kind in "ui":
        return np.clip(alpha.astype(np.float64) / float(np.iinfo(alpha.dtype).max), 0.0, 1.0)
    a = alpha.astype(np.float64)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise PixelError("a float alpha channel must hold values in [0, 1]")
    return a


def _image_to_uint8(img: np.ndarray, size: int, fit: str) -> np.ndarray:
    """One 2D image ``(H, W, C)``, C in 1..4, any numeric dtype -> uint8 ``(size, size, 3)``."""
    from cbmir.ingest.sources.pixels import IntensityRule, as_rgb, fit_to_size, scale_to_uint8

    c = img.shape[-1]
    colour, alpha = (img[..., :-1], img[..., -1]) if c in (2, 4) else (img, None)
    out, _ = scale_to_uint8(colour, IntensityRule("auto"))  # uint8 kept; bool 0/255; else min-max
    if alpha is not None:  # composited on black, as Pillow-decoded RGBA / LA files
        out = np.rint(out.astype(np.float64) * _alpha_to_unit(alpha)[..., None]).astype(np.uint8)
    return as_rgb(fit_to_size(np.ascontiguousarray(out), int(size), fit))


def prepare_images(images, *, size: int, is_3d: bool, fit: str = "stretch") -> np.ndarray:
    """Turn in-memory query images into what the embedder of a collection takes.

    Rules (the same as for user archives, :mod:`cbmir.ingest.sources.pixels`):

    * **Layout.** 2D collection: ``(H, W)`` grey, ``(H, W, C)`` one image or ``(B, H, W, C)`` a
      batch, with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA). 3D collection: ``(D, H, W)``
      one volume or ``(B, D, H, W)`` a batch. A 2D image given to a 3D collection — ``(H, W)``,
      ``(H, W, 1|3|4)`` or ``(B, H, W, 1|3|4)`` — and a volume given to a 2D collection — a 3D array
      whose last axis is not 1..4, or ``(B, D, H, W)`` — are refused.
    * **Intensity** (per image / per volume, ``IntensityRule("auto")``): uint8 as is; bool -> 0 / 255;
      every other dtype (uint16, int, float) min-max to 0..255 (a constant image -> 0); NaN / inf
      refused.
    * **Alpha** (C = 2 or 4): composited on black, ``round(v * a)`` with ``a`` in [0, 1] (uint8
      alpha / 255, other integers / their type's maximum, floats must be in [0, 1]).
    * **Size.** 2D: resized to ``size x size`` (``fit``: ``stretch`` — aspect not kept — ``pad`` or
      ``crop``; bicubic, antialiased), grey replicated to RGB. 3D: resized to ``size x size x size``
      (cubic spline along depth, bicubic per slice; :func:`cbmir.ingest.sources.pixels.resize_volume`).

    Args:
        images: numpy array (or array-like) as above.
        size: the collection's image or volume side (``CollectionMeta.size``).
        is_3d: the collection holds volumes (``CollectionMeta.is_3d``).
        fit: 2D resize rule.

    Returns:
        uint8 ``(B, size, size, 3)`` for 2D, uint8 ``(B, size, size, size)`` for 3D.

    Raises:
        CbmirError: refused layout (naming the shape and what was expected), empty or non-numeric
            array, NaN / inf pixels (:class:`cbmir.ingest.sources.pixels.PixelError`).
    """
    from cbmir.ingest.sources.pixels import IntensityRule, resize_volume, scale_to_uint8

    x = np.asarray(images)
    if x.dtype.kind not in "buif":
        raise CbmirError(f"images must be a numeric array; got dtype {x.dtype}")
    if x.size == 0:
        raise CbmirError(f"empty image array of shape {x.shape}")
    if not is_3d:
        if x.ndim == 2:
            x = x[None, :, :, None]
        elif x.ndim == 3 and x.shape[-1] <= 4:
            x = x[None]
        elif x.ndim == 3:
            raise CbmirError(f"an array of shape {x.shape} was given to a 2D collection: it looks like a 3D "
                             "volume (D, H, W). Pass one image as (H, W) or (H, W, C) with C in 1..4, or a "
                             "batch as (B, H, W, C)")
        elif x.ndim != 4 or x.shape[-1] > 4:
            raise CbmirError(f"an array of shape {x.shape} was given to a 2D collection: expected (H, W), "
                             "(H, W, C) or (B, H, W, C) with C in 1..4 (a batch of 3D volumes?)")
        if min(x.shape[1:3]) < 1:
            raise CbmirError(f"images of shape {x.shape} have no pixels")
        return np.stack([_image_to_uint8(img, size, fit) for img in x])
    looks_2d = (x.ndim == 2 or (x.ndim in (3, 4) and x.shape[-1] in (1, 3, 4)
                                and x.shape[-2] > 4 and x.shape[-3] > 4))
    if looks_2d:
        raise CbmirError(f"an array of shape {x.shape} was given to a 3D collection: it looks like a 2D image "
                         "(H, W[, C]) or a batch of them. Pass one volume as (D, H, W) or a batch as "
                         "(B, D, H, W)")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise CbmirError(f"an array of shape {x.shape} was given to a 3D collection: expected (D, H, W) or "
                         "(B, D, H, W)")
    if min(x.shape[1:]) < 2:
        raise CbmirError(f"volumes need at least 2 voxels per side; got {x.shape}")
    return np.stack([resize_volume(scale_to_uint8(v, IntensityRule("auto"))[0], int(size)) for v in x])

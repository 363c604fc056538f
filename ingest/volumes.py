"""3D volumes: slice-wise 2D features, as the study computed them (DESIGN.md §1; Mahbod et al. 2025).

A MedMNIST 3D item is a uint8 volume ``(D, H, W)`` of side ``s`` (28 or 64), depth first. The
study turns it into one vector with any 2D extractor:

1. :func:`zoom_depth` - cubic spline zoom along depth only to ``t`` slices
   (``scipy.ndimage.zoom(volume, (t / D, 1, 1), order=3)``; identity when ``D == t``);
2. :func:`resize_slices` - every depth slice resized to ``t x t`` (bicubic, a = -0.5 as PIL,
   :func:`cbmir.ingest.transforms.resize_batch`; identity when already ``t x t``);
3. :func:`volumes_to_slices` - the ``B x t`` slices flattened, in slice order, to a channels-last
   batch, grayscale replicated to 3 channels (:func:`cbmir.ingest.transforms.to_rgb`);
4. the extractor's own 2D preprocessing and model (inside ``extractor.extract``), called on
   large batches of slices of several volumes (:func:`extract_slices`), never one slice per call;
   slice vectors stay raw (:func:`raw_slice_extractor`), as the study concatenated them;
5. :func:`aggregate` - the ``t`` slice vectors of a volume concatenated in slice order (``concat``,
   the study's method: ``t * dim`` values, up to 64 x 2,048 = 131,072) or pooled (``mean`` /
   ``max``: ``dim`` values; not in the study).

``t`` (:func:`slice_side`) is 32 when the extractor upsamples 28 px inputs to 32 px (the ImageNet
CNNs: "28 -> 32", the smallest input they accept), else ``s`` (HOG, foundation models whose own
preprocessing resizes to 224 px). Every step is uint8 in, uint8 out, rounded and clipped to 0..255
once per step (the zoom exactly as ``scipy.ndimage.zoom`` returns for a uint8 volume; the resize as
PIL's float bicubic rounded - PIL's 8-bit path, which rounds between its two passes, is at most 1
grey level away), so each step can be tested alone.

Vectors above Qdrant's 65,535-dim limit are stored as several named chunks by the store
(:func:`cbmir.search.schema.chunk_layout`); search stays exact (see :mod:`cbmir.search.store`).
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Extractor
AGGREGATIONS = ("concat", "mean", "max")
#: Smallest input side of the ImageNet CNNs; 28 px inputs are upsampled to it (DESIGN.md §1).
CNN_MIN_SIDE = 32
#: Slices per ``extractor.extract`` call (several volumes at once; the extractor splits further
#: into its own forward-pass batches).
DEFAULT_SLICE_BATCH = 1024


def slice_side(extractor: Extractor, size: int) -> int:
    """Side ``t`` of the resized volume ``t^3`` for an extractor and volume side ``size``.

    Rule (DESIGN.md §1): ``t = 32`` whenever the extractor's input policy upsamples 28 px inputs to
    32 px (ImageNet CNNs at 28), else ``t = size`` (HOG works on slices at their own size; foundation
    models resize to 224 px in their own preprocessing).

    The extractor may state its rule itself: a method ``input_side(size) -> int`` or an attribute
    ``min_side`` (int) take precedence; otherwise the ``imagenet-cnn`` family means ``min_side = 32``.

    Args:
        extractor: a 2D :class:`~cbmir.ingest.base.Extractor`.
        size: volume side ``s`` in voxels (28 or 64 for MedMNIST 3D).

    Returns:
        ``t`` (int, >= 1).
    """
    fn = getattr(extractor, "input_side", None)
    if callable(fn):
        return int(fn(int(size)))
    min_side = getattr(extractor, "min_side", None)
    if min_side is None:
        spec = getattr(extractor, "spec", None)
        min_side = CNN_MIN_SIDE if getattr(spec, "family", "") == "imagenet-cnn" else 1
    return max(int(size), int(min_side))


def raw_slice_extractor(extractor: Extractor) -> Extractor:
    """The extractor as used for slices: its per-image L2 normalisation switched off, when it has one.

    The study concatenates the raw slice vectors (DESIGN.md §1), so a slice's weight in the cosine of
    the concatenated vector follows its own feature magnitude; normalising every slice vector first
    would give each slice equal weight and change the ranking (for HOG on AdrenalMNIST3D 28³:
    mAP@5 77.14 % instead of DESIGN.md §3's 78.56 %). Extractors that L2-normalise their output
    declare it with a boolean attribute ``l2_normalize``; for those a shallow copy with
    ``l2_normalize = False`` is returned (the caller's extractor is not modified). Other extractors
    are returned unchanged.
    """
    if getattr(extractor, "l2_normalize", None) is True:
        raw = copy.copy(extractor)
        raw.l2_normalize = False
        return raw
    return extractor


def check_volumes(volumes: np.ndarray, size: int | None = None) -> np.ndarray:
    """Validate a batch of volumes and return it as a uint8 numpy array ``(B, D, H, W)``.

    Args:
        volumes: uint8 ``(B, D, H, W)``, depth first (MedMNIST 3D layout).
        size: when given, ``H`` and ``W`` must equal it (the collection's volume side).

    Raises:
        CbmirError: wrong rank, a 2D image batch ``(B, H, W, 1|3)`` given to a 3D embedder, a side
            other than ``size``, or a dtype other than uint8.
    """
    v = np.asarray(volumes)
    if v.ndim == 3 and size is not None and v.shape == (size, size, size):
        raise CbmirError(f"a single volume of shape {v.shape} was given; 3D embedders take a batch "
                         f"(B, D, H, W) - add a leading axis (volume[None])")
    if v.ndim != 4:
        raise CbmirError(f"3D volumes must have shape (B, D, H, W); got {v.shape}")
    looks_2d = v.shape[-1] in (1, 3) and v.shape[1] == v.shape[2] != v.shape[3]
    if looks_2d or (size is not None and tuple(v.shape[2:]) != (size, size)):
        hint = " - this looks like a batch of 2D images (B, H, W, C); use a 2D dataset/collection" \
            if looks_2d else ""
        raise CbmirError(f"a 3D (volume) embedder for side {size} got an array of shape {v.shape}{hint}; "
                         f"expected uint8 volumes (B, D, {size}, {size})")
    if v.dtype != np.uint8:
        raise CbmirError(f"3D volumes must be uint8 (MedMNIST); got {v.dtype}")
    if min(v.shape[1:]) < 2:
        raise CbmirError(f"volumes need at least 2 voxels per side; got {v.shape}")
    return v


@functools.lru_cache(maxsize=32)
def depth_zoom_matrix(d: int, t: int) -> np.ndarray:
    """The linear map of a 1-D cubic spline zoom from ``d`` to ``t`` samples: float64 ``(t, d)``.

    Column ``i`` is ``scipy.ndimage.zoom(e_i, t / d, order=3)`` of the unit vector ``e_i`` (default
    ``mode='constant'``, ``grid_mode=False``); spline prefilter and interpolation are linear, so
    ``M @ x`` is the zoom of any length-``d`` signal ``x``. Read-only (cached).
    """
    from scipy import ndimage

    m = np.empty((int(t), int(d)), dtype=np.float64)
    for i in range(int(d)):
        e = np.zeros(int(d), dtype=np.float64)
        e[i] = 1.0
        m[:, i] = ndimage.zoom(e, t / d, order=3)
    m.setflags(write=False)
    return m


def zoom_depth(volumes: np.ndarray, t: int) -> np.ndarray:
    """Cubic spline zoom along the depth axis only: uint8 ``(B, D, H, W)`` -> uint8 ``(B, t, H, W)``.

    The study's ``scipy.ndimage.zoom(volume, (t / D, 1, 1), order=3)`` (default ``mode='constant'``,
    ``grid_mode=False``: first and last slices map onto themselves), rounded/clipped to 0..255 as
    ``zoom`` does for a uint8 input. Computed as one float64 matrix product with the 1-D depth operator
    (:func:`depth_zoom_matrix`) - the same linear map: scipy's 3-D zoom also prefilters H and W and
    interpolates them at their integer nodes, an identity up to ~1e-13 - about 10x faster than scipy
    per volume (2.5 ms vs 25 ms at 28 -> 32). After rounding it equals scipy's output voxel for voxel
    on all 3,492 real AdrenalMNIST3D / VesselMNIST3D 28^3 volumes (no float64 value there lies within
    1.6e-5 of a rounding boundary); ``tests/test_volumes.py`` compares it with scipy directly.
    Returns the input unchanged when ``D == t``.
    """
    volumes = np.asarray(volumes)
    b, d, h, w = volumes.shape
    if d == t:
        return volumes
    z = np.matmul(depth_zoom_matrix(d, t), volumes.reshape(b, d, h * w).astype(np.float64))
    return np.clip(np.rint(z), 0, 255).astype(np.uint8).reshape(b, t, h, w)


def resize_slices(volumes: np.ndarray, t: int) -> np.ndarray:
    """Every depth slice resized to ``t x t`` (bicubic): uint8 ``(B, D, H, W)`` -> uint8 ``(B, D, t, t)``.

    Uses :func:`cbmir.ingest.transforms.resize_batch` (PIL-equivalent bicubic, a = -0.5, antialiased when
    downscaling; result rounded and clipped like PIL on uint8) on all ``B x D`` slices at once.
    Returns the input unchanged when ``H == W == t``.
    """
    from cbmir.ingest.transforms import resize_batch

    volumes = np.asarray(volumes)
    b, d, h, w = volumes.shape
    if (h, w) == (t, t):
        return volumes
    flat = np.ascontiguousarray(volumes.reshape(b * d, h, w, 1))
    return resize_batch(flat, t, "bicubic").reshape(b, d, t, t)


def preprocess_volumes(volumes: np.ndarray, t: int) -> np.ndarray:
    """The study's volume preprocessing: :func:`zoom_depth` then :func:`resize_slices`.

    Args:
        volumes: uint8 ``(B, D, H, W)``.
        t: target side (see :func:`slice_side`).

    Returns:
        uint8 ``(B, t, t, t)``.
    """
    return resize_slices(zoom_depth(volumes, t), t)


def volumes_to_slices(volumes: np.ndarray) -> np.ndarray:
    """Flatten volumes to a batch of RGB slices in (volume, slice) order.

    uint8 ``(B, D, H, W)`` -> uint8 ``(B * D, H, W, 3)``; row ``i * D + j`` is slice ``j`` of volume
    ``i``; the grayscale value is replicated to 3 channels (:func:`cbmir.ingest.transforms.to_rgb`).
    """
    from cbmir.ingest.transforms import to_rgb

    b, d, h, w = volumes.shape
    return to_rgb(np.ascontiguousarray(volumes).reshape(b * d, h, w, 1))


def extract_slices(extractor: Extractor, slices: np.ndarray, slice_batch: int = DEFAULT_SLICE_BATCH) -> np.ndarray:
    """Features of many slices: ``extractor.extract`` on chunks of ``slice_batch`` slices.

    Args:
        slices: uint8 ``(N, H, W, 3)`` (from :func:`volumes_to_slices`).
        slice_batch: slices per ``extract`` call (``1`` reproduces the study's one-slice-per-call loop,
            for benchmarks only).

    Returns:
        float32 ``(N, dim)`` in input order.

    Raises:
        CbmirError: the extractor returned the wrong number of rows.
    """
    if slice_batch < 1:
        raise CbmirError(f"slice batch size must be >= 1, got {slice_batch}")
    parts = []
    for lo in range(0, len(slices), slice_batch):
        chunk = slices[lo:lo + slice_batch]
        f = np.asarray(extractor.extract(chunk), dtype=np.float32)
        if f.ndim != 2 or len(f) != len(chunk):
            raise CbmirError(f"extractor {extractor.spec.name!r} returned shape {f.shape} for "
                             f"{len(chunk)} slices")
        parts.append(f)
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), dtype=np.float32)


def aggregate(slice_features: np.ndarray, n_volumes: int, aggregation: str = "concat") -> np.ndarray:
    """Slice vectors -> one vector per volume.

    Args:
        slice_features: float32 ``(B * t, dim)`` in (volume, slice) order.
        n_volumes: ``B``.
        aggregation: ``concat`` (the study: slice vectors in slice order, ``(B, t * dim)``), ``mean`` or
            ``max`` (pooled over slices, ``(B, dim)``).

    Raises:
        CbmirError: unknown aggregation.
    """
    per = slice_features.reshape(n_volumes, -1, slice_features.shape[-1])
    if aggregation == "concat":
        return np.ascontiguousarray(per.reshape(n_volumes, -1), dtype=np.float32)
    if aggregation == "mean":
        return per.mean(axis=1, dtype=np.float64).astype(np.float32)
    if aggregation == "max":
        return per.max(axis=1).astype(np.float32)
    raise CbmirError(f"unknown volume aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")


class VolumeEmbedder:
    """Embeds uint8 volumes ``(B, D, H, W)`` with a 2D extractor, slice by slice (DESIGN.md §1).

    Args:
        extractor: any 2D :class:`~cbmir.ingest.base.Extractor`.
        size: volume side ``s`` of the dataset (28 or 64).
        aggregation: ``concat`` (default, the study), ``mean`` or ``max``.
        slice_batch: slices per ``extractor.extract`` call (default 1,024: the slices of many volumes
            together).

    Attributes:
        extractor: the extractor used on slices (:func:`raw_slice_extractor`: per-image L2
            normalisation off where the extractor has one).
        slices: ``t``, slices per volume after preprocessing (= resized side, :func:`slice_side`).
        slice_dim: per-slice embedding dim (``extractor.dim_for(t)`` when available, else ``spec.dim``).
        dim: ``slices * slice_dim`` for ``concat``, ``slice_dim`` for ``mean`` / ``max``.
        aggregation, is_3d (True), items_per_image (= ``slices``, 2D images per item).

    Raises:
        CbmirError: unknown aggregation.
    """

    def __init__(self, extractor: Extractor, size: int, aggregation: str = "concat",
                 slice_batch: int = DEFAULT_SLICE_BATCH) -> None:
        if aggregation not in AGGREGATIONS:
            raise CbmirError(f"unknown volume aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        if int(slice_batch) < 1:
            raise CbmirError(f"slice batch size must be >= 1, got {slice_batch}")
        self.extractor = raw_slice_extractor(extractor)
        self.raw_slices = self.extractor is not extractor  # per-slice L2 normalisation switched off
        self.size = int(size)
        self.aggregation = aggregation
        self.slice_batch = int(slice_batch)
        self.is_3d = True
        self.slices = slice_side(extractor, self.size)
        dim_for = getattr(extractor, "dim_for", None)
        self.slice_dim = int(dim_for(self.slices)) if callable(dim_for) else int(extractor.spec.dim)
        self.dim = self.slice_dim * (self.slices if aggregation == "concat" else 1)

    @property
    def items_per_image(self) -> int:
        """2D slices extracted per volume (``t``)."""
        return self.slices

    def preprocess(self, volumes: np.ndarray) -> np.ndarray:
        """uint8 ``(B, s, s, s)`` -> uint8 RGB slices ``(B * t, t, t, 3)``, ready for ``extract``.

        Raises:
            CbmirError: not a uint8 volume batch of side ``size`` (e.g. a 2D image batch).
        """
        v = check_volumes(volumes, self.size)
        return volumes_to_slices(preprocess_volumes(v, self.slices))

    def embed(self, volumes: np.ndarray) -> np.ndarray:
        """Embed a batch of volumes: uint8 ``(B, D, s, s)`` -> float32 ``(B, dim)``.

        All ``B x t`` slices go through the extractor in chunks of ``slice_batch`` slices.

        Raises:
            CbmirError: not a uint8 volume batch of side ``size`` (e.g. a 2D image batch), or the
                extractor returned an unexpected dim.
        """
        slices = self.preprocess(volumes)
        b = len(slices) // self.slices
        if b == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        feats = extract_slices(self.extractor, slices, self.slice_batch)
        if feats.shape[1] != self.slice_dim:
            raise CbmirError(f"extractor {self.extractor.spec.name!r} gave {feats.shape[1]}-dim slice "
                             f"vectors, expected {self.slice_dim}")
        return aggregate(feats, b, self.aggregation)

    def describe_preprocessing(self) -> str:
        """Human-readable volume preprocessing (recorded in collection metadata)."""
        s, t = self.size, self.slices
        steps = []
        if t != s:
            steps.append(f"scipy.ndimage.zoom order=3 along depth {s}->{t}, "
                         f"each slice bicubic {s}x{s}->{t}x{t}")
        else:
            steps.append(f"no resampling ({s}^3)")
        agg = {"concat": f"{t} slice vectors concatenated in slice order",
               "mean": f"mean over {t} slice vectors", "max": f"max over {t} slice vectors"}[self.aggregation]
        raw = " (per-slice L2 normalisation off)" if self.raw_slices else ""
        return f"volume {s}^3 -> {t}^3: {steps[0]}; gray -> RGB; per-slice 2D extractor{raw}; {agg}"

    def identity(self) -> dict:
        """Extractor identity plus the volume preprocessing, ``slices`` (t), ``aggregation`` and ``dim``."""
        ident = dict(self.extractor.identity())
        ident["slice_dim"] = self.slice_dim
        ident["dim"] = self.dim
        ident["slices"] = self.slices
        ident["aggregation"] = self.aggregation
        ident["volume_preprocessing"] = self.describe_preprocessing()
        ident["preprocessing"] = f"{self.describe_preprocessing()} | 2D: {ident.get('preprocessing', '')}"
        return ident

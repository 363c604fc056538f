"""``hog``: histogram of oriented gradients, the weights-free handcrafted baseline.

Dalal & Triggs, *Histograms of Oriented Gradients for Human Detection*, CVPR 2005, computed
with ``skimage.feature.hog``: 9 unsigned orientation bins, 4 x 4 pixels per cell, 2 x 2 cells per
block, L2-Hys block normalisation, on the grayscale image at its own size (no resizing). At
28 px that is 6 x 6 blocks x 2 x 2 cells x 9 bins = 1,296 dims (DESIGN.md §3). The study
reports no such baseline; cbmir reports show it beside the deep features.
"""

from __future__ import annotations

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec, uint8_image_batch
from cbmir.ingest.extractors.registry import register, register_builder

HOG_PARAMS = {
    "orientations": 9,
    "pixels_per_cell": (4, 4),
    "cells_per_block": (2, 2),
    "block_norm": "L2-Hys",
}
GRAY_MODES = ("rgb2gray", "mean")
"""RGB -> gray for HOG: ``mean`` (channel mean; the default, the conversion behind DESIGN.md §3's
RetinaMNIST HOG reference row, which it reproduces exactly) or ``rgb2gray`` (skimage, BT.709 luma)."""


def hog_dim(height: int, width: int | None = None, params: dict = HOG_PARAMS) -> int:
    """HOG vector length for a ``height x width`` image (square when ``width`` is None).

    ``blocks per axis = side // cell - block + 1``; dim = blocks_y * blocks_x * block² * bins.
    28 -> 1,296; 32 -> 1,764; 64 -> 8,100; 128 -> 34,596; 224 -> 108,900.
    """
    width = height if width is None else width
    (cy, cx), (by, bx) = params["pixels_per_cell"], params["cells_per_block"]
    ny, nx = height // cy - by + 1, width // cx - bx + 1
    return max(ny, 0) * max(nx, 0) * by * bx * params["orientations"]


HOG = register(
    ExtractorSpec(
        name="hog",
        family="handcrafted",
        dim=hog_dim(28),
        input_policy="own size, no resizing; RGB -> gray (channel mean), gray / 255",
        weights_source="none",
        licence="no weights (scikit-image, BSD-3-Clause)",
        backends=("numpy",),
        builder="hog",
        display_name="HOG",
        baseline=True,
        options=dict(HOG_PARAMS),
    )
)


class HogExtractor:
    """HOG baseline (a :class:`~cbmir.ingest.base.Extractor`); L2-normalised float32 vectors.

    ``extract`` takes uint8 ``(B, H, W, 3)`` RGB (also ``(B, H, W, 1)`` or ``(B, H, W)``
    grayscale) and returns float32 ``(B, dim_for(H, W))``. RGB goes to gray on [0, 1] with
    ``skimage.color.rgb2gray`` (ITU-R BT.709 luma; ``spec.options["gray"] = "mean"`` uses the
    channel mean instead); grayscale is divided by 255 (the same values, to float rounding, as
    either conversion of the replicated image). Each HOG vector is divided by its L2 norm; an
    all-zero vector (a constant image) stays all zero, so cosine similarity treats it as similar
    to nothing (score 0). Setting :attr:`l2_normalize` to ``False`` returns skimage's raw HOG
    vectors (what :func:`cbmir.ingest.volumes.raw_slice_extractor` does for 3D slices).

    Raises:
        CbmirError: ``spec.options["gray"]`` not in :data:`GRAY_MODES`.
    """

    #: Divide each HOG vector by its L2 norm (2D images); ``False`` for 3D slices.
    l2_normalize: bool = True

    def __init__(self, spec: ExtractorSpec = HOG) -> None:
        self.spec = spec
        options = dict(spec.options)
        self.gray = options.pop("gray", "mean")
        if self.gray not in GRAY_MODES:
            raise CbmirError(f"hog gray mode {self.gray!r} unknown; valid: {', '.join(GRAY_MODES)}")
        self.params = {**HOG_PARAMS, **options}
        self._last_hw: tuple[int, int] | None = None

    def dim_for(self, size: int, width: int | None = None) -> int:
        """Embedding dim for ``size x size`` (or ``size x width``) input images."""
        return hog_dim(size, width, self.params)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """HOG of each image; float32 ``(B, dim)``, each row unit L2 norm (or all zero) unless
        :attr:`l2_normalize` is off (3D slices: skimage's raw HOG vector, as the study concatenated it).

        Raises:
            ValueError: not a uint8 batch of 1- or 3-channel images.
        """
        from skimage.color import rgb2gray
        from skimage.feature import hog

        images = uint8_image_batch(images, "hog")
        b, h, w, c = images.shape
        self._last_hw = (h, w)
        out = np.zeros((b, self.dim_for(h, w)), dtype=np.float32)
        for i in range(b):
            if c == 1:
                gray = images[i, ..., 0] / 255.0
            elif self.gray == "mean":
                gray = images[i].mean(axis=-1) / 255.0
            else:
                gray = rgb2gray(images[i])
            out[i] = hog(gray, feature_vector=True, **self.params)
        if self.l2_normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            np.divide(out, norms, out=out, where=norms > 0)
        return out

    def identity(self, size: int | None = None) -> dict:
        """Identity for collection metadata; ``dim`` is for ``size`` px input (else for the last
        batch seen, else 28 px)."""
        if size is not None:
            dim = self.dim_for(size)
        elif self._last_hw is not None:
            dim = self.dim_for(*self._last_hw)
        else:
            dim = self.spec.dim
        p = self.params
        return {
            "model": self.spec.name,
            "family": self.spec.family,
            "backend": "numpy",
            "dim": int(dim),
            "weights": "none",
            "random_init": False,
            "preprocessing": (
                f"skimage hog: {p['orientations']} orientations, {p['pixels_per_cell']} px/cell, "
                f"{p['cells_per_block']} cells/block, {p['block_norm']}; gray ({self.gray}) at "
                "own size; L2-normalised"
            ),
        }


def build_hog(spec: ExtractorSpec, *, weights=None, random_init=False, **_ignored) -> HogExtractor:
    """Builder of ``hog``: weights-free, so ``weights`` is refused and ``random_init`` ignored.

    ``device`` and ``batch_size`` are ignored (CPU, one image at a time).
    """
    if weights is not None:
        raise CbmirError(f"model {spec.name!r} has no weights; drop --weights")
    return HogExtractor(spec)


register_builder("hog", build_hog)

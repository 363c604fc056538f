"""Image folders with one sub-folder per class (torchvision ``ImageFolder`` convention).

Layout (see :mod:`cbmir.ingest.sources.archive`)::

    archive/train/<class>/*.png     archive/test/<class>/*.png      (or database/ and query/)
    archive/<class>/*.png                                            (no split folders: all train)

Formats: everything Pillow decodes (:data:`~cbmir.ingest.sources.pixels.IMAGE_EXTENSIONS`: PNG 8/16-bit,
JPEG, TIFF 8/16/32-bit and float, BMP, GIF, WebP, PNM, JPEG 2000), plus 2D ``.npy`` arrays and
single-frame DICOM files (``.dcm``). Pixel rules: :mod:`cbmir.ingest.sources.pixels`. Every image
reaches the extractor as uint8 RGB ``(size, size, 3)`` (grey replicated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbmir.ingest.sources.archive import ArchiveSource, Item
from cbmir.ingest.sources.pixels import (
    DEFAULT_MAX_PIXELS,
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    as_rgb,
    extension,
    fit_to_size,
    load_image,
)

FOLDER_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",) + DICOM_EXTENSIONS


class FolderSource(ArchiveSource):
    """A folder of 2D images, one sub-folder per class (a :class:`cbmir.ingest.base.DatasetSource`).

    Args:
        root: the archive folder (or one image file).
        size: side every image is resized to (a collection is per (dataset, size, model)).
        name: dataset / collection name; default the folder name
            (:func:`~cbmir.ingest.sources.archive.archive_name`).
        rule: intensity rule (:class:`~cbmir.ingest.sources.pixels.IntensityRule`, default ``auto``).
        strict: stop at the first unreadable file instead of skipping and listing it.
        max_pixels: decode limit per image (Pillow ``MAX_IMAGE_PIXELS``).
        fit: ``stretch`` (default), ``pad`` or ``crop`` (:func:`~cbmir.ingest.sources.pixels.fit_to_size`).
        class_folders: ``False`` treats sub-folders as plain folders (all images unlabelled).

    Payload per image: ``source_path`` (relative to ``root``), ``label_name`` (the class folder),
    ``mode`` (Pillow mode), ``orig_dtype``, ``orig_height``, ``orig_width``, ``intensity`` and its
    ``intensity_low``/``intensity_high`` (+ ``clipped_fraction`` for a window), ``n_frames`` for
    multi-frame files.

    Raises:
        CbmirError: missing root, bad size, a confusing layout (:func:`~cbmir.ingest.sources.archive.scan_tree`),
            no images found.
    """

    kind = "folder"

    def __init__(self, root, size: int = 28, *, name=None, rule=None, strict=False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, fit: str = "stretch",
                 class_folders: bool = True) -> None:
        super().__init__(root, size, name=name, rule=rule, strict=strict, max_pixels=max_pixels, fit=fit)
        self._set_scanned_items(_is_image, class_folders)

    def load_item(self, item: Item) -> tuple[np.ndarray, dict]:
        """uint8 ``(size, size, 3)`` and decoding facts (see the class docstring)."""
        arr, info = load_image(item.files[0], self.rule, max_pixels=self.max_pixels)
        return as_rgb(fit_to_size(arr, self.size, self.fit)), info

    def accepts(self) -> str:
        return "images (" + " ".join(FOLDER_EXTENSIONS) + ")"


def _is_image(path: Path) -> bool:
    return extension(path) in FOLDER_EXTENSIONS

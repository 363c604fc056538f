"""Interfaces shared by every dataset reader and every feature extractor.

A *dataset source* streams :class:`Batch` objects of uint8 images with their labels;
an *extractor* turns a batch of images into float32 embeddings. The ingest job
(:mod:`cbmir.ingest.job`) only talks to these two interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

@dataclass
class Batch:
    """A batch of images from one split.

    Attributes:
        images: uint8 array, 2D images ``(B, H, W, C)`` with C in {1, 3}, or 3D volumes
            ``(B, D, H, W)`` (grayscale, depth first as in MedMNIST 3D).
        labels: int64 ``(B,)`` class labels (-1 when unlabelled).
        indices: int64 ``(B,)`` row of each image within its split.
        image_ids: one stable string id per image (e.g. ``breastmnist/train/17``).
        extra_payload: optional per-image payload dicts (user archives), same length as B.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    image_ids: list[str]
    extra_payload: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.indices)


@runtime_checkable
class DatasetSource(Protocol):
    """A dataset the ingest job can read.

    Attributes:
        name: dataset name used in collection names and payloads (e.g. ``breastmnist``).
        size: image side in pixels (28, 64, 128, 224) or volume side (28, 64).
        is_3d: True when items are volumes ``(D, H, W)``.
        n_classes: number of classes (0 when unknown).
    """

    name: str
    size: int
    is_3d: bool
    n_classes: int

    def split_size(self, split: str) -> int:
        """Number of items in ``split`` (``train``, ``val`` or ``test``)."""

    def labels(self, split: str) -> np.ndarray:
        """int64 ``(N,)`` labels of ``split`` in row order."""

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """Stream ``split`` from row ``start`` in batches of at most ``batch_size`` items."""


@dataclass(frozen=True)
class ExtractorSpec:
    """Registry entry of one feature extractor (cf. timm's ``PretrainedCfg``).

    Attributes:
        name: registry name (``cbmir models``), e.g. ``resnet50``.
        family: ``imagenet-cnn``, ``foundation``, ``handcrafted`` ...
        dim: embedding dimension of one 2D image.
        input_policy: human-readable input-size rule (e.g. ``own size, 28 -> 32``).
        weights_source: where pretrained weights come from (hub id, release) or ``none``.
        licence: licence / access note for the weights.
        backends: backends able to compute it (``torch``, ``keras``, ``numpy``).
        builder: name of the builder function in the registry that constructs it.
        options: builder keyword arguments (architecture id, hub id, ...).
    """

    name: str
    family: str
    dim: int
    input_policy: str
    weights_source: str
    licence: str = ""
    backends: tuple[str, ...] = ("torch",)
    builder: str = ""
    options: dict = field(default_factory=dict, hash=False, compare=False)


class Extractor(Protocol):
    """A feature extractor: a batch of 2D images -> embeddings.

    ``extract`` takes uint8 ``(B, H, W, 3)`` RGB images (any H, W) and returns float32
    ``(B, spec.dim)`` embeddings; it applies the model's own preprocessing.
    ``identity()`` returns a JSON-serialisable dict recorded in collection metadata:
    ``model``, ``backend``, ``dim``, ``weights`` (identity: hub id, file sha256 or
    ``random-init``), ``random_init`` (bool), ``preprocessing`` (description).
    """

    spec: ExtractorSpec

    def extract(self, images: np.ndarray) -> np.ndarray: ...

    def identity(self) -> dict: ...


def uint8_image_batch(images, name: str) -> np.ndarray:
    """``images`` as a numpy uint8 ``(B, H, W, 1|3)`` batch, the input check of every extractor's
    ``extract``: a ``(B, H, W)`` batch gets a channel axis; nothing is copied.

    Args:
        images: array-like batch of images.
        name: the extractor (model name) named in the error message.

    Raises:
        ValueError: not a uint8 ``(B, H, W[, 1|3])`` batch.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"{name} expects uint8 (B, H, W, 1|3) images, got {images.dtype} {images.shape}")
    return images

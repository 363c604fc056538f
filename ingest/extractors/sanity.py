"""Weights sanity check: the end-to-end proof that a model's pretrained weights and its preprocessing are
right, wherever the weights are on this machine (``cbmir models --check``).

Every model whose pretrained weights are local (:func:`~cbmir.ingest.extractors.availability.weights_available`)
and whose extractor can keep its ImageNet-1k classifier (``create_extractor(..., keep_head=True)`` and a
``logits`` method: the timm CNNs and EfficientNet-Lite) classifies two scikit-image photographs through
**exactly the preprocessing of its features** (the extractor's own resize, /255, mean/std, channel
handling), at the weights' native input side (``preprocess_cfg.input_size``), after a centre square crop:

* ``skimage.data.chelsea()`` must get a cat class (ImageNet 281-285) as top-1;
* ``skimage.data.coffee()`` must get espresso or cup (967, 968) as top-1;
* channel order: summed over both photographs, the log-probability of the expected classes must be higher
  for the images as given (RGB) than for the same images with their channels reversed (BGR). A model fed
  the wrong channel order still names a cat and an espresso (ImageNet CNNs are robust to it), but it is
  less sure of them: measured on EfficientNet-Lite0/1/2, the probability of the expected classes drops
  from 0.88/0.83/0.84 to 0.86/0.75/0.64 (chelsea) and from 0.96/0.67/0.91 to 0.90/0.61/0.77 (coffee) when
  the channels are reversed.

What it catches (measured on the three EfficientNet-Lite entries): a forgotten ``/ 255`` (chelsea's top-1
becomes 721 / 619 / 434), image bytes read as channels-first, reversed channel order. What it does not catch:
a mild change of mean / std (ImageNet's or CLIP's instead of the weights' 0.5 / 0.5: same top-1 classes),
or symmetric instead of TensorFlow ``SAME`` padding (same top-1 classes at the native side, very different
features at 32 px: :mod:`cbmir.ingest.extractors.efficientnet_lite`). It proves gross errors absent; the
entry's typed preprocessing (:class:`~cbmir.ingest.base.PreprocessCfg`) stays the record of the details.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cbmir.core.errors import CbmirError

#: (scikit-image function, accepted ImageNet-1k classes, what they are)
CHECK_IMAGES: tuple[tuple[str, tuple[int, ...], str], ...] = (
    ("chelsea", (281, 282, 283, 284, 285), "a cat class (281-285)"),
    ("coffee", (967, 968), "espresso / cup (967, 968)"),
)
PASS, FAIL, SKIPPED = "PASS", "FAIL", "skipped"


@dataclass
class SanityResult:
    """The check of one model.

    Attributes:
        model: registry name.
        status: ``PASS``, ``FAIL`` or ``skipped``.
        detail: one line: per image top-1 class (name, probability), the channel-order margin, or why it
            was skipped / failed.
        top1: ``{image: top-1 class index}`` (empty when skipped).
        channel_margin: summed log-probability of the expected classes, images as given minus channels
            reversed (> 0 passes); NaN when skipped.
    """

    model: str
    status: str
    detail: str
    top1: dict[str, int] = field(default_factory=dict)
    channel_margin: float = float("nan")

    def line(self) -> str:
        """``<model> PASS|FAIL|skipped: <detail>`` (one line of ``cbmir models --check``)."""
        return f"{self.model:<20} {self.status:<8} {self.detail}"


def check_image(name: str, side: int) -> np.ndarray:
    """uint8 ``(side, side, 3)``: scikit-image's ``data.<name>()`` centre-cropped to a square, then resized
    to ``side`` (PIL bicubic, antialiased: a faithful small copy of the photograph)."""
    from PIL import Image
    from skimage import data

    img = getattr(data, name)()
    h, w = img.shape[:2]
    m = min(h, w)
    y, x = (h - m) // 2, (w - m) // 2
    sq = np.ascontiguousarray(img[y : y + m, x : x + m, :3])
    return np.asarray(Image.fromarray(sq).resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _class_name(index: int) -> str:
    try:
        from timm.data import ImageNetInfo

        return ImageNetInfo().index_to_description(int(index)).split(",")[0]
    except Exception:  # noqa: BLE001 - names are cosmetic
        return "?"


def check_extractor(extractor, model: str | None = None) -> SanityResult:
    """Run the check on an extractor built with its classifier (``logits(uint8 (B, H, W, 3)) -> (B, 1000)``).

    The photographs are given at the weights' native side (``spec.preprocess_cfg.input_size``, else 224);
    the extractor applies its own preprocessing to them.

    Raises:
        CbmirError: the extractor has no ``logits`` (built without ``keep_head``, or a family without an
            ImageNet head).
    """
    spec = extractor.spec
    model = model or spec.name
    if not callable(getattr(extractor, "logits", None)):
        raise CbmirError(f"{model}: this extractor has no ImageNet classifier (logits) to check")
    side = int(spec.preprocess_cfg.input_size or 224)
    images = np.stack([check_image(name, side) for name, _, _ in CHECK_IMAGES])
    logp = _log_softmax(extractor.logits(images))
    logp_rev = _log_softmax(extractor.logits(np.ascontiguousarray(images[..., ::-1])))
    top1, parts, wrong = {}, [], []
    margin = 0.0
    for i, (name, classes, what) in enumerate(CHECK_IMAGES):
        k = int(np.argmax(logp[i]))
        top1[name] = k
        margin += float(np.logaddexp.reduce(logp[i, list(classes)]) - np.logaddexp.reduce(logp_rev[i, list(classes)]))
        parts.append(f"{name}: {k} {_class_name(k)} (p={np.exp(logp[i, k]):.2f})")
        if k not in classes:
            wrong.append(f"{name} should be {what}")
    parts.append(f"channel order: log p(expected) as given - reversed = {margin:+.3f}")
    if margin <= 0:
        wrong.append("the expected classes are no more probable with the channels as given than reversed "
                     "(wrong channel order?)")
    status = FAIL if wrong else PASS
    detail = "; ".join(parts) + (f" -- {'; '.join(wrong)}" if wrong else "")
    return SanityResult(model, status, detail, top1, margin)


def check_pretrained(name: str, *, device: str = "cpu") -> SanityResult:
    """Check the registry entry ``name`` with its own pretrained weights, when they are on this machine.

    Returns:
        ``skipped`` (weights-free model, no local weights, or no ImageNet classifier in its family),
        else the :func:`check_extractor` result. A model that fails to build is a ``FAIL`` naming the error.
    """
    from cbmir.ingest.extractors.availability import weights_available
    from cbmir.ingest.extractors.registry import create_extractor, get_spec

    spec = get_spec(name)
    if not spec.has_weights:
        return SanityResult(spec.name, SKIPPED, "weights-free model")
    if not spec.weights_cfg.imagenet_head:
        return SanityResult(spec.name, SKIPPED, "no ImageNet classifier head in its weights")
    if not weights_available(spec):
        return SanityResult(spec.name, SKIPPED, "no local weights")
    try:
        ext = create_extractor(spec.name, keep_head=True, device=device, batch_size=8,
                               input_size=spec.preprocess_cfg.input_size if spec.preprocess_cfg.resizable else None)
    except CbmirError as exc:
        return SanityResult(spec.name, FAIL, f"cannot build it: {exc}")
    return check_extractor(ext, spec.name)


def check_models(names=None, *, device: str = "cpu") -> list[SanityResult]:
    """:func:`check_pretrained` for ``names`` (default: every registered model), in registry order."""
    from cbmir.ingest.extractors.registry import list_specs

    names = [s.name for s in list_specs()] if names is None else list(names)
    return [check_pretrained(n, device=device) for n in names]

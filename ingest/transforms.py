"""Small named preprocessing transforms for batches of 2D images (cf. TorchIO / MONAI).

Every transform takes and returns a *channels-last* batch ``(B, H, W, C)``, as a numpy array
or a torch tensor (returned as the same kind, on the same device), and does one thing:

* :func:`to_rgb` - grayscale -> 3 channels by replication (DESIGN.md §1);
* :func:`resize_batch` - resize to ``size x size`` (bicubic, PIL-equivalent);
* :func:`to_unit_float` - uint8 [0, 255] -> float32 [0, 1];
* :func:`normalize` - per-channel ``(x - mean) / std``.

Volumes (3D) are out of scope here; see the volume transforms.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is a hard dependency of cbmir
    torch = None  # type: ignore[assignment]

ArrayLike = Union[np.ndarray, "torch.Tensor"]
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _check_batch(images: ArrayLike, name: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{name} expects a (B, H, W, C) batch, got shape {tuple(images.shape)}")


def to_rgb(images: ArrayLike) -> ArrayLike:
    """Replicate grayscale to 3 channels; RGB passes through unchanged (no copy).

    Args:
        images: ``(B, H, W, 1)``, ``(B, H, W, 3)`` or ``(B, H, W)`` (grayscale), any dtype.

    Returns:
        ``(B, H, W, 3)``, same dtype and array kind. Grayscale channels are identical copies,
        as the study feeds grayscale images to ImageNet CNNs (DESIGN.md §1).

    Raises:
        ValueError: any other shape (e.g. 2 or 4 channels).
    """
    if images.ndim == 3:
        images = images[..., None]
    _check_batch(images, "to_rgb")
    c = images.shape[-1]
    if c == 3:
        return images
    if c != 1:
        raise ValueError(f"to_rgb expects 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
    if _is_torch(images):
        return images.expand(*images.shape[:-1], 3).contiguous()
    return np.repeat(images, 3, axis=-1)


def resize_batch(
    images: ArrayLike,
    size: int | tuple[int, int],
    interpolation: str = "bicubic",
) -> ArrayLike:
    """Resize every image of a channels-last batch to ``size x size`` (or ``(height, width)``).

    Implementation: ``torch.nn.functional.interpolate`` on the whole batch with
    ``antialias=True`` (bicubic / bilinear) and ``align_corners=False``. With ``antialias=True``
    torch uses PIL's filters (bicubic with a = -0.5, support widened when downscaling), so the
    result equals PIL ``Image.resize(..., BICUBIC)`` to float rounding (< 1e-4 on 0..255) for
    up- *and* downscaling, while running batched on CPU or GPU. Without antialias, torch's
    bicubic uses a = -0.75 and no prefilter (differs from PIL by up to ~20 grey levels).

    Args:
        images: ``(B, H, W, C)`` uint8 or float, numpy array or torch tensor.
        size: target side in pixels, or ``(height, width)``.
        interpolation: ``bicubic`` (default, the study's 28 -> 32 upsampling), ``bilinear``
            or ``nearest``.

    Returns:
        ``(B, size, size, C)`` of the same kind. uint8 input gives uint8, rounded and clipped to
        0..255 once at the end (PIL also clips between its two separable passes, so on
        noise-like images PIL's uint8 result can differ by more than one grey level); float
        input gives float32 (not clipped: bicubic may overshoot the input range).
        When the batch already has the target size it is returned unchanged (float -> float32).

    Raises:
        ValueError: bad shape, size < 1 or unknown interpolation.
    """
    _check_batch(images, "resize_batch")
    if interpolation not in INTERPOLATIONS:
        valid = ", ".join(INTERPOLATIONS)
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {valid}")
    out_hw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if min(out_hw) < 1:
        raise ValueError(f"resize_batch size must be >= 1, got {size}")
    is_torch = _is_torch(images)
    is_uint8 = images.dtype == (torch.uint8 if is_torch else np.uint8)
    if tuple(images.shape[1:3]) == out_hw:
        if is_uint8:
            return images
        return images.float() if is_torch else np.asarray(images, dtype=np.float32)

    x = images if is_torch else torch.from_numpy(np.ascontiguousarray(images))
    x = x.permute(0, 3, 1, 2).float()  # NHWC -> NCHW
    kwargs = {} if interpolation == "nearest" else {"antialias": True, "align_corners": False}
    y = F.interpolate(x, size=out_hw, mode=interpolation, **kwargs).permute(0, 2, 3, 1)
    if is_uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    y = y.contiguous()
    return y if is_torch else y.numpy()


def to_unit_float(images: ArrayLike) -> ArrayLike:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` (divide by 255); float input is only cast."""
    if _is_torch(images):
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return np.asarray(images, dtype=np.float32)


def normalize(x: ArrayLike, mean: Sequence[float], std: Sequence[float]) -> ArrayLike:
    """Per-channel standardisation ``(x - mean) / std`` over the last (channel) axis.

    Args:
        x: ``(..., C)`` float values (for ImageNet models: RGB scaled to ``[0, 1]``).
        mean, std: ``C`` values each (e.g. the model's ``pretrained_cfg`` mean / std).

    Returns:
        float32 array / tensor of the same shape and kind.

    Raises:
        ValueError: ``len(mean)`` or ``len(std)`` differs from C, or a std is 0.
    """
    c = x.shape[-1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize: {c} channels but {len(mean)} means and {len(std)} stds")
    if any(float(s) == 0.0 for s in std):
        raise ValueError("normalize: std must be non-zero")
    if _is_torch(x):
        m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
        s = torch.as_tensor(std, dtype=torch.float32, device=x.device)
        return (x.float() - m) / s
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) - m) / s

"""Numeric precision of a torch extractor's forward pass: ``auto``, ``fp32`` or ``bf16``.

``auto`` keeps each device's fast default: bf16 autocast on CUDA (fp16 where the GPU has no bf16), fp32 on
the CPU. ``bf16`` asks for bf16 autocast on the CPU too: on CPUs with native bf16 (``avx512_bf16``, AMX) oneDNN
runs EfficientNet-Lite0 at 224 px about 2x faster than fp32 (measured here: 36 -> 77 images/s on two cores);
elsewhere it is emulated and slower. ``fp32`` turns autocast off on every device, and on a GPU also TF32 (which
cuDNN uses for fp32 convolutions by default): true fp32 features everywhere.

Why it matters for retrieval: near-duplicate 28 px images give near-tied cosine scores, so bf16's rounding reorders
neighbours. Measured here (EfficientNet-Lite0/1/2 at 224 px, BreastMNIST and RetinaMNIST, bf16 vs fp32 on the CPU):
the top-1 neighbour changed for 26-50 % of the queries and mAP@5 / ACC@1 moved by up to 1.9 / 3.9 points, within the
bootstrap CIs but not bit-comparable. Reproduce a table in one precision (``--precision fp32`` for the study's).

Autocast keeps the preprocessing, the pooling and the returned features in fp32; the convolutions run in bf16,
so features differ from fp32 ones by about 1e-2 relative. The label of the precision used
(:attr:`extractor.precision`: ``fp32``, ``bf16-autocast``, ``fp16-autocast``) is recorded in the collection
metadata (``extra["precision"]``) and in the benchmark's results table; the collection's identity does not
depend on it (features of one model and weights are comparable across precisions).
"""

from __future__ import annotations

import contextlib

from cbmir.core.errors import CbmirError

PRECISIONS = ("auto", "fp32", "bf16")
LABELS = {None: "fp32", "bfloat16": "bf16-autocast", "float16": "fp16-autocast"}


def check_precision(precision: str) -> None:
    """Raise CbmirError for a ``precision`` not in :data:`PRECISIONS` (names ``--precision`` and the valid values)."""
    if precision not in PRECISIONS:
        raise CbmirError(f"unknown precision {precision!r} (--precision / CBMIR_PRECISION); "
                         f"valid: {', '.join(PRECISIONS)}")


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for a forward pass on ``device`` at ``precision`` (None: no autocast, fp32).

    Args:
        device: a ``torch.device`` (``cpu`` or ``cuda``).
        precision: one of :data:`PRECISIONS`.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` (CUDA without bf16, ``auto`` or ``bf16``) or None.

    Raises:
        CbmirError: an unknown ``precision`` (names the valid values and ``--precision``).
    """
    import torch

    check_precision(precision)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def precision_label(dtype) -> str:
    """``fp32``, ``bf16-autocast`` or ``fp16-autocast`` for an :func:`autocast_dtype` result."""
    return LABELS[None if dtype is None else str(dtype).removeprefix("torch.")]


def autocast(device, dtype):
    """Context manager for a forward pass on ``device``: autocast to ``dtype``; for ``dtype`` None on CUDA,
    :func:`strict_fp32`; on the CPU with None, nothing."""
    import torch

    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    if device.type == "cuda":
        return strict_fp32()
    return contextlib.nullcontext()


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (torch's defaults: on for convolutions,
    off for matmuls), restored after it. Process-wide flags: do not mix precisions in concurrent threads."""
    import torch

    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm

"""``torch.compile`` for a torch extractor's pooled-feature forward pass (``--torch-compile``).

Off by default. On, the pooled features (``forward_features`` then global average pooling) run through
``torch.compile`` (TorchInductor: fused convolution + batch-norm + activation kernels). Measured here,
EfficientNet-Lite0 / Lite2 at 224 px in fp32 on two AVX-512 CPU cores: 42 -> 60 / 31 -> 47 images/s with the resize
(the network alone: 42 -> 75), features equal to eager ones to 2e-6 (fp32 rounding; same precision, so tables stay
comparable), after a one-off compile of 20-30 s per process (seconds when TorchInductor's cache has it).
Worth it for bulk ingestion (a MedMNIST 3D 64^3 dataset is 100k slices), not for a handful of queries.

Every forward pass is padded to one fixed batch size (:func:`padded`) so the graph compiles once; padded rows
are dropped (eval mode: rows are independent). The ImageNet head used by the weights sanity check stays eager.
The collection records ``extra["torch_compile"] = true`` when it was built this way.
"""

from __future__ import annotations

from collections.abc import Callable

from cbmir.core.errors import CbmirError


def pooled_forward(model, enabled: bool, name: str = "the model") -> Callable:
    """The callable ``x -> model.forward_features(x).mean(dim=(2, 3))`` (float ``(B, C, H, W)`` -> ``(B, C)``),
    compiled with ``torch.compile`` when ``enabled``.

    The compiled callable raises :class:`CbmirError` (naming ``name``, the compiler's error and the fix: run without
    ``--torch-compile``) when compiling or running the compiled graph fails, e.g. on a machine without the C++
    compiler TorchInductor needs on the CPU.

    Example:
        >>> f = pooled_forward(model, enabled=True, name="efficientnet_lite0")   # compiles on the first call
    """
    def pooled(x):
        return model.forward_features(x).mean(dim=(2, 3))

    if not enabled:
        return pooled
    import torch

    compiled = torch.compile(pooled, dynamic=False)

    def run(x):
        try:
            return compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure becomes one message with the fix
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CbmirError(f"torch.compile failed for {name}: {type(e).__name__}: {first}; run without "
                             "--torch-compile (CBMIR_TORCH_COMPILE=false, grid torch_compile: false)") from e

    return run


def padded(x, rows: int):
    """``x`` (``(B, ...)`` tensor, ``B <= rows``) with zero rows appended up to ``rows`` (unchanged when ``B == rows``).

    Raises:
        ValueError: ``B > rows``.
    """
    import torch

    b = x.shape[0]
    if b > rows:
        raise ValueError(f"batch of {b} rows exceeds the compiled batch size {rows}")
    if b == rows:
        return x
    pad = torch.zeros((rows - b, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)

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


def pooled_forward(model, enabled: bool) -> Callable:
    """The callable ``x -> model.forward_features(x).mean(dim=(2, 3))`` (float ``(B, C, H, W)`` -> ``(B, C)``),
    compiled with ``torch.compile`` when ``enabled``.

    Example:
        >>> f = pooled_forward(model, enabled=True)   # compiles lazily on the first call
    """
    def pooled(x):
        return model.forward_features(x).mean(dim=(2, 3))

    if not enabled:
        return pooled
    import torch

    return torch.compile(pooled, dynamic=False)


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

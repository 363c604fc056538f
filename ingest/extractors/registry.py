"""Extractor registry: model entries (data) and builders (construction), one factory.

Modelled on timm / open_clip (DESIGN.md §7): every model is one :class:`~cbmir.ingest.base.ExtractorSpec`
entry in :data:`_SPECS`; the code that builds a family of models is one *builder* function in
:data:`_BUILDERS`, found by ``(spec.builder, backend)``. :func:`create_extractor` is the only
factory and holds no model-specific code.

Adding a model of an existing family = one ``register(ExtractorSpec(...))`` call. Adding a family
or a backend = one module in ``ingest/extractors/`` that calls :func:`register_builder` (and
:func:`register` for its entries, :func:`register_weights_check` for a fast weights pre-check
used by :func:`check_weights`) at import time. Every public module of the package is imported
on first use of the registry, so new modules need no edit here; such modules must import heavy
libraries (torch, open_clip, tensorflow) inside their builders, not at module level.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Callable

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Extractor, ExtractorSpec
Builder = Callable[..., Extractor]
"""``builder(spec, *, weights, random_init, device, batch_size, backend) -> Extractor``."""

WeightsCheck = Callable[..., None]
"""``check(spec, *, weights) -> None``: raise :class:`~cbmir.core.errors.CbmirError` when the weights
cannot be obtained; must not import torch / TensorFlow (see :func:`check_weights`)."""

_SPECS: dict[str, ExtractorSpec] = {}
_BUILDERS: dict[tuple[str, str | None], Builder] = {}
_WEIGHTS_CHECKS: dict[tuple[str, str | None], WeightsCheck] = {}
_AVAILABILITY: dict[tuple[str, str | None], Callable[..., bool]] = {}
_LOADED = False
_LOAD_LOCK = threading.RLock()
_SKIP_MODULES = {"registry"}


def register(spec: ExtractorSpec, *, replace: bool = False) -> ExtractorSpec:
    """Add a model entry; returns ``spec`` (so it can be used as a module-level constant).

    Raises:
        ValueError: another, different entry already uses ``spec.name`` (and not ``replace``).
    """
    key = spec.name.lower()
    old = _SPECS.get(key)
    if old is not None and not replace and (old != spec or old.options != spec.options):
        raise ValueError(f"extractor {spec.name!r} is already registered")
    _SPECS[key] = spec
    return spec


def register_builder(
    name: str, fn: Builder, *, backend: str | None = None, replace: bool = False
) -> Builder:
    """Add the builder ``name`` for ``backend`` (``None``: any backend the spec lists).

    Raises:
        ValueError: a different function is already registered for ``(name, backend)``.
    """
    return _register_fn(_BUILDERS, "builder", name, fn, backend, replace)


def register_weights_check(
    name: str, fn: WeightsCheck, *, backend: str | None = None, replace: bool = False
) -> WeightsCheck:
    """Add the weights pre-check of builder ``name`` for ``backend`` (``None``: any backend).

    Raises:
        ValueError: a different function is already registered for ``(name, backend)``.
    """
    return _register_fn(_WEIGHTS_CHECKS, "weights check", name, fn, backend, replace)


def register_availability(
    name: str, fn: Callable[..., bool], *, backend: str | None = None, replace: bool = False
) -> Callable[..., bool]:
    """Add how builder ``name`` (for ``backend``; ``None``: any) tells whether an entry's pretrained weights
    are on this machine: ``fn(spec) -> bool``, local files only (no network, no torch / TensorFlow import).
    Entries without one use the generic rule of :func:`cbmir.ingest.extractors.availability.weights_available`.

    Raises:
        ValueError: a different function is already registered for ``(name, backend)``.
    """
    return _register_fn(_AVAILABILITY, "availability check", name, fn, backend, replace)


def availability_check(spec: ExtractorSpec, backend: str) -> Callable[..., bool] | None:
    """The availability function registered for ``spec.builder`` and ``backend`` (else for any backend),
    or None."""
    _ensure_loaded()
    return _AVAILABILITY.get((spec.builder, backend)) or _AVAILABILITY.get((spec.builder, None))


def _register_fn(table: dict, what: str, name: str, fn, backend, replace: bool):
    """Put ``fn`` in ``table`` under ``(name, backend)``; a re-import of the same function is fine.

    Raises:
        ValueError: a different function is already registered there (and not ``replace``).
    """
    key = (name, backend)
    old = table.get(key)
    if old is not None and old is not fn and not replace:
        if getattr(old, "__qualname__", None) != getattr(fn, "__qualname__", None):
            raise ValueError(f"{what} {name!r} (backend {backend}) is already registered")
    table[key] = fn
    return fn


def _ensure_loaded() -> None:
    """Import every public module of ``cbmir.ingest.extractors`` once, so they register themselves."""
    global _LOADED
    if _LOADED:
        return
    with _LOAD_LOCK:
        if _LOADED:
            return
        package = importlib.import_module("cbmir.ingest.extractors")
        for mod in pkgutil.iter_modules(package.__path__):
            if mod.name.startswith("_") or mod.name in _SKIP_MODULES:
                continue
            importlib.import_module(f"{package.__name__}.{mod.name}")
        _LOADED = True


def list_specs(family: str | None = None) -> list[ExtractorSpec]:
    """All registered entries (optionally only one ``family``), sorted by name."""
    _ensure_loaded()
    specs = sorted(_SPECS.values(), key=lambda s: s.name)
    return [s for s in specs if family is None or s.family == family]


def get_spec(name: str) -> ExtractorSpec:
    """The entry registered as ``name`` (case-insensitive).

    Raises:
        CbmirError: unknown name; the message lists every valid name.
    """
    _ensure_loaded()
    spec = _SPECS.get(str(name).strip().lower())
    if spec is None:
        valid = ", ".join(s.name for s in list_specs())
        raise CbmirError(f"unknown model {name!r}; valid models: {valid}")
    return spec


def resolve_backend(spec: ExtractorSpec, backend: str | None) -> str:
    """The backend to use: ``backend`` when given, else ``torch`` when listed, else the first.

    Raises:
        CbmirError: ``backend`` is not one of ``spec.backends``.
    """
    if backend is None:
        return "torch" if "torch" in spec.backends else spec.backends[0]
    if backend not in spec.backends:
        raise CbmirError(
            f"model {spec.name!r} has no backend {backend!r}; valid: {', '.join(spec.backends)}"
        )
    return backend


def check_weights(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    backend: str | None = None,
) -> None:
    """Fail fast when the pretrained weights of model ``name`` cannot be obtained.

    Runs the builder's registered weights check (local ``weights`` file or directory, the local
    caches, or the hub / download host: downloaded when reachable, ``HF_TOKEN`` honoured for gated
    repositories) without importing torch, timm, open_clip or TensorFlow and without building the
    model, so a command can stop within seconds, before reading any dataset.
    :func:`create_extractor` loads the weights for real afterwards. Nothing is checked with
    ``random_init`` or for models without a registered check (weights-free ``hog``).

    Raises:
        CbmirError: unknown name or backend, both ``weights`` and ``random_init``, or weights
            unobtainable (names the model, the licence / access step and ``--weights``).
    """
    spec = get_spec(name)
    chosen = resolve_backend(spec, backend)
    if weights is not None and random_init:
        raise CbmirError(f"give either --weights or --random-init for {spec.name!r}, not both")
    if random_init:
        return
    fn = _WEIGHTS_CHECKS.get((spec.builder, chosen)) or _WEIGHTS_CHECKS.get((spec.builder, None))
    if fn is not None:
        fn(spec, weights=weights)


def create_extractor(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    backend: str | None = None,
    input_size: int | None = None,
    keep_head: bool = False,
    precision: str = "auto",
    torch_compile: bool = False,
) -> Extractor:
    """Build the extractor registered as ``name`` - the one factory for every model.

    Args:
        name: registry name (see :func:`list_specs`), e.g. ``resnet50``, ``hog``.
        weights: local weights file (state dict, ``.safetensors`` / ``.pth`` / ``.pt``) instead
            of the entry's pretrained source.
        random_init: random weights, for tests and smoke runs only (recorded in the identity).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass inside :meth:`Extractor.extract`.
        backend: ``torch``, ``keras``, ``numpy``...; ``None`` = ``torch`` when the model has
            it, else the model's only / first backend.
        input_size: None (``native``, the study's policy) or a side N: every image resized to N x N
            (models whose ``preprocess_cfg.resizable``: the ImageNet CNNs; :mod:`cbmir.core.input_size`).
        keep_head: keep the ImageNet classifier (``extractor.logits``), for the weights sanity check
            (:func:`cbmir.ingest.extractors.sanity.check_pretrained`); families without one ignore it.
        precision: ``auto``, ``fp32`` or ``bf16`` for the torch families' forward pass
            (:mod:`cbmir.ingest.extractors.precision`); other backends ignore it.
        torch_compile: run the ImageNet CNNs' pooled-feature pass through ``torch.compile``
            (:mod:`cbmir.ingest.extractors.compiled`); other families ignore it.

    Returns:
        An :class:`~cbmir.ingest.base.Extractor`: ``extract(uint8 (B, H, W, 3)) -> float32 (B, dim)``.

    Raises:
        CbmirError: unknown name or backend, no builder installed for the backend, both
            ``weights`` and ``random_init`` given, ``batch_size < 1``, an ``input_size`` for a model
            with its own fixed preprocessing, or any error of the builder (e.g. weights
            unreachable: names the model and ``--weights``); an unknown ``precision``.
    """
    from cbmir.ingest.extractors.precision import check_precision

    check_precision(precision)
    spec = get_spec(name)
    chosen = resolve_backend(spec, backend)
    if weights is not None and random_init:
        raise CbmirError(f"give either --weights or --random-init for {spec.name!r}, not both")
    check_input_size(spec, input_size)
    if int(batch_size) < 1:
        raise CbmirError(f"batch_size must be >= 1, got {batch_size}")
    fn = _BUILDERS.get((spec.builder, chosen)) or _BUILDERS.get((spec.builder, None))
    if fn is None:
        raise CbmirError(
            f"no {chosen!r} builder {spec.builder!r} is installed for model {spec.name!r}; "
            f"available backends with a builder: "
            f"{', '.join(b for b in spec.backends if (spec.builder, b) in _BUILDERS) or 'none'}"
        )
    return fn(
        spec,
        weights=weights,
        random_init=bool(random_init),
        device=device,
        batch_size=int(batch_size),
        backend=chosen,
        **({"input_size": int(input_size)} if input_size is not None else {}),
        **({"keep_head": True} if keep_head else {}),
        **({"precision": precision} if precision != "auto" else {}),
        **({"torch_compile": True} if torch_compile else {}),
    )


def check_input_size(spec: ExtractorSpec, input_size: int | None) -> None:
    """Refuse ``--input-size N`` for a model that does not take it (not ``preprocess_cfg.resizable``).

    Raises:
        CbmirError: names the model, its own input rule and ``--input-size native``.
    """
    if input_size is None or spec.preprocess_cfg.resizable:
        return
    raise CbmirError(f"--input-size {input_size}: model {spec.name!r} has its own fixed input rule "
                     f"({spec.input_policy}); use --input-size native (the default) for it. A fixed input "
                     f"size applies to the ImageNet CNNs: "
                     f"{', '.join(s.name for s in list_specs() if s.preprocess_cfg.resizable)}")

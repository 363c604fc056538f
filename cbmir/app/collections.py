"""Which collection a request means: naming it from (dataset or archive, size, model, options), opening
it with the checks every entry point needs, and describing it.

One collection per (dataset, size, model) (DESIGN.md §4); a non-default backend, volume aggregation,
distance or random weights add a suffix (:func:`cbmir.search.schema.collection_name`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cbmir.core.errors import CbmirError, NotFoundError


@dataclass(frozen=True)
class ArchiveOptions:
    """How a user archive is read (ignored for MedMNIST): see :func:`cbmir.ingest.sources.open_source`.

    Attributes:
        source: ``medmnist | folder | manifest | dicom | nifti`` (None: inferred from the dataset).
        name: dataset / collection name (None: the folder or file stem).
        strict: fail on the first unreadable file instead of skipping and listing it.
        intensity, window: pixel rule (``auto | minmax | window | range``) and ``"CENTER,WIDTH"``.
        slice_axis: axis sliced for volumes. dicom_mode: ``auto | 2d | 3d``. fit: ``stretch | pad | crop``.
    """

    source: str | None = None
    name: str | None = None
    strict: bool = False
    intensity: str | None = None
    window: str | None = None
    slice_axis: int | None = None
    dicom_mode: str = "auto"
    fit: str = "stretch"

    def as_kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CollectionRef:
    """A collection named by what it holds.

    Attributes:
        dataset: a MedMNIST flag (``breastmnist``, ``adrenalmnist3d``) or a user archive path.
        size: image side (2D) or volume side (3D); user archives are resized to it.
        model: extractor name (``cbmir models``).
        backend: ``torch`` or ``keras`` (ignored for numpy-only models such as ``hog``).
        distance: ``cosine`` or ``euclidean``.
        aggregation: 3D slice aggregation: ``concat`` (the study), ``mean`` or ``max``.
        random_init: the smoke-test collection built with random weights (``_randinit``).
        archive: :class:`ArchiveOptions`.
        input_size: CNN input-size policy: None = ``native`` (the study's), else N (``_in<N>``;
            :mod:`cbmir.core.input_size`).
    """

    dataset: str
    size: int
    model: str
    backend: str = "torch"
    distance: str = "cosine"
    aggregation: str = "concat"
    random_init: bool = False
    archive: ArchiveOptions = field(default_factory=ArchiveOptions)
    input_size: int | None = None

    @property
    def model_name(self) -> str:
        return self.model.lower()

    def resolved_backend(self) -> str | None:
        """The backend to build the extractor with: None for a model that has no such backend choice
        (the default ``torch`` does not apply to numpy-only models)."""
        from cbmir.ingest.extractors import get_spec

        spec = get_spec(self.model_name)  # unknown model: CbmirError listing the valid ones
        if self.backend == "torch" and "torch" not in spec.backends:
            return None
        return self.backend

    def effective_random_init(self) -> bool:
        """``random_init`` unless the model has no weights to randomise (weights-free baselines)."""
        from cbmir.ingest.extractors import get_spec

        return self.random_init and get_spec(self.model_name).has_weights


def resolve_name(ref: CollectionRef) -> str:
    """The collection name of ``ref`` (reads as little of a user archive as possible).

    Raises:
        CbmirError: unknown model or source kind; an unreadable archive path.
    """
    from cbmir.ingest.sources import dataset_identity
    from cbmir.search.schema import collection_name

    _, ds_name, is_3d = dataset_identity(ref.dataset, ref.size, aggregation=ref.aggregation,
                                         **ref.archive.as_kwargs())
    backend = ref.resolved_backend() or "numpy"
    return collection_name(ds_name, ref.size, ref.model_name, backend=backend, distance=ref.distance,
                           aggregation=ref.aggregation if is_3d else "concat",
                           random_init=ref.effective_random_init(), input_size=ref.input_size)


def randinit_hint(store, name: str, random_init: bool) -> str:
    """`` (a random-init collection exists: add --random-init)`` when ``name`` is missing but its
    ``_randinit`` twin is stored; else ``""``."""
    if random_init:
        return ""
    have = set(store.list_collections())
    return (" (a random-init collection exists: add --random-init)"
            if name not in have and f"{name}_randinit" in have else "")


def stored_meta(store, name: str, random_init: bool = False):
    """``store.meta(name)``; its "does not exist" error gains :func:`randinit_hint`."""
    try:
        return store.meta(name)
    except CbmirError as exc:
        hint = randinit_hint(store, name, random_init)
        if not hint:
            raise
        raise CbmirError(f"{exc}{hint}") from None


def check_archive_unchanged(name: str, meta, ref: CollectionRef, store=None) -> None:
    """For a user archive, refuse (as ingest does) when collection ``name`` was built from another archive
    of the same name, or the archive changed since (its source fingerprint: a file scan, no pixel decode).
    A synced archive whose fingerprint differs is compared file by file with the stored points (payloads,
    ``stat``, and the bytes of touched files, :func:`cbmir.ingest.sync.plan_sync`): only a real difference
    is refused. MedMNIST collections record no fingerprint: nothing to check.

    Raises:
        CbmirError: naming the collection, what changed and the command that fixes it (``cbmir ingest`` for a
            synced archive, ``--recreate`` for one ingested by an older cbmir).
    """
    from cbmir.core.splits import SPLITS
    from cbmir.ingest.job import check_fingerprint
    from cbmir.ingest.sources import open_source
    from cbmir.search.schema import uses_key_ids

    recorded = (meta.extra or {}).get("source_fingerprint")
    if not recorded:
        return
    src = open_source(ref.dataset, ref.size, **ref.archive.as_kwargs())
    if not (uses_key_ids(meta) and store is not None):
        current = dataclasses.replace(meta, extra={**meta.extra, "source_fingerprint": src.fingerprint()})
        check_fingerprint(name, meta, current, src)
        return
    from cbmir.ingest.sync import check_same_archive, plan_sync

    check_same_archive(name, meta, src)
    done = (meta.extra or {}).get("completed") or {}
    splits = tuple(sp for sp in SPLITS if sp in done or store.count(name, sp))
    now = src.fingerprint()
    if all(now.get(sp) == recorded.get(sp) for sp in splits) and not meta.extra.get("sync_pending"):
        return
    plan = plan_sync(src, store, name, splits, detect_moves=False)
    if plan.changes:
        raise CbmirError(f"collection {name!r}: the archive ({src.root}) changed since it was ingested "
                         f"({plan.differences()}). Run `cbmir ingest` with the same options to bring the "
                         "collection up to date (only new and changed files are embedded).")


def open_collection(store, ref: CollectionRef) -> tuple[str, object]:
    """``(name, meta)`` of the stored collection ``ref`` names, after the checks every reader needs
    (exists — with the random-init hint —, and for an archive: unchanged since ingest).

    Raises:
        CbmirError: as :func:`resolve_name`, :func:`stored_meta`, :func:`check_archive_unchanged`.
    """
    name = resolve_name(ref)
    meta = stored_meta(store, name, ref.random_init)
    check_archive_unchanged(name, meta, ref, store)
    return name, meta


def require_collection(store, name) -> str:
    """``name`` when it is one of the store's collections, checked **without using it as a path**: a
    name from a request (the HTTP service) is compared with :meth:`list_collections`, never joined to the
    store directory first.

    Raises:
        NotFoundError: not a collection of the store (names the existing ones).
    """
    have = store.list_collections()
    if not isinstance(name, str) or name not in have:
        shown = name if isinstance(name, str) and len(name) <= 200 else f"{str(name)[:200]}..."
        raise NotFoundError(f"collection {shown!r} does not exist in the {store.engine} store "
                            f"(existing: {', '.join(sorted(have)) or 'none'}); run `cbmir ingest` first")
    return name


def class_names(meta) -> dict[int, str]:
    """``{label: class name}`` recorded at ingest (MedMNIST ``INFO`` label names; archive folder or
    manifest labels); empty for collections made before class names were recorded."""
    names = (meta.extra or {}).get("class_names") or []
    return {i: str(n) for i, n in enumerate(names)}


def class_name(names: dict[int, str], label: int) -> str | None:
    """The class name of ``label`` (None for an unlabelled point, label -1); the label as text when the
    collection records no names."""
    if label is None or int(label) < 0:
        return None
    return names.get(int(label), str(int(label)))


def collection_info(store, name: str) -> dict:
    """What a user needs to pick a collection: ``{name, dataset, size, model, family, display_name, dim,
    distance, engine, counts: {split: n}, class_names: {label: name}, random_init, baseline, is_3d, busy,
    search_mode}`` (``search_mode``: ``exact``, or the approximate mode of :mod:`cbmir.search.index_config`).

    ``busy`` is None, or (embedded store) the message naming the process that holds the collection now;
    its ``counts`` are then empty (they cannot be read until it is done).

    Raises:
        CbmirError: unknown collection (naming the existing ones).
    """
    from cbmir.core.errors import StoreBusyError
    from cbmir.core.splits import SPLITS

    meta = store.meta(require_collection(store, name))
    spec = _spec_or_none(meta.model)
    busy = None
    try:
        counts = {sp: n for sp in SPLITS if (n := store.count(name, sp))}
    except StoreBusyError as exc:
        counts, busy = {}, str(exc)
    return {"name": name, "dataset": meta.dataset, "size": meta.size, "model": meta.model,
            "family": getattr(spec, "family", None), "display_name": getattr(spec, "display_name", meta.model),
            "dim": meta.dim, "distance": meta.distance, "engine": store.engine, "counts": counts,
            "class_names": {str(k): v for k, v in class_names(meta).items()}, "random_init": meta.random_init,
            "baseline": bool(spec is not None and spec.baseline),
            "is_3d": meta.is_3d, "busy": busy,
            "search_mode": meta.index_config().name}


def _spec_or_none(model: str):
    from cbmir.ingest.extractors import get_spec

    try:
        return get_spec(model)
    except CbmirError:
        return None

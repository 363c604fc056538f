"""Ingest: open the dataset or archive, build the extractor, embed, upsert (idempotent, resumable)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

from cbmir.app.collections import CollectionRef


def check_model_weights(ref: CollectionRef, weights: str | None = None) -> None:
    """Fail fast (seconds): the weights of ``ref``'s model can be obtained, checked before torch,
    TensorFlow or medmnist are imported and before the dataset is opened.

    Raises:
        CbmirError: unknown model; an input size the model does not take; weights unreachable or gated
            (naming the access step and ``--weights``).
    """
    from cbmir.ingest.extractors import check_input_size, check_weights, get_spec

    check_input_size(get_spec(ref.model_name), ref.input_size)
    check_weights(ref.model_name, weights=weights, random_init=ref.random_init, backend=ref.resolved_backend())


def ingest_collection(app, ref: CollectionRef, *, weights: str | None = None, recreate: bool = False,
                      splits: Sequence[str] = ("train", "test"), progress: bool = True, download: bool = True,
                      wrap: Callable | None = None, evaluable: bool = False, shard=None, index=None):
    """Embed the ``splits`` of ``ref``'s dataset and upsert them into its collection.

    Args:
        app: the :class:`~cbmir.app.context.App` (settings: data dir, device, batch size, threads, distance
            are taken from ``app.settings``; ``ref.distance`` wins when given).
        ref: dataset / archive, size, model and options.
        weights: a local weights file or directory (default: the model's own source).
        recreate: rebuild the collection beside the old one and swap it in when complete.
        splits: splits to ingest.
        download: fetch a missing MedMNIST file where a network exists.
        wrap: optional ``wrap(source, embedder) -> (source, embedder)`` (the grid's feature cache).
        evaluable: refuse, before embedding anything, a dataset the study's metrics cannot evaluate
            (multi-label, :func:`cbmir.evaluation.labels.check_single_label`): ``run`` and the grid.
        shard: :class:`cbmir.ingest.shards.Share` — embed only this share of every split (``--shard i/n``).
        index: :class:`cbmir.search.index_config.IndexConfig` — search mode of a new collection (None: exact,
            or the existing collection's own).

    Returns:
        ``(source, report)``: the opened source and :class:`cbmir.ingest.job.IngestReport`
        (``report.extra["model_load_s"]``: seconds to build the extractor). The timing of every split embedded
        in full is recorded in the collection metadata (:func:`cbmir.ingest.job.record_ingest_timings`).

    Raises:
        CbmirError: as :func:`check_model_weights`, the source readers and :func:`cbmir.ingest.job.ingest`.
    """
    check_model_weights(ref, weights)
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.job import ingest, record_ingest_timings
    from cbmir.ingest.sources import open_source

    s = app.settings
    source = open_source(ref.dataset, ref.size, data_dir=s.data_dir, download=download, **ref.archive.as_kwargs())
    backend = ref.resolved_backend()
    if s.threads and backend == "torch":
        import torch

        torch.set_num_threads(int(s.threads))
    t0 = time.perf_counter()
    extractor = create_extractor(ref.model_name, weights=weights, random_init=ref.random_init, device=s.device,
                                 batch_size=s.batch_size, backend=backend, input_size=ref.input_size,
                                 precision=s.precision, torch_compile=s.torch_compile)
    model_load_s = time.perf_counter() - t0
    embedder = make_embedder(extractor, size=ref.size, is_3d=source.is_3d, aggregation=ref.aggregation)
    if evaluable:
        from cbmir.evaluation.labels import check_single_label
        from cbmir.ingest.job import build_meta

        check_single_label(build_meta(source, embedder, distance=ref.distance), ref.dataset)
    if wrap is not None:
        source, embedder = wrap(source, embedder)
    report = ingest(source, embedder, app.store, splits=tuple(splits), batch_size=s.batch_size,
                    distance=ref.distance, recreate=recreate, progress=progress, shard=shard, index=index)
    report.extra["model_load_s"] = model_load_s
    report.extra["torch_compile"] = bool(getattr(extractor, "torch_compile", False))
    # for a later run that reuses the collection (the grid's Table 6); features replayed from a cache are not
    # an extraction time
    record_ingest_timings(app.store, report, replayed=bool(getattr(embedder, "replays_features", False)))
    return source, report

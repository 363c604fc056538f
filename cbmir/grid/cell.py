"""One cell of the grid: ingest (or reuse) one collection, evaluate it, return its results row.

Every *cell* is one run of the study's protocol (DESIGN.md §1): ingest the train split (database)
and the test split (queries) of one dataset at one size with one extractor into one collection, then
query every test image against the database (:func:`cbmir.evaluation.evaluate.evaluate_collection`).
The row's columns are :data:`cbmir.evaluation.results.COLUMNS`.

The cell runs through the application layer (:mod:`cbmir.app`, as ``cbmir run`` does), all in
:func:`_ingest_and_evaluate`; the rest of this module only reads what it returns.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.core.files import save_npz_atomic
from cbmir.core.input_size import input_size_label
from cbmir.evaluation.results import PER_QUERY_DIR, WARNINGS_SEP, software_versions
from cbmir.grid.cache import CACHE_DIR, FeatureCache, RecordingEmbedder, cache_wrappers
from cbmir.grid.config import Cell, GridConfig

__all__ = ["run_cell", "failed_row", "collection_for", "settings_for", "utc_now"]

_SPLITS = ("train", "test")


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second (``started_at`` / ``finished_at``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(e: BaseException, limit: int = 500) -> str:
    msg = " ".join(str(e).split())
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cell_ref(cell: Cell, aggregation: str = "concat"):
    """The :class:`cbmir.app.CollectionRef` of ``cell`` (what ``cbmir run`` with the same options names)."""
    from cbmir.app import CollectionRef

    return CollectionRef(dataset=cell.dataset, size=cell.size, model=cell.model, backend=cell.backend,
                         distance=cell.distance, aggregation=aggregation, random_init=cell.random_init,
                         input_size=cell.input_size)


def collection_for(cell: Cell, aggregation: str = "concat") -> str:
    """The collection of ``cell`` (:func:`cbmir.app.resolve_name`, as ``cbmir run`` names it)."""
    from cbmir.app import resolve_name

    return resolve_name(cell_ref(cell, aggregation))


def settings_for(config: GridConfig):
    """:class:`cbmir.core.settings.Settings` with the grid's paths, device, batch size and precision on top (checked:
    :func:`cbmir.app.load_settings`)."""
    from cbmir.app import load_settings

    return load_settings(data_dir=config.data_dir, store_path=config.store_path, qdrant_url=config.qdrant_url,
                         device=config.device, batch_size=config.batch_size, precision=config.precision,
                         torch_compile=config.torch_compile)


def _store_location(settings) -> str:
    return str(settings.qdrant_url) if settings.qdrant_url else str(Path(settings.store_path).resolve())


def _resolved_device(device: str) -> str:
    if device not in (None, "auto"):
        return str(device)
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def _torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


@dataclass
class _CellRun:
    """What :func:`_ingest_and_evaluate` measured: the ingest report ``rep``, the evaluation ``ev``
    and the ingest ``timing`` per split (seconds) with its ``notes``."""

    spec: Any
    name: str
    store_loc: str
    model_load_s: float
    n_rows: dict[str, int]
    rep: Any
    ev: Any
    replay: bool
    timing: dict[str, float]
    notes: list[str]


def run_cell(cell: Cell, config: GridConfig, *, results_dir: Path, ingest_log: dict,
             twins: Sequence[Cell] = (), settings=None) -> dict:
    """Run one cell (ingest or reuse, evaluate) and return its results row (see
    :data:`cbmir.evaluation.results.COLUMNS`).

    Args:
        cell: the cell.
        config: the grid configuration (paths, k, batch size, ...).
        results_dir: directory of the results table (per-query files, feature cache, ingest log).
        ingest_log: ``{"<store>|<collection>": {...}}`` timings of earlier ingests; updated in place.
        twins: cells still to run that share this cell's features (other distance); when given,
            this cell records its features in the feature cache for them.
        settings: :class:`cbmir.core.settings.Settings` (default: from ``config``).

    Returns:
        The row dict with ``status == "ok"``.

    Raises:
        CbmirError or any exception of the pipeline: the caller records the failure.
    """
    s = settings or settings_for(config)
    t_cell = time.perf_counter()
    started = utc_now()
    cache = FeatureCache(results_dir / CACHE_DIR, "_".join(map(str, cell.features_key)).lower())
    run = _ingest_and_evaluate(cell, config, s, cache=cache, ingest_log=ingest_log, twins=twins)
    per_query_file = _save_per_query(run.ev, run.name, results_dir) if config.save_per_query else ""
    row = _ok_row(cell, run, device=_resolved_device(s.device), per_query_file=per_query_file, started=started)
    row["cell_wall_s"] = time.perf_counter() - t_cell
    if run.replay and not twins:
        cache.remove()  # every twin has used it
    return row


# ----------------------------------------------------------------------------- the wiring
def _ingest_and_evaluate(cell: Cell, config: GridConfig, s, *, cache: FeatureCache, ingest_log: dict,
                         twins: Sequence[Cell]) -> _CellRun:
    """THE WIRING of a cell, through the application layer (:mod:`cbmir.app`, the functions ``cbmir run``
    uses): ingest (reusing, resuming, or replaying the features a twin cell cached), record the ingest
    timings in ``ingest_log``, evaluate. Any dataset ``cbmir run`` takes works here, user archives too.

    Raises:
        CbmirError: unknown model, ``k`` above the database size, a collection of another
            backend / random_init; any exception of the pipeline.
    """
    from cbmir.app import App
    from cbmir.app.evaluating import evaluate
    from cbmir.app.ingesting import ingest_collection
    from cbmir.ingest.extractors import get_spec

    spec = get_spec(cell.model)  # unknown model: CbmirError naming the valid ones
    ref = cell_ref(cell, config.volume_aggregation)
    store_loc = _store_location(s)
    state: dict[str, Any] = {}
    with App(s) as app:
        name = collection_for(cell, config.volume_aggregation)

        def with_cache(source, embedder):
            # What is already in the store decides reuse / resume and how timings are read.
            # (a split found complete is reused; a partial one resumes; features of a twin are replayed)
            n_rows = {sp: int(source.split_size(sp)) for sp in _SPLITS}
            if config.k > n_rows["train"]:  # validate_grid catches MedMNIST flags; this covers any other source
                raise CbmirError(f"k {config.k} exceeds the {n_rows['train']} database points of "
                                 f"{cell.dataset}@{cell.size}")
            existing = app.store.read_meta(name)
            before = {sp: (app.store.count(name, sp) if existing is not None else 0) for sp in _SPLITS}
            replay = all(cache.complete(sp, n_rows[sp], int(embedder.dim)) for sp in _SPLITS) and not all(
                before[sp] >= n_rows[sp] for sp in _SPLITS)
            src, emb = cache_wrappers(source, embedder, cache, replay=replay, record=bool(twins))
            state.update(n_rows=n_rows, replay=replay, embedder=emb)
            return src, emb

        try:
            _, rep = ingest_collection(app, ref, weights=config.weights.get(cell.model), splits=_SPLITS,
                                       progress=config.progress, download=config.download, wrap=with_cache,
                                       evaluable=True)
        finally:
            if isinstance(state.get("embedder"), RecordingEmbedder):
                state["embedder"].flush()
        _check_meta(rep.collection, rep.meta, cell)
        timing, notes = _ingest_timings(rep, state["n_rows"], state["replay"],
                                        ingest_log.setdefault(f"{store_loc}|{rep.collection}", {}))
        ev, _ = evaluate(app, rep.collection, k=config.k, latency_sample=config.latency_sample,
                         progress=config.progress)
    return _CellRun(spec=spec, name=rep.collection, store_loc=store_loc, model_load_s=rep.extra["model_load_s"],
                    n_rows=state["n_rows"], rep=rep, ev=ev, replay=state["replay"], timing=timing, notes=notes)


# ----------------------------------------------------------------------------- end of the wiring


def _check_meta(name: str, meta, cell: Cell) -> None:
    if meta.random_init != cell.random_init or meta.backend != cell.backend:
        raise CbmirError(f"{name}: the collection holds backend={meta.backend} random_init={meta.random_init}, "
                         f"the grid asked for backend={cell.backend} random_init={cell.random_init}")


def _ingest_timings(rep, n_rows: dict[str, int], replay: bool, entry: dict) -> tuple[dict[str, float], list[str]]:
    """Database / query ingest seconds per split: measured now, or, when the split was reused, from the ingest
    log ``entry`` or else from the timings recorded in the collection metadata (an earlier ``cbmir run`` or grid:
    :func:`cbmir.ingest.job.record_ingest_timings`); extrapolated to the whole split when it resumed. Updates ``entry``
    (the log of this collection) in place with every split measured now.

    Returns:
        ``(timing, notes)``: seconds per split, and one note per split not measured in full.
    """
    from cbmir.ingest.job import TIMINGS_KEY

    notes, timing = [], {}
    recorded = (rep.meta.extra or {}).get(TIMINGS_KEY) or {}
    for sp in _SPLITS:
        if sp in rep.skipped:
            prev = entry.get(sp) or recorded.get(sp)
            timing[sp] = float(prev["seconds"]) if prev else float("nan")
            where = "" if entry.get(sp) or not prev else " recorded in the collection"
            notes.append(f"{sp}: reused collection, " + (f"time of the ingest of {prev['at']}{where}" if prev
                                                         else "no earlier timing known"))
            continue
        secs, written = float(rep.seconds[sp]), int(rep.written[sp])
        if written < n_rows[sp]:  # resumed: extrapolate from the rows written in this run
            full = secs * n_rows[sp] / written if written else float("nan")
            had = int(getattr(rep, "resumed_from", {}).get(sp, n_rows[sp] - written))
            notes.append(f"{sp}: resumed with {had} of {n_rows[sp]} rows stored, time extrapolated from "
                         f"the {written} rows embedded in this run")
        else:
            full = secs
        if replay:
            notes.append(f"{sp}: features replayed from the cache of the other-distance cell "
                         "(time = upsert only)")
        timing[sp] = full
        entry[sp] = {"seconds": full, "at": utc_now(), "replayed": bool(replay)}
    return timing, notes


def _save_per_query(ev, name: str, results_dir: Path) -> str:
    """Write the per-query npz of evaluation ``ev``; its path relative to ``results_dir``."""
    rel = Path(PER_QUERY_DIR) / f"{name}.npz"
    save_npz_atomic(results_dir / rel, query_indices=ev.query_indices.astype(np.int64),
                    query_labels=ev.query_labels.astype(np.int64),
                    topk_indices=ev.topk_indices.astype(np.int64),
                    topk_labels=ev.topk_labels.astype(np.int64),
                    topk_scores=ev.topk_scores.astype(np.float32), k=np.int64(ev.k),
                    distance=np.str_(ev.distance), collection=np.str_(name))
    return rel.as_posix()


#: ``timing_note`` of a cell whose collection was ingested with ``--torch-compile`` (its timings are not eager ones)
COMPILED_NOTE = "ingested with torch.compile (one-off compile included)"


def _compiled_note(meta) -> list[str]:
    """``["train, test: " + COMPILED_NOTE]`` for the splits whose recorded ingest ran through ``torch.compile``
    (:func:`cbmir.ingest.job.record_ingest_timings`), else ``[]``."""
    from cbmir.ingest.job import TIMINGS_KEY

    recorded = (meta.extra or {}).get(TIMINGS_KEY) or {}
    splits = [sp for sp in _SPLITS if (recorded.get(sp) or {}).get("torch_compile")]
    return [f"{', '.join(splits)}: {COMPILED_NOTE}"] if splits else []


def _ok_row(cell: Cell, run: _CellRun, *, device: str, per_query_file: str, started: str) -> dict:
    """The results row of a cell that ran (metrics in percent; ``cell_wall_s`` is added by the caller)."""
    ev, meta, rep, timing = run.ev, run.rep.meta, run.rep, run.timing
    metrics = {m: 100.0 * float(v) for m, v in ev.metrics.items()}
    return {
        "dataset": cell.dataset, "size": int(cell.size), "model": cell.model, "backend": cell.backend,
        "distance": cell.distance, "random_init": bool(cell.random_init), "status": "ok", "error": "",
        "input_size": input_size_label(cell.input_size),
        "family": "handcrafted baseline" if run.spec.baseline else run.spec.family,
        "collection": run.name, "engine": ev.engine, "store": run.store_loc, "weights": meta.weights,
        "dim": int(meta.dim), "is_3d": bool(meta.is_3d), "aggregation": meta.aggregation, "k": int(ev.k),
        "n_queries": int(ev.n_queries), "n_database": int(ev.n_database), "device": device,
        "threads": _torch_threads(), "precision": str((meta.extra or {}).get("precision", "")),
        **metrics,
        "majority_class_rate": 100.0 * ev.majority_class_rate,
        "leave_one_out": bool(ev.leave_one_out), "n_unlabelled_queries": int(ev.n_unlabelled_queries),
        "n_unlabelled_database": int(ev.n_unlabelled_database), "label_task": str(ev.label_task or ""),
        "warnings": WARNINGS_SEP.join(ev.warnings),
        "model_load_s": run.model_load_s,
        "database_creation_s": timing["train"],
        "database_items_per_s": run.n_rows["train"] / timing["train"] if timing["train"] > 0 else float("nan"),
        "query_extraction_s": timing["test"],
        "search_s": ev.timings["search_s"],
        "test_time_s": timing["test"] + ev.timings["search_s"],
        "search_per_query_ms": ev.timings["search_per_query_ms"],
        "latency_p50_ms": ev.timings["latency_p50_ms"], "latency_p95_ms": ev.timings["latency_p95_ms"],
        "fetch_s": ev.timings["fetch_s"],
        "timing_note": "; ".join([*run.notes, *_compiled_note(meta)]),
        "train_reused": "train" in rep.skipped, "test_reused": "test" in rep.skipped,
        "features_cached": bool(run.replay), "per_query_file": per_query_file,
        "started_at": started, "finished_at": utc_now(),
        **software_versions(),
    }


def failed_row(cell: Cell, error: BaseException, started: str, wall: float) -> dict:
    """The results row of a cell that raised ``error`` (``status == "failed"``, the error on one line)."""
    return {
        "dataset": cell.dataset, "size": int(cell.size), "model": cell.model, "backend": cell.backend,
        "distance": cell.distance, "random_init": bool(cell.random_init), "status": "failed",
        "input_size": input_size_label(cell.input_size),
        "error": _one_line(error), "cell_wall_s": wall, "started_at": started, "finished_at": utc_now(),
        **software_versions(),
    }

"""The results table of the benchmark grid and its per-query files: columns, reading, writing.

The grid (:mod:`cbmir.grid`) writes **one tidy table** (CSV, or Parquet for a ``.parquet`` path), one
row per cell, keyed by :data:`KEY` = ``(dataset, size, model, backend, distance, random_init, input_size)``; the
report (:mod:`cbmir.evaluation.report`) reads it. The table is rewritten atomically (temporary file +
``os.replace``) after every cell, so an interrupted grid loses at most the cell in progress. Columns
(:data:`COLUMNS`; units in the names or below):

* key and status: ``dataset`` (MedMNIST flag), ``size`` (px / volume side), ``model``,
  ``backend``, ``distance`` (``cosine`` | ``euclidean``), ``random_init`` (bool), ``status``
  (``ok`` | ``failed``), ``error`` (one line, ``ExceptionType: message``; empty when ok), ``input_size``
  (CNN input-size policy: ``native``, the study's, or a side such as ``224``; ``native`` in older tables);
* identity: ``family``, ``collection``, ``engine``, ``store``, ``weights`` (identity recorded in
  the collection: hub id, ``sha256:...``, ``random-init`` or ``none``), ``dim``, ``is_3d``,
  ``aggregation``, ``k``, ``n_queries``, ``n_database``, ``device``, ``threads`` (torch CPU threads),
  ``precision`` (the forward-pass precision the collection was built with: ``fp32``, ``bf16-autocast``,
  ``fp16-autocast``; empty when not recorded: no torch extractor, or an older collection);
* metrics, **percent** (0-100), as the study prints them: ``mAP@5, mMV@5, ACC@1, ACC@3, ACC@5``
  and ``majority_class_rate`` (ACC@1 of always answering the database's majority class);
* evaluation rules (:mod:`cbmir.evaluation.labels`, the README section "Metrics"): ``leave_one_out`` (bool: query
  split = database split, each query's own point excluded), ``n_unlabelled_queries`` (label -1, not scored),
  ``n_unlabelled_database`` (searched, never relevant), ``label_task`` (``binary-class``, ``ordinal-regression``
  ...; empty when not recorded), ``warnings`` (the evaluation's one-line warnings joined by ``" | "``: all-zero
  query vectors, a collapsed collection; empty when none);
* timings: ``model_load_s`` (building the extractor), ``database_creation_s`` (extract + upsert
  the train split), ``database_items_per_s``, ``query_extraction_s`` (extract + upsert the test
  split), ``search_s`` (all queries, batched, exact), ``test_time_s`` (= query extraction +
  search, the study's "test phase"), ``search_per_query_ms``, ``latency_p50_ms``,
  ``latency_p95_ms`` (single-query latency), ``fetch_s`` (reading the points back),
  ``cell_wall_s`` (whole cell), ``timing_note`` (how a timing was obtained when not measured in
  full in this run: reused collection, resumed split, features replayed from the cache);
* provenance: ``train_reused`` / ``test_reused`` (split found complete in the store),
  ``features_cached`` (vectors replayed from the twin cell of the other distance),
  ``per_query_file`` (npz, relative to the results directory), ``started_at`` /
  ``finished_at`` (UTC ISO 8601), ``cbmir_version``, ``torch_version``, ``timm_version``,
  ``qdrant_edge_version``, ``numpy_version``, ``python_version``.

Per-query results: ``<results dir>/per_query/<collection>.npz`` with ``query_indices`` int64 (Q,),
``query_labels`` int64 (Q,), ``topk_indices`` int64 (Q, k) (database rows, rank order),
``topk_labels`` int64 (Q, k), ``topk_scores`` float32 (Q, k) (cosine similarity, higher is closer,
or Euclidean distance, lower is closer), ``k``, ``distance``, ``collection``. Every metric can be
recomputed from them (:func:`per_query_outcomes`); the report's confidence intervals and paired
tests read them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np
import pandas as pd

from cbmir.core.errors import CbmirError
from cbmir.core.files import atomic_write

__all__ = [
    "KEY",
    "COLUMNS",
    "METRIC_COLUMNS",
    "PER_QUERY_DIR",
    "WARNINGS_SEP",
    "warnings_of",
    "read_results",
    "write_results",
    "upsert_row",
    "to_frame",
    "key_of",
    "input_size_of",
    "k_of",
    "to_bool",
    "load_per_query",
    "per_query_outcomes",
    "software_versions",
]

#: Columns that identify a cell (one row per key in the results table).
KEY: tuple[str, ...] = ("dataset", "size", "model", "backend", "distance", "random_init", "input_size")

#: Metric columns (percent), as in :data:`cbmir.evaluation.reference.METRICS`.
METRIC_COLUMNS: tuple[str, ...] = ("mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5")

#: Every column of the results table, in order (see the module docstring for units).
COLUMNS: tuple[str, ...] = (
    *KEY, "status", "error",
    "family", "collection", "engine", "store", "weights", "dim", "is_3d", "aggregation", "k",
    "n_queries", "n_database", "device", "threads", "precision",
    *METRIC_COLUMNS, "majority_class_rate",
    "leave_one_out", "n_unlabelled_queries", "n_unlabelled_database", "label_task", "warnings",
    "model_load_s", "database_creation_s", "database_items_per_s", "query_extraction_s", "search_s",
    "test_time_s", "search_per_query_ms", "latency_p50_ms", "latency_p95_ms", "fetch_s", "cell_wall_s",
    "timing_note", "train_reused", "test_reused", "features_cached", "per_query_file",
    "started_at", "finished_at",
    "cbmir_version", "torch_version", "timm_version", "qdrant_edge_version", "numpy_version",
    "python_version",
)

#: Folder of the per-query files, relative to the results table's folder.
PER_QUERY_DIR = "per_query"

_BOOL_COLUMNS = ("random_init", "is_3d", "train_reused", "test_reused", "features_cached", "leave_one_out")

#: Separator of the evaluation's warnings in the ``warnings`` column (one cell per row).
WARNINGS_SEP = " | "


# ----------------------------------------------------------------------------- the table
def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The results table at ``path``: CSV, or Parquet when it ends in ``.parquet`` (empty, with
    :data:`COLUMNS`, when the file does not exist).

    Types: ``size`` int, boolean columns bool, metrics and timings float; extra columns kept.

    Raises:
        CbmirError: the file exists but lacks a :data:`KEY` column or does not parse.
    """
    p = Path(path)
    if not p.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    try:
        df = pd.read_parquet(p, engine="pyarrow") if _is_parquet(p) else pd.read_csv(p, keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one line naming the file
        raise CbmirError(f"results table {p} does not parse as {'Parquet' if _is_parquet(p) else 'CSV'}: "
                         f"{e}") from None
    missing = [c for c in KEY if c not in df.columns and c != "input_size"]  # input_size: native before issue 18
    if missing:
        raise CbmirError(f"results table {p} lacks key column(s) {missing}; is it a cbmir results table?")
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    df["size"] = df["size"].astype(int)
    for c in _BOOL_COLUMNS:
        df[c] = df[c].map(to_bool)
    for c in ("dataset", "model", "backend", "distance", "status"):
        df[c] = df[c].astype(str)
    df["input_size"] = df["input_size"].map(input_size_of)
    df["error"] = ["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in df["error"]]
    return df


def to_bool(v) -> bool:
    """A table cell read as a boolean: ``True``/``"true"``/``"1"``/``"yes"`` -> True; NaN, None, else False."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return False
    return str(v).strip().lower() in ("true", "1", "yes")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def warnings_of(v) -> list[str]:
    """The evaluation warnings of a ``warnings`` cell (:data:`WARNINGS_SEP`-joined text); ``[]`` for an empty or
    missing cell (NaN, None: older tables)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return []
    return [w.strip() for w in str(v).split(WARNINGS_SEP) if w.strip() and w.strip() != "nan"]


def key_of(row: Mapping) -> tuple:
    """The :data:`KEY` of a row, typed (``size`` int, ``random_init`` bool); a ``native`` row leaves out
    ``input_size`` (its key as before the column existed, so older tables keep their keys)."""
    ins = input_size_of(row.get("input_size"))
    return (str(row["dataset"]), int(row["size"]), str(row["model"]), str(row["backend"]),
            str(row["distance"]), to_bool(row["random_init"]), *([ins] if ins != "native" else []))


def input_size_of(v) -> str:
    """A table's ``input_size`` value as its label: ``native`` (also for a missing value: older tables) or
    the side as text (``224``, also when read back as ``224.0``)."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip().lower() in ("", "native", "nan"):
        return "native"
    return str(int(float(v)))


def k_of(row: Mapping) -> int | None:
    """The row's recorded ``k`` (None when not recorded: old tables, failed rows)."""
    v = row.get("k")
    try:
        return None if v is None or v == "" or pd.isna(v) else int(float(v))
    except (TypeError, ValueError):
        return None


def write_results(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` atomically (:func:`cbmir.core.files.atomic_write`).

    CSV, or Parquet (pyarrow) when ``path`` ends in ``.parquet``. Columns are ordered as
    :data:`COLUMNS`, extra columns after them.
    """
    p = Path(path)
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]

    def write(fh: IO[bytes]) -> None:
        if _is_parquet(p):
            out = df[cols].copy()
            for c in out.columns[out.dtypes == object]:  # noqa: E721 - elementwise; mixed str/NaN columns -> str or null
                out[c] = out[c].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                                    else str(v))
            out.to_parquet(fh, index=False, engine="pyarrow")
        else:
            fh.write(df[cols].to_csv(index=False, lineterminator="\n").encode("utf-8"))

    atomic_write(p, write)


def upsert_row(records: list[dict], row: dict) -> list[dict]:
    """``records`` without the row of ``row``'s key, then ``row`` (a new list)."""
    key = key_of(row)
    return [r for r in records if key_of(r) != key] + [{c: row.get(c, np.nan) for c in COLUMNS}]


def to_frame(records: list[dict]) -> pd.DataFrame:
    """The table of ``records``: :data:`COLUMNS`, then any extra columns in first-seen order."""
    extra = [c for r in records for c in r if c not in COLUMNS]
    cols = list(COLUMNS) + list(dict.fromkeys(extra))
    return pd.DataFrame.from_records(records, columns=cols)


# ----------------------------------------------------------------------------- provenance
def software_versions() -> dict[str, str]:
    """Versions recorded in every row: cbmir, torch, timm, qdrant-edge-py, numpy, Python.

    Read from installed package metadata (nothing is imported); ``"n/a"`` when not installed.
    """
    from importlib import metadata

    import cbmir

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "n/a"

    return {
        "cbmir_version": getattr(cbmir, "__version__", "n/a"),
        "torch_version": v("torch"),
        "timm_version": v("timm"),
        "qdrant_edge_version": v("qdrant-edge-py"),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }


# ----------------------------------------------------------------------------- per-query results
def load_per_query(path: str | os.PathLike) -> dict[str, Any]:
    """Read a per-query npz written by the grid (arrays as in the module docstring; ``k`` int,
    ``distance`` and ``collection`` str).

    Raises:
        CbmirError: the file is missing or lacks an expected array.
    """
    p = Path(path)
    if not p.is_file():
        raise CbmirError(f"per-query file {p} does not exist (run the grid with --save-per-query)")
    with np.load(p, allow_pickle=False) as z:
        need = ("query_indices", "query_labels", "topk_indices", "topk_labels", "topk_scores", "k")
        missing = [n for n in need if n not in z.files]
        if missing:
            raise CbmirError(f"per-query file {p} lacks {missing}")
        out = {n: z[n] for n in z.files}
    out["k"] = int(out["k"])
    for n in ("distance", "collection"):
        if n in out:
            out[n] = str(out[n])
    return out


def per_query_outcomes(per_query: Mapping[str, Any], k: int | None = None) -> dict[str, np.ndarray]:
    """Per-query metric outcomes recomputed from a per-query record (:func:`load_per_query`).

    Returns:
        ``{"mAP@k": AP@k, "mMV@k": MV@k, "ACC@1", "ACC@3", "ACC@k"}``, each float64 (Q,) with
        values in [0, 1] (named like the results table's metric columns, whose values are the
        means of these arrays times 100).
    """
    from cbmir.evaluation.metrics import per_query_metrics

    k = int(per_query["k"] if k is None else k)
    pq = per_query_metrics(np.asarray(per_query["query_labels"]), np.asarray(per_query["topk_labels"]), k)
    return {("m" + n if n.startswith(("AP", "MV")) else n): v for n, v in pq.items()}

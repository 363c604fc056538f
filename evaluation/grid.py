"""The benchmark grid: datasets x sizes x models (x backends x distances), resumable, one tidy table.

Every *cell* of the grid is one run of the study's protocol (DESIGN.md §1): ingest the train split
(database) and the test split (queries) of one dataset at one size with one extractor into one
collection, then query every test image against the database (:func:`cbmir.evaluation.evaluate.evaluate_collection`).

Results go to **one tidy table** (``--results``, default ``results/results.csv``; Parquet for a ``.parquet`` path), one row per
cell, keyed by :data:`KEY` = ``(dataset, size, model, backend, distance, random_init, input_size)``. The table
is rewritten atomically (temporary file + ``os.replace``) after every cell, so an interrupted grid
loses at most the cell in progress. Columns (:data:`COLUMNS`; units in the names or below):

* key and status: ``dataset`` (MedMNIST flag), ``size`` (px / volume side), ``model``,
  ``backend``, ``distance`` (``cosine`` | ``euclidean``), ``random_init`` (bool), ``status``
  (``ok`` | ``failed``), ``error`` (one line, ``ExceptionType: message``; empty when ok), ``input_size``
  (CNN input-size policy: ``native``, the study's, or a side such as ``224``; ``native`` in older tables);
* identity: ``family``, ``collection``, ``engine``, ``store``, ``weights`` (identity recorded in
  the collection: hub id, ``sha256:...``, ``random-init`` or ``none``), ``dim``, ``is_3d``,
  ``aggregation``, ``k``, ``n_queries``, ``n_database``, ``device``, ``threads`` (torch CPU threads);
* metrics, **percent** (0-100), as the study prints them: ``mAP@5, mMV@5, ACC@1, ACC@3, ACC@5``
  and ``majority_class_rate`` (ACC@1 of always answering the database's majority class);
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

Resuming: a cell whose row has ``status == ok`` is skipped without touching the store or the model;
``failed`` rows are retried (``retry_failed=False`` skips them too). A complete collection is
reused (the ingest job skips complete splits); an interrupted one resumes at its first missing row.
Timings of an earlier ingest are kept in ``ingest_log.json`` beside the table, so a reused
collection still reports its database-creation time.

A failure in one cell (unknown model, weights unavailable, a dataset file or size that does not
exist, ...) becomes a ``failed`` row with its reason, and the grid goes on.

Per-query results (``save_per_query``): ``<results dir>/per_query/<collection>.npz`` with
``query_indices`` int64 (Q,), ``query_labels`` int64 (Q,), ``topk_indices`` int64 (Q, k) (database
rows, rank order), ``topk_labels`` int64 (Q, k), ``topk_scores`` float32 (Q, k) (cosine similarity,
higher is closer, or Euclidean distance, lower is closer), ``k``, ``distance``, ``collection``.
Every metric can be recomputed from them (:func:`per_query_outcomes`); the report's confidence
intervals and paired tests read them.

Two distances of the same (dataset, size, model, backend, random_init) need two collections (the
engine stores cosine vectors normalised). The grid extracts the features once: the first cell
records them in ``<results dir>/.feature_cache/`` and the second replays them (``features_cached``
is then True and its extraction timings are those of the replay, i.e. mostly the upsert).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cbmir.core.errors import CbmirError
from cbmir.core.input_size import input_size_label, parse_input_size
from cbmir.core.splits import CODE_SPLITS, SPLIT_CODES

from cbmir.ingest.base import Batch
__all__ = [
    "KEY",
    "COLUMNS",
    "METRIC_COLUMNS",
    "GridConfig",
    "Cell",
    "GridSummary",
    "load_grid_file",
    "expand_cells",
    "read_results",
    "write_results",
    "run_grid",
    "run_cell",
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
    "n_queries", "n_database", "device", "threads",
    *METRIC_COLUMNS, "majority_class_rate",
    "model_load_s", "database_creation_s", "database_items_per_s", "query_extraction_s", "search_s",
    "test_time_s", "search_per_query_ms", "latency_p50_ms", "latency_p95_ms", "fetch_s", "cell_wall_s",
    "timing_note", "train_reused", "test_reused", "features_cached", "per_query_file",
    "started_at", "finished_at",
    "cbmir_version", "torch_version", "timm_version", "qdrant_edge_version", "numpy_version",
    "python_version",
)

_BOOL_COLUMNS = ("random_init", "is_3d", "train_reused", "test_reused", "features_cached")
_INGEST_LOG = "ingest_log.json"
_CACHE_DIR = ".feature_cache"
_PER_QUERY_DIR = "per_query"


# ----------------------------------------------------------------------------- configuration
def _as_list(value, cast=str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").split(",")]
    elif isinstance(value, (int, float)):  # a scalar (``sizes: 28``): a one-element list
        value = [value]
    return [cast(v.strip()) if isinstance(v, str) else cast(v) for v in value if str(v).strip()]


def _as_sizes(value) -> list[int]:
    try:
        return _as_list(value, int)
    except (TypeError, ValueError) as e:
        raise CbmirError(f"sizes must be integers (e.g. 28,64), got {value!r}") from e


def _as_int(key: str, value, minimum: int = 1) -> int:
    """Integer setting ``key`` (``5`` or ``"5"``); CbmirError naming the key and the value otherwise."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < minimum:
        raise CbmirError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return n


@dataclass
class GridConfig:
    """What to run and where to write it.

    Attributes:
        datasets: MedMNIST flags (``breastmnist``, ``adrenalmnist3d`` ...). In a grid file this may
            instead be a mapping ``{dataset: [sizes]}`` (see :func:`load_grid_file`).
        models: extractor names (``cbmir models``), e.g. ``hog``, ``resnet50``.
        sizes: image sides (px) for every dataset without its own list in ``dataset_sizes``.
        dataset_sizes: per-dataset sizes, overriding ``sizes`` for that dataset.
        backends: extractor backends (``torch``, ``keras``); a model that lists a single backend
            (``hog``: ``numpy``) always uses it.
        distances: ``cosine`` and/or ``euclidean``.
        input_sizes: CNN input-size policies (``native`` and/or sides such as 224; None = native); models
            with their own fixed preprocessing (HOG, foundation models) run at ``native`` only.
        random_init: random weights for models that have weights (smoke runs; rows are labelled
            RANDOM-INIT in every report). Weights-free models (``hog``) are unaffected.
        weights: optional ``{model: local weights file}``.
        results: the results CSV; its directory also holds ``per_query/``, ``ingest_log.json``.
        data_dir, store_path, qdrant_url: as the ``CBMIR_*`` settings (None: settings' value).
        device: ``auto``, ``cpu``, ``cuda``; batch_size: items per extraction batch (None:
            settings' value).
        k: top-k cut-off (the study: 5).
        volume_aggregation: 3D slice aggregation (``concat``, the study's).
        save_per_query: write the per-query npz of each cell.
        retry_failed: re-run cells whose row says ``failed`` (default) instead of skipping them.
        download: let the dataset reader download missing files.
        latency_sample: queries timed one by one for the latency percentiles.
        threads: torch intra-op CPU threads for the run (None: ``CBMIR_THREADS``, else torch's default). On a shared,
            oversubscribed CPU one thread is several times faster (OpenMP threads spin-wait).
        progress: show tqdm progress bars.
    """

    datasets: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=lambda: [28])
    dataset_sizes: dict[str, list[int]] = field(default_factory=dict)
    backends: list[str] = field(default_factory=lambda: ["torch"])
    distances: list[str] = field(default_factory=lambda: ["cosine"])
    input_sizes: list = field(default_factory=lambda: [None])
    random_init: bool = False
    weights: dict[str, str] = field(default_factory=dict)
    results: Path = Path("results/results.csv")
    data_dir: Path | None = None
    store_path: Path | None = None
    qdrant_url: str | None = None
    device: str | None = None
    batch_size: int | None = None
    k: int = 5
    volume_aggregation: str = "concat"
    save_per_query: bool = False
    retry_failed: bool = True
    download: bool = False
    latency_sample: int = 50
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.datasets, Mapping):
            mapping = dict(self.datasets)
            self.datasets = list(mapping)
            for d, s in mapping.items():
                if s is not None:
                    self.dataset_sizes[d] = _as_sizes(s)
        self.datasets = [d.lower() for d in _as_list(self.datasets)]
        self.dataset_sizes = {str(d).lower(): _as_sizes(s) for d, s in dict(self.dataset_sizes).items()}
        self.models = [m.lower() for m in _as_list(self.models)]
        self.sizes = _as_sizes(self.sizes)
        self.backends = [b.lower() for b in _as_list(self.backends)] or ["torch"]
        self.distances = [d.lower() for d in _as_list(self.distances)] or ["cosine"]
        self.input_sizes = list(dict.fromkeys(parse_input_size(v, option="input_sizes")
                                              for v in _as_list(self.input_sizes, lambda v: v))) or [None]
        bad = [d for d in self.distances if d not in ("cosine", "euclidean")]
        if bad:
            raise CbmirError(f"unknown distance(s) {bad}; valid: cosine, euclidean")
        self.weights = {str(k).lower(): str(v) for k, v in dict(self.weights or {}).items()}
        self.results = Path(self.results).expanduser()
        for name in ("data_dir", "store_path"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, Path(v).expanduser())
        self.k = _as_int("k", self.k)
        self.latency_sample = _as_int("latency_sample", self.latency_sample)
        for name in ("batch_size", "threads"):
            if getattr(self, name) is not None:
                setattr(self, name, _as_int(name, getattr(self, name)))
        for name in ("random_init", "save_per_query", "retry_failed", "download", "progress"):
            if not isinstance(getattr(self, name), (bool, int)):  # a string "false" would read as true
                raise CbmirError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides) -> "GridConfig":
        """Config from a mapping (a parsed grid file) with non-None ``overrides`` on top.

        Keys use the attribute names; ``-`` may stand for ``_`` (``random-init``). ``results_dir``
        is accepted as ``results = <results_dir>/results.csv``.

        Raises:
            CbmirError: an unknown key (the message lists the valid ones).
        """
        data = {str(k).replace("-", "_"): v for k, v in dict(data or {}).items()}
        if "results_dir" in data:
            data.setdefault("results", Path(data.pop("results_dir")) / "results.csv")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise CbmirError(f"unknown grid setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls(**merged)
        except (TypeError, ValueError) as exc:  # a value of the wrong type: find and name its key
            for key, value in merged.items():
                try:
                    cls(**{key: value})
                except (TypeError, ValueError) as e:
                    raise CbmirError(f"grid setting {key} = {value!r} has the wrong type ({e})") from None
            raise CbmirError(f"invalid grid settings ({exc})") from None


def load_grid_file(path: str | os.PathLike) -> dict:
    """Read a grid file: YAML (``.yaml``/``.yml``) or TOML (``.toml``); keys as :class:`GridConfig`.

    Example (YAML)::

        models: [hog, vgg19, resnet50]
        distances: [cosine, euclidean]
        random_init: true
        datasets:               # a list (sizes from `sizes`) or a mapping dataset -> sizes
          breastmnist: [28]
          adrenalmnist3d: [28, 64]
        results: /tmp/grid/results.csv
        store_path: /tmp/grid/store

    Raises:
        CbmirError: the file is missing, has another suffix, does not parse, or is not a mapping.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CbmirError(f"grid file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise CbmirError(f"grid file {p}: use a .yaml, .yml or .toml file")
    except CbmirError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        msg, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)  # YAML: problem and place
        if msg and mark is not None:
            msg = f"{msg} (at line {mark.line + 1}, column {mark.column + 1})"
        raise CbmirError(f"grid file {p} does not parse: {' '.join(str(msg or e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CbmirError(f"grid file {p} must hold a mapping of settings, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Cell:
    """One cell of the grid (its :data:`KEY`)."""

    dataset: str
    size: int
    model: str
    backend: str
    distance: str
    random_init: bool
    input_size: int | None = None

    @property
    def key(self) -> tuple:
        """The cell's :data:`KEY` values; a ``native`` cell leaves out ``input_size`` (its key as before the
        column existed, so older tables and their rows keep their keys)."""
        return (self.dataset, int(self.size), self.model, self.backend, self.distance, bool(self.random_init),
                *([input_size_label(self.input_size)] if self.input_size is not None else []))

    @property
    def features_key(self) -> tuple:
        """Cells with the same features (they differ only in distance)."""
        return (self.dataset, int(self.size), self.model, self.backend, bool(self.random_init),
                *([f"in{self.input_size}"] if self.input_size is not None else []))

    def label(self) -> str:
        ri = " RANDOM-INIT" if self.random_init else ""
        ins = f" input {self.input_size}" if self.input_size is not None else ""
        return f"{self.dataset}@{self.size} {self.model}/{self.backend}{ins} {self.distance}{ri}"


def _spec_or_none(model: str):
    try:
        from cbmir.ingest.extractors import get_spec

        return get_spec(model)
    except CbmirError:
        return None


def _resolve_backend(spec, backend: str) -> str:
    """A model with one backend (``hog``: numpy) uses it whatever the grid asks; else as asked."""
    if spec is None or backend in spec.backends:
        return backend
    if len(spec.backends) == 1:
        return spec.backends[0]
    return backend  # unsupported: the cell fails with the registry's message


def _has_weights(spec) -> bool:
    return spec is None or spec.has_weights


def expand_cells(config: GridConfig) -> list[Cell]:
    """All cells of ``config`` in run order: dataset, size, model, backend, input size, distance.

    Cells that differ only in distance are adjacent, so features are extracted once. A model
    listing a single backend collapses the backends axis, a model with its own fixed preprocessing
    the input-size axis (``native`` only); ``random_init`` is False for
    weights-free models. Unknown names still yield cells here; :func:`run_grid` refuses them first
    (:func:`validate_grid`).

    Raises:
        CbmirError: no datasets or no models.
    """
    if not config.datasets:
        raise CbmirError("the grid has no datasets; give --datasets a,b or a grid file with `datasets`")
    if not config.models:
        raise CbmirError("the grid has no models; give --models x,y or a grid file with `models`")
    cells: list[Cell] = []
    seen = set()
    for dataset in config.datasets:
        for size in config.dataset_sizes.get(dataset, config.sizes):
            for model in config.models:
                spec = _spec_or_none(model)
                resizable = spec is None or spec.preprocess_cfg.resizable
                for backend, input_size, distance in itertools.product(
                        config.backends, config.input_sizes if resizable else [None], config.distances):
                    b = _resolve_backend(spec, backend)
                    ri = bool(config.random_init and _has_weights(spec))
                    cell = Cell(dataset, int(size), model, b, distance, ri, input_size)
                    if cell.key not in seen:
                        seen.add(cell.key)
                        cells.append(cell)
    return cells


def validate_grid(config: GridConfig) -> None:
    """Refuse a grid whose names cannot work, before any cell runs.

    Checks the models against the extractor registry, the MedMNIST flags against ``medmnist``'s
    list (a dataset that looks like a path is a user archive and is not checked here), each
    flag's sizes, and ``k`` against each MedMNIST database (train split) size. Runtime failures
    (weights unavailable, missing files) are left to the cells, which record them.

    Raises:
        CbmirError: one line naming every bad entry and the valid choices.
    """
    from cbmir.ingest.extractors import list_specs
    from cbmir.ingest.medmnist_data import INFO, MEDMNIST_FLAGS, valid_sizes
    from cbmir.ingest.sources import looks_like_path

    problems = []  # k >= 1 is already enforced by GridConfig
    valid_models = [s.name for s in list_specs()]
    bad_models = [m for m in config.models if _spec_or_none(m) is None]
    if bad_models:
        problems.append(f"unknown model(s) {', '.join(map(repr, bad_models))} (valid models: "
                        f"{', '.join(valid_models)})")
    bad_datasets, bad_sizes, too_small = [], [], []
    for dataset in config.datasets:
        if looks_like_path(dataset):
            continue  # a user archive: opened (and checked) by its cell
        if dataset not in MEDMNIST_FLAGS:
            bad_datasets.append(dataset)
            continue
        ok_sizes = valid_sizes(dataset)
        wrong = [s for s in config.dataset_sizes.get(dataset, config.sizes) if int(s) not in ok_sizes]
        if wrong:
            bad_sizes.append(f"{dataset} has no size {', '.join(map(str, wrong))} "
                             f"(valid: {', '.join(map(str, ok_sizes))})")
        n_db = int(INFO[dataset]["n_samples"]["train"])
        if config.k > n_db:
            too_small.append(f"k {config.k} exceeds the {n_db} database points of {dataset}")
    if bad_datasets:
        problems.append(f"unknown dataset(s) {', '.join(map(repr, bad_datasets))} (valid datasets: "
                        f"{', '.join(MEDMNIST_FLAGS)}, or a user-archive path)")
    problems += bad_sizes + too_small
    if problems:
        raise CbmirError("grid refused before any cell ran: " + "; ".join(problems))


# ----------------------------------------------------------------------------- results table
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
    except Exception as e:
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
        df[c] = df[c].map(_to_bool)
    for c in ("dataset", "model", "backend", "distance", "status"):
        df[c] = df[c].astype(str)
    df["input_size"] = df["input_size"].map(_input_size_of)
    df["error"] = ["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in df["error"]]
    return df


def _to_bool(v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return False
    return str(v).strip().lower() in ("true", "1", "yes")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _key_of(row: Mapping) -> tuple:
    ins = _input_size_of(row.get("input_size"))
    return (str(row["dataset"]), int(row["size"]), str(row["model"]), str(row["backend"]),
            str(row["distance"]), _to_bool(row["random_init"]), *([ins] if ins != "native" else []))


def _input_size_of(v) -> str:
    """A table's ``input_size`` value as its label: ``native`` (also for a missing value: older tables) or
    the side as text (``224``, also when read back as ``224.0``)."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip().lower() in ("", "native", "nan"):
        return "native"
    return str(int(float(v)))


def _k_of(row: Mapping) -> int | None:
    """The row's recorded ``k`` (None when not recorded: old tables, failed rows)."""
    v = row.get("k")
    try:
        return None if v is None or v == "" or pd.isna(v) else int(float(v))
    except (TypeError, ValueError):
        return None


def write_results(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` atomically (temporary file in the same directory + ``os.replace``).

    CSV, or Parquet (pyarrow) when ``path`` ends in ``.parquet``. Columns are ordered as
    :data:`COLUMNS`, extra columns after them.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the table is an ordinary shared file
        with os.fdopen(fd, "wb") as fh:
            if _is_parquet(p):
                out = df[cols].copy()
                for c in out.columns[out.dtypes == object]:  # mixed str/NaN object columns -> str or null
                    out[c] = out[c].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                                        else str(v))
                out.to_parquet(fh, index=False, engine="pyarrow")
            else:
                fh.write(df[cols].to_csv(index=False, lineterminator="\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _upsert_row(records: list[dict], row: dict) -> list[dict]:
    """``records`` without the row of ``row``'s key, then ``row`` (a new list)."""
    key = _key_of(row)
    return [r for r in records if _key_of(r) != key] + [{c: row.get(c, np.nan) for c in COLUMNS}]


def _to_frame(records: list[dict]) -> pd.DataFrame:
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(e: BaseException, limit: int = 500) -> str:
    msg = " ".join(str(e).split())
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- per-query results
def _save_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


# ----------------------------------------------------------------------------- feature cache
class _FeatureCache:
    """Features of one (dataset, size, model, backend, random_init) on disk, to index them twice.

    Layout: ``<root>/<name>/<split>.npy`` float32 (N, dim) (memory-mapped) and
    ``<split>.done.npy`` bool (N,) marking the rows written.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name

    def _paths(self, split: str) -> tuple[Path, Path]:
        return self.dir / f"{split}.npy", self.dir / f"{split}.done.npy"

    def complete(self, split: str, n: int, dim: int) -> bool:
        vec_p, done_p = self._paths(split)
        if not (vec_p.exists() and done_p.exists()):
            return False
        done = np.load(done_p)
        shape = np.load(vec_p, mmap_mode="r").shape
        return done.shape == (n,) and bool(done.all()) and shape == (n, dim)

    def writer(self, split: str, n: int, dim: int):
        self.dir.mkdir(parents=True, exist_ok=True)
        vec_p, done_p = self._paths(split)
        if vec_p.exists() and np.load(vec_p, mmap_mode="r").shape == (n, dim) and done_p.exists():
            vecs = np.load(vec_p, mmap_mode="r+")
            done = np.load(done_p)
        else:
            vecs = np.lib.format.open_memmap(vec_p, mode="w+", dtype=np.float32, shape=(n, dim))
            done = np.zeros(n, dtype=bool)
        return vecs, done, done_p

    def reader(self, split: str) -> np.ndarray:
        return np.load(self._paths(split)[0], mmap_mode="r")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


_SPLIT_CODE, _CODE_SPLIT = SPLIT_CODES, CODE_SPLITS


class _RecordingSource:
    """Wraps a dataset source: remembers, for every batch it yields, which rows its images are.

    The ingest job may read ahead in a thread and hand the embedder a batch later (or a subset of
    it), so the rows are looked up by the identity of the image array the embedder receives
    (a weak reference guards against a reused ``id``). Images of a batch that reach the embedder
    as a new array (a resumed batch cut to its missing rows) are not recorded; the cache is then
    incomplete and the twin cell extracts its own features.
    """

    def __init__(self, source) -> None:
        self._source = source
        self._rows: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._source, name)

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        for batch in self._source.iter_batches(split, batch_size, start=start):
            images = batch.images
            try:
                ref = weakref.ref(images)
            except TypeError:  # not weak-referenceable: cannot be matched safely
                ref = None
            if ref is not None:
                with self._lock:
                    self._rows[id(images)] = (ref, split, np.asarray(batch.indices))
            yield batch

    def rows_of(self, images) -> tuple[str, np.ndarray] | None:
        """``(split, row indices)`` of an image array this source yielded, else None."""
        with self._lock:
            hit = self._rows.pop(id(images), None)
            if hit is not None and hit[0]() is not images:
                return None
        return None if hit is None else (hit[1], hit[2])


class _RecordingEmbedder:
    """Wraps an embedder: writes every embedded batch into a :class:`_FeatureCache`."""

    def __init__(self, embedder, source: _RecordingSource, cache: _FeatureCache) -> None:
        self._embedder, self._source, self._cache = embedder, source, cache
        self._open: dict[str, tuple] = {}

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed(self, images: np.ndarray) -> np.ndarray:
        vecs = self._embedder.embed(images)
        hit = self._source.rows_of(images)
        if hit is not None and len(hit[1]) == len(vecs):
            split, idx = hit
            if split not in self._open:
                self._open[split] = self._cache.writer(split, self._source.split_size(split), vecs.shape[1])
            arr, done, _ = self._open[split]
            if arr.shape[1] == vecs.shape[1]:
                arr[idx] = vecs
                done[idx] = True
        return vecs

    def flush(self) -> None:
        for arr, done, done_p in self._open.values():
            arr.flush()
            np.save(done_p, done)


class _ReplaySource:
    """A dataset source whose batches carry ``(split code, row)`` pairs instead of pixels.

    ``images`` of each batch is int64 ``(B, 2)``; :class:`_ReplayEmbedder` turns them into the
    cached features.
    """

    def __init__(self, source) -> None:
        self._source = source

    def __getattr__(self, name):
        return getattr(self._source, name)

    def iter_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        n = self._source.split_size(split)
        labels = self._source.labels(split)
        prefix = f"{self._source.name}_{self._source.size}/{split}/"
        for lo in range(int(start), n, int(batch_size)):
            hi = min(lo + int(batch_size), n)
            idx = np.arange(lo, hi, dtype=np.int64)
            keys = np.stack([np.full_like(idx, _SPLIT_CODE[split]), idx], axis=1)
            yield Batch(images=keys, labels=labels[lo:hi].copy(), indices=idx,
                        image_ids=[f"{prefix}{i}" for i in range(lo, hi)])


class _ReplayEmbedder:
    """Embedder that returns the cached features of the ``(split code, row)`` pairs it is given."""

    def __init__(self, embedder, cache: _FeatureCache) -> None:
        self._embedder, self._cache = embedder, cache
        self._readers: dict[str, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed(self, images: np.ndarray) -> np.ndarray:
        keys = np.asarray(images)
        out = np.empty((len(keys), int(self._embedder.dim)), dtype=np.float32)
        for code in np.unique(keys[:, 0]):
            split = _CODE_SPLIT[int(code)]
            if split not in self._readers:
                self._readers[split] = self._cache.reader(split)
            m = keys[:, 0] == code
            out[m] = self._readers[split][keys[m, 1]]
        return out


# ----------------------------------------------------------------------------- ingest log
def _read_log(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_log(path: Path, log: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(log, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one cell
def _collection_for(cell: Cell, aggregation: str, is_3d: bool) -> str:
    from cbmir.search.schema import collection_name

    return collection_name(cell.dataset, cell.size, cell.model, backend=cell.backend, distance=cell.distance,
                           aggregation=aggregation if is_3d else "concat", random_init=cell.random_init,
                           input_size=cell.input_size)


def _settings_for(config: GridConfig):
    from cbmir.core.settings import get_settings

    return get_settings(data_dir=config.data_dir, store_path=config.store_path, qdrant_url=config.qdrant_url,
                        device=config.device, batch_size=config.batch_size)


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


def run_cell(cell: Cell, config: GridConfig, *, results_dir: Path, ingest_log: dict,
             twins: Sequence[Cell] = (), settings=None) -> dict:
    """Run one cell (ingest or reuse, evaluate) and return its results row (see :data:`COLUMNS`).

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
    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor, get_spec
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.search.store import open_store

    s = settings or _settings_for(config)
    t_cell = time.perf_counter()
    started = _now()
    spec = get_spec(cell.model)  # unknown model: CbmirError naming the valid ones
    source = open_medmnist(cell.dataset, cell.size, s.data_dir, download=config.download)
    n_db = int(source.split_size("train"))
    if config.k > n_db:  # validate_grid catches MedMNIST flags; this covers any other source
        raise CbmirError(f"k {config.k} exceeds the {n_db} database points of {cell.dataset}@{cell.size}")
    aggregation = config.volume_aggregation
    name = _collection_for(cell, aggregation, source.is_3d)
    store_loc = _store_location(s)
    log_key = f"{store_loc}|{name}"
    cache = _FeatureCache(results_dir / _CACHE_DIR, "_".join(map(str, cell.features_key)).lower())

    t0 = time.perf_counter()
    extractor = create_extractor(cell.model, weights=config.weights.get(cell.model),
                                 random_init=cell.random_init, device=s.device, batch_size=s.batch_size,
                                 backend=cell.backend, input_size=cell.input_size)
    model_load_s = time.perf_counter() - t0
    embedder = make_embedder(extractor, size=cell.size, is_3d=source.is_3d, aggregation=aggregation)
    dim = int(embedder.dim)
    splits = ("train", "test")
    n_rows = {sp: source.split_size(sp) for sp in splits}

    store = open_store(s)
    try:
        # What is already in the store decides reuse / resume and how timings are read.
        # (a split found complete is reused; a partial one resumes; features of a twin are replayed)
        existing = store.read_meta(name)
        before = {sp: (store.count(name, sp) if existing is not None else 0) for sp in splits}
        replay = all(cache.complete(sp, n_rows[sp], dim) for sp in splits) and not all(
            before[sp] >= n_rows[sp] for sp in splits)
        if replay:
            ing_source, ing_embedder = _ReplaySource(source), _ReplayEmbedder(embedder, cache)
        elif twins:
            rec_source = _RecordingSource(source)
            ing_source, ing_embedder = rec_source, _RecordingEmbedder(embedder, rec_source, cache)
        else:
            ing_source, ing_embedder = source, embedder
        try:
            rep = ingest(ing_source, ing_embedder, store, splits=splits, batch_size=s.batch_size,
                         distance=cell.distance, collection=name, progress=config.progress)
        finally:
            if isinstance(ing_embedder, _RecordingEmbedder):
                ing_embedder.flush()
        meta = rep.meta
        if meta.random_init != cell.random_init or meta.backend != cell.backend:
            raise CbmirError(f"{name}: the collection holds backend={meta.backend} random_init={meta.random_init}, "
                             f"the grid asked for backend={cell.backend} random_init={cell.random_init}")

        # Timings: measured now, or from the ingest log when the split was reused / resumed.
        entry = ingest_log.setdefault(log_key, {})
        notes = []
        timing = {}
        for sp in splits:
            if sp in rep.skipped:
                prev = entry.get(sp)
                timing[sp] = float(prev["seconds"]) if prev else float("nan")
                notes.append(f"{sp}: reused collection, " + (f"time of the ingest of {prev['at']}" if prev
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
            entry[sp] = {"seconds": full, "at": _now(), "replayed": bool(replay)}
        ingest_log[log_key] = entry

        ev = evaluate_collection(store, name, k=config.k, batch_size=256, latency_sample=config.latency_sample,
                                 progress=config.progress)
    finally:
        store.close()

    per_query_file = ""
    if config.save_per_query:
        rel = Path(_PER_QUERY_DIR) / f"{name}.npz"
        _save_npz_atomic(results_dir / rel, query_indices=ev.query_indices.astype(np.int64),
                         query_labels=ev.query_labels.astype(np.int64),
                         topk_indices=ev.topk_indices.astype(np.int64),
                         topk_labels=ev.topk_labels.astype(np.int64),
                         topk_scores=ev.topk_scores.astype(np.float32), k=np.int64(ev.k),
                         distance=np.str_(ev.distance), collection=np.str_(name))
        per_query_file = rel.as_posix()

    metrics = {m: 100.0 * float(v) for m, v in ev.metrics.items()}
    row = {
        "dataset": cell.dataset, "size": int(cell.size), "model": cell.model, "backend": cell.backend,
        "distance": cell.distance, "random_init": bool(cell.random_init), "status": "ok", "error": "",
        "input_size": input_size_label(cell.input_size),
        "family": "handcrafted baseline" if spec.baseline else spec.family,
        "collection": name, "engine": ev.engine, "store": store_loc, "weights": meta.weights, "dim": int(meta.dim),
        "is_3d": bool(meta.is_3d), "aggregation": meta.aggregation, "k": int(ev.k),
        "n_queries": int(ev.n_queries), "n_database": int(ev.n_database), "device": _resolved_device(s.device),
        "threads": _torch_threads(),
        **metrics,
        "majority_class_rate": 100.0 * ev.majority_class_rate,
        "model_load_s": model_load_s,
        "database_creation_s": timing["train"],
        "database_items_per_s": n_rows["train"] / timing["train"] if timing["train"] > 0 else float("nan"),
        "query_extraction_s": timing["test"],
        "search_s": ev.timings["search_s"],
        "test_time_s": timing["test"] + ev.timings["search_s"],
        "search_per_query_ms": ev.timings["search_per_query_ms"],
        "latency_p50_ms": ev.timings["latency_p50_ms"], "latency_p95_ms": ev.timings["latency_p95_ms"],
        "fetch_s": ev.timings["fetch_s"],
        "timing_note": "; ".join(notes),
        "train_reused": "train" in rep.skipped, "test_reused": "test" in rep.skipped,
        "features_cached": bool(replay), "per_query_file": per_query_file,
        "started_at": started, "finished_at": _now(),
        **software_versions(),
    }
    row["cell_wall_s"] = time.perf_counter() - t_cell
    if replay and not twins:
        cache.remove()  # every twin has used it
    return row


def _torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


def _failed_row(cell: Cell, error: BaseException, started: str, wall: float) -> dict:
    return {
        "dataset": cell.dataset, "size": int(cell.size), "model": cell.model, "backend": cell.backend,
        "distance": cell.distance, "random_init": bool(cell.random_init), "status": "failed",
        "input_size": input_size_label(cell.input_size),
        "error": _one_line(error), "cell_wall_s": wall, "started_at": started, "finished_at": _now(),
        **software_versions(),
    }


# ----------------------------------------------------------------------------- the grid
@dataclass
class GridSummary:
    """What :func:`run_grid` did: cells ``ran`` (ok), ``failed`` and ``skipped`` (already in the table),
    the ``results`` path and the final table."""

    cells: list[Cell]
    ran: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    results: Path | None = None
    table: pd.DataFrame | None = None


class _SigtermAsInterrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt (so stores close and flush); main thread only."""

    def __enter__(self):
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    @staticmethod
    def _handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def run_grid(config: GridConfig, *, cell_runner: Callable[..., dict] | None = None,
             echo: Callable[[str], None] | None = None) -> GridSummary:
    """Run every cell of ``config`` that the results table does not hold yet.

    Args:
        config: the grid.
        cell_runner: replaces :func:`run_cell` (same signature; tests count calls with it).
        echo: receives one line per finished / failed / skipped cell (default: ``tqdm.write``).

    Returns:
        :class:`GridSummary`. The results table is written after every cell.

    Raises:
        CbmirError: the grid is empty or names an unknown model / dataset / size or a ``k`` larger
            than a database (:func:`validate_grid`, before any cell runs), the results table is
            unreadable or another grid is writing it (a lock file ``<results>.lock`` guards it).
            A finished row counts as done only when its ``k`` is the grid's (or unrecorded); else
            the cell runs again and its row is replaced. Errors inside a cell are
            recorded as ``failed`` rows, never raised; KeyboardInterrupt / SIGTERM stop the grid
            (finished cells are kept; re-run the same command to resume).
    """
    validate_grid(config)
    cells = expand_cells(config)
    config.results.parent.mkdir(parents=True, exist_ok=True)
    with _TableLock(config.results):
        return _run_grid_locked(config, cells, cell_runner or run_cell,
                                echo or (lambda line: tqdm.write(line)))


class _TableLock:
    """Exclusive lock on a results table (``<results>.lock``, ``fcntl.flock``) for one grid run.

    Two grids writing the same table would lose each other's rows (each rewrites the whole file).

    Raises:
        CbmirError: another process holds the lock.
    """

    def __init__(self, results: Path) -> None:
        self.path = Path(str(results) + ".lock")
        self._fh = None

    def __enter__(self):
        import fcntl

        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise CbmirError(f"another cbmir benchmark is writing {self.path.with_suffix('')} (lock {self.path}); "
                             "wait for it to finish or use another --results") from None
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        return False


def _run_grid_locked(config: GridConfig, cells: list[Cell], runner, say) -> GridSummary:
    threads = config.threads or _settings_for(config).threads  # --threads / grid file, else CBMIR_THREADS
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    results = config.results
    results_dir = results.parent
    records = read_results(results).to_dict("records")
    done: dict[tuple, tuple[str, int | None]] = {_key_of(r): (str(r["status"]), _k_of(r)) for r in records}
    log_path = results_dir / _INGEST_LOG
    ingest_log = _read_log(log_path)
    settings = _settings_for(config)
    summary = GridSummary(cells=cells, results=results)

    todo = []
    for cell in cells:
        status, row_k = done.get(cell.key, (None, None))
        if status == "ok" and row_k is not None and row_k != config.k:
            say(f"re-running {cell.label()}: table row has k={row_k}, grid asks k={config.k}")
            todo.append(cell)
        elif status == "ok" or (status == "failed" and not config.retry_failed):
            summary.skipped.append(cell)
        else:
            todo.append(cell)
    if summary.skipped:
        say(f"grid: {len(summary.skipped)} of {len(cells)} cells already in {results}; skipped")

    bar = tqdm(total=len(cells), initial=len(summary.skipped), desc="grid", unit="cell",
               disable=not config.progress, position=0)
    try:
        with _SigtermAsInterrupt():
            for i, cell in enumerate(todo):
                bar.set_postfix_str(cell.label(), refresh=True)
                twins = [c for c in todo[i + 1:] if c.features_key == cell.features_key]
                started, t0 = _now(), time.perf_counter()
                try:
                    row = runner(cell, config, results_dir=results_dir, ingest_log=ingest_log, twins=twins,
                                 settings=settings)
                    summary.ran.append(cell)
                    say(f"ok      {cell.label()}: ACC@1 {row.get('ACC@1', float('nan')):.2f}%  "
                        f"({row.get('cell_wall_s', time.perf_counter() - t0):.1f} s)")
                except Exception as e:  # noqa: BLE001 - one cell's failure must not stop the grid
                    row = _failed_row(cell, e, started, time.perf_counter() - t0)
                    summary.failed.append((cell, row["error"]))
                    say(f"failed  {cell.label()}: {row['error']}")
                records = _upsert_row(records, row)
                write_results(_to_frame(records), results)
                _write_log(log_path, ingest_log)
                bar.update(1)
    finally:
        bar.close()
    # Every cell ran (not interrupted): features cached for a twin are no longer needed.
    shutil.rmtree(results_dir / _CACHE_DIR, ignore_errors=True)
    summary.table = _to_frame(records)
    return summary


def parse_list(value: str | None) -> list[str] | None:
    """Comma-separated CLI value -> list (None stays None)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def config_from_cli(config_file: str | os.PathLike | None = None, **flags) -> GridConfig:
    """The grid configuration from an optional grid file and CLI flags (flags override the file).

    ``flags`` use :class:`GridConfig` names; None means "not given". List flags may be
    comma-separated strings.
    """
    data = load_grid_file(config_file) if config_file else {}
    if data:  # the file's own values first, so that an error names the file
        try:
            GridConfig.from_mapping(data)
        except CbmirError as e:
            raise CbmirError(f"grid file {Path(config_file).expanduser()}: {e}") from None
    return GridConfig.from_mapping(data, **flags)

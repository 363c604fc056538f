"""The grid's configuration: what to run (datasets x sizes x models x backends x distances) and where.

:class:`GridConfig` holds the settings (from a YAML/TOML grid file, :func:`load_grid_file`, and CLI
flags, :func:`config_from_cli`); :func:`expand_cells` turns it into :class:`Cell` s in run order and
:func:`validate_grid` refuses names that cannot work before any cell runs.
"""

from __future__ import annotations

import itertools

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from cbmir.core.errors import CbmirError
from cbmir.core.input_size import input_size_label, parse_input_size

__all__ = [
    "GridConfig",
    "Cell",
    "load_grid_file",
    "expand_cells",
    "validate_grid",
    "parse_list",
    "config_from_cli",
]


# ----------------------------------------------------------------------------- settings
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
        precision: torch forward-pass precision, ``auto``, ``fp32`` or ``bf16`` (None: ``CBMIR_PRECISION``, else
            ``auto``); recorded per collection and in the table's ``precision`` column.
        torch_compile: build the CNN collections with ``torch.compile`` (None: ``CBMIR_TORCH_COMPILE``, else off;
            :mod:`cbmir.ingest.extractors.compiled`).
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
    precision: str | None = None
    torch_compile: bool | None = None
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
        if self.torch_compile is not None and not isinstance(self.torch_compile, bool):
            raise CbmirError(f"torch_compile must be true or false, got {self.torch_compile!r}")

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
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError, tomllib.TOMLDecodeError: one line naming the file
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
        """The cell's :data:`~cbmir.evaluation.results.KEY` values; a ``native`` cell leaves out ``input_size``
        (its key as before the column existed, so older tables and their rows keep their keys)."""
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


# ----------------------------------------------------------------------------- CLI
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

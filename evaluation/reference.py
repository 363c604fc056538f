"""The study's published results and the tables derived from them.

Source: Mahbod, Saeidi, Hatamikia, Woitek, *Evaluating pre-trained
convolutional neural networks and foundation models as feature extractors for
content-based medical image retrieval*, Engineering Applications of Artificial
Intelligence 150 (2025) 110571, supplementary Tables S1-S4 (shipped as
``evaluation/data/paper_results.csv``; see ``evaluation/data/SOURCE.md``).

All metric values are in **percent** (0-100), as printed in the paper.

The paper's Table 3 (2D) and Table 4 (3D) are the per-model averages of the
supplementary rows over datasets x sizes; :func:`published_averages`
recomputes them, :func:`table_disagreements` lists every printed value we know
of that differs from the recomputation, and :func:`size_robustness` gives the
spread of a metric across image sizes (the study's Table 5 uses ACC@1).

Every function that takes a results table accepts both the published table and
cbmir's own results table, which use the same column names:
``dataset, size, model, mAP@5, mMV@5, ACC@1, ACC@3, ACC@5``.
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Mapping

import pandas as pd

__all__ = [
    "METRICS",
    "COLUMNS",
    "DATASETS_2D",
    "DATASETS_3D",
    "PRINTED_TABLE_VALUES",
    "TABLE_KIND",
    "load_published",
    "published_averages",
    "table_disagreements",
    "size_robustness",
]

#: Metric columns, in the paper's order. Units: percent.
METRICS: tuple[str, ...] = ("mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5")

#: All columns of a results table.
COLUMNS: tuple[str, ...] = ("dataset", "size", "model", *METRICS)

#: The six 2D MedMNIST v2 datasets of the study (sizes 28, 64, 128, 224 px).
DATASETS_2D: tuple[str, ...] = (
    "BreastMNIST",
    "PneumoniaMNIST",
    "RetinaMNIST",
    "DermaMNIST",
    "BloodMNIST",
    "PathMNIST",
)

#: The two 3D MedMNIST v2 datasets of the study (sizes 28³ and 64³).
DATASETS_3D: tuple[str, ...] = ("AdrenalMNIST3D", "SynapseMNIST3D")

#: Which averaging ``kind`` each of the paper's summary tables corresponds to.
TABLE_KIND: dict[str, str] = {"Table 3": "2d", "Table 4": "3d"}

#: Values printed in the paper's summary tables, keyed by
#: ``(table, model, metric)``, in percent.
#:
#: Only values we can source are listed. We do not hold the paper's text, so
#: this is deliberately not a full copy of Tables 3 and 4: the supplementary
#: rows (``paper_results.csv``) reproduce those tables (Table 4 within 0.01,
#: i.e. rounding), with one known exception recorded here. Table 3 prints
#: VGG19 ACC@5 as 87.39 while the 24 supplementary 2D rows of VGG19 average
#: 91.52 (source: ``shared/reference/README.md`` of this project and the
#: project's DESIGN notes, checked against the CSV by
#: ``tests/test_reference.py``). Add further printed values here, with their
#: source, when they are transcribed.
PRINTED_TABLE_VALUES: dict[tuple[str, str, str], float] = {
    ("Table 3", "VGG19", "ACC@5"): 87.39,
}

_DATA_FILE = "paper_results.csv"


@functools.lru_cache(maxsize=1)
def _read_published() -> pd.DataFrame:
    package = __package__ or "evaluation"
    resource = importlib.resources.files(package) / "data" / _DATA_FILE
    with resource.open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh)
    _check_columns(df)
    return df


def load_published() -> pd.DataFrame:
    """Load the study's supplementary Tables S1-S4 as one DataFrame.

    Returns
    -------
    pandas.DataFrame
        One row per (dataset, size, model), 251 rows. Columns ``dataset``
        (str), ``size`` (int, pixels; the volume side for 3D datasets),
        ``model`` (str) and the float columns of :data:`METRICS` in percent.
        A fresh copy is returned on every call, so callers may modify it.

    Raises
    ------
    FileNotFoundError
        If the package data file is missing (a broken install).
    ValueError
        If the file lacks one of :data:`COLUMNS`.
    """
    return _read_published().copy()


def _check_columns(df: pd.DataFrame, columns: tuple[str, ...] = COLUMNS) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"results table lacks column(s) {missing}; expected {list(columns)}"
        )


def _datasets_for(kind: str) -> tuple[str, ...]:
    key = str(kind).lower()
    if key == "2d":
        return DATASETS_2D
    if key == "3d":
        return DATASETS_3D
    raise ValueError(f"kind must be '2d' or '3d', not {kind!r}")


def published_averages(kind: str = "2d", df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-model average of the results rows of the 2D or the 3D datasets.

    With the published table (the default) this recomputes the paper's
    Table 3 (``kind="2d"``: six 2D datasets x sizes 28, 64, 128, 224) and
    Table 4 (``kind="3d"``: AdrenalMNIST3D and SynapseMNIST3D x sizes 28, 64).

    The average is the plain mean over all rows of the model, i.e. over every
    (dataset, size) pair present, each weighted equally. Where rows are
    missing the mean is over the rows present: MedCLIP has no BreastMNIST
    64 px row in the supplement, so its 2D average is over 23 rows; the
    ``n_rows`` column makes such cases visible.

    Parameters
    ----------
    kind : {"2d", "3d"}
        Which group of datasets to average over (case-insensitive).
    df : pandas.DataFrame, optional
        A results table with :data:`COLUMNS` (e.g. cbmir's own results). Dataset
        names are matched case-insensitively against :data:`DATASETS_2D` /
        :data:`DATASETS_3D`; rows of other datasets are ignored. Defaults to
        :func:`load_published`.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``model`` in order of first appearance; columns
        :data:`METRICS` (float, percent, unrounded) and ``n_rows`` (int).
        Empty if no row belongs to ``kind``.

    Raises
    ------
    ValueError
        If ``kind`` is not "2d"/"3d" or ``df`` lacks one of :data:`COLUMNS`.
    """
    datasets = {d.lower() for d in _datasets_for(kind)}
    table = load_published() if df is None else df
    _check_columns(table)
    rows = table[table["dataset"].astype(str).str.lower().isin(datasets)]
    grouped = rows.groupby("model", sort=False)
    out = grouped[list(METRICS)].mean().astype(float)
    out["n_rows"] = grouped.size().astype(int)
    out.index.name = "model"
    return out


def table_disagreements(
    tol: float = 0.05,
    printed: Mapping[tuple[str, str, str], float] | None = None,
    df: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Printed summary-table values that differ from the recomputed averages.

    Parameters
    ----------
    tol : float
        Tolerance in percentage points. A printed value is listed when
        ``abs(printed - recomputed) > tol``. The default 0.05 is well above
        the 0.005 that rounding to two decimals can explain.
    printed : mapping, optional
        ``{(table, model, metric): value_in_percent}`` with ``table`` one of
        :data:`TABLE_KIND`'s keys. Defaults to :data:`PRINTED_TABLE_VALUES`.
    df : pandas.DataFrame, optional
        Results table to recompute from; defaults to the published one.

    Returns
    -------
    pandas.DataFrame
        Columns ``table, model, metric, printed, recomputed, difference``
        (difference = printed - recomputed, percentage points), one row per
        disagreeing value, in the order of ``printed``. A printed value whose
        model has no rows in the table is listed with ``recomputed`` NaN.

    Raises
    ------
    ValueError
        If ``tol`` is negative, or a key names an unknown table or metric.
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0, not {tol}")
    printed = PRINTED_TABLE_VALUES if printed is None else printed
    averages = {
        table: published_averages(kind, df=df) for table, kind in TABLE_KIND.items()
    }
    records = []
    for (table, model, metric), value in printed.items():
        if table not in TABLE_KIND:
            raise ValueError(f"unknown table {table!r}; expected one of {list(TABLE_KIND)}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
        avg = averages[table]
        recomputed = float(avg.at[model, metric]) if model in avg.index else float("nan")
        difference = float(value) - recomputed
        if not abs(difference) <= tol:  # also lists NaN (model missing)
            records.append(
                {
                    "table": table,
                    "model": model,
                    "metric": metric,
                    "printed": float(value),
                    "recomputed": recomputed,
                    "difference": difference,
                }
            )
    return pd.DataFrame(
        records,
        columns=["table", "model", "metric", "printed", "recomputed", "difference"],
    )


def size_robustness(df: pd.DataFrame | None = None, metric: str = "ACC@1") -> pd.DataFrame:
    """Spread of a metric across image sizes, per (dataset, model).

    The study's Table 5 reports, for ACC@1, how much each model's result on a
    dataset changes with the input size: ``range = max - min`` over the sizes.

    Parameters
    ----------
    df : pandas.DataFrame, optional
        Results table with at least ``dataset``, ``size``, ``model`` and
        ``metric``; defaults to the published table. ``size`` may be int or str.
    metric : str
        Metric column to use; default ``"ACC@1"``. Units follow the table
        (percent for the published one).

    Returns
    -------
    pandas.DataFrame
        One row per (dataset, model) in order of first appearance, columns
        ``dataset, model, n_sizes`` (int), ``min, max, range`` (float, units of
        ``metric``), ``size_at_min, size_at_max`` (the size, first one on
        ties). A pair with a single size has range 0. Missing (NaN) values
        are skipped and not counted in ``n_sizes``; a pair with none has NaN
        min/max/range and ``None`` sizes.

    Raises
    ------
    ValueError
        If a needed column is missing, or a (dataset, size, model) occurs
        twice (the range would mix different runs).
    """
    table = load_published() if df is None else df
    _check_columns(table, ("dataset", "size", "model", metric))
    keys = ["dataset", "size", "model"]
    dup = table.duplicated(subset=keys, keep=False)
    if dup.any():
        raise ValueError(
            "duplicate (dataset, size, model) rows: "
            f"{table.loc[dup, keys].drop_duplicates().values.tolist()}"
        )
    records = []
    for (dataset, model), group in table.groupby(["dataset", "model"], sort=False):
        values = group[metric].astype(float).dropna()
        if values.empty:
            lo = hi = float("nan")
            size_lo = size_hi = None
        else:
            lo, hi = float(values.min()), float(values.max())
            size_lo = group.at[values.idxmin(), "size"]
            size_hi = group.at[values.idxmax(), "size"]
        records.append(
            {
                "dataset": dataset,
                "model": model,
                "n_sizes": int(len(values)),
                "min": lo,
                "max": hi,
                "range": hi - lo,
                "size_at_min": size_lo,
                "size_at_max": size_hi,
            }
        )
    return pd.DataFrame(
        records,
        columns=["dataset", "model", "n_sizes", "min", "max", "range", "size_at_min", "size_at_max"],
    )

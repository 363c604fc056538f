"""The rows of a results table as the report uses them: display columns, ok rows, sort order, paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cbmir.evaluation.reference import DATASETS_3D
from cbmir.evaluation.report.labels import dataset_display_name, dataset_order, model_order, paper_model_name, row_label
from cbmir.evaluation.results import input_size_of, to_bool

__all__ = ["prepare_results", "ok_rows", "sort_rows", "results_path"]


def prepare_results(df: pd.DataFrame) -> pd.DataFrame:
    """Add display columns to a results table (:mod:`cbmir.evaluation.results`): ``label`` (row label),
    ``dataset_name`` (display name), ``paper_model`` (or None) and ``kind`` (``2d``/``3d``).

    Accepts any table with at least ``dataset, size, model`` and the metric columns; missing
    ``status`` means ok, missing ``random_init`` False, missing ``distance`` cosine.
    """
    df = df.copy()
    defaults = {"status": "ok", "random_init": False, "distance": "cosine", "backend": "torch", "family": None,
                "is_3d": None, "error": "", "input_size": "native"}
    for c, v in defaults.items():
        if c not in df.columns:
            df[c] = v
    df["random_init"] = df["random_init"].map(to_bool)
    df["size"] = df["size"].astype(int)
    df["input_size"] = df["input_size"].map(input_size_of)
    df["label"] = [row_label(m, ri, fam if isinstance(fam, str) else None, str(b), ins)
                   for m, ri, fam, b, ins in zip(df["model"], df["random_init"], df["family"], df["backend"],
                                                 df["input_size"])]
    df["dataset_name"] = [dataset_display_name(d) for d in df["dataset"]]
    df["paper_model"] = [paper_model_name(m) for m in df["model"]]

    def kind(row) -> str:
        v = row["is_3d"]
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, str) and v.lower() in ("true", "false")):
            return "3d" if to_bool(v) else "2d"
        d = str(row["dataset"]).lower()
        return "3d" if d in {x.lower() for x in DATASETS_3D} or d.endswith("3d") else "2d"

    df["kind"] = [kind(r) for r in df.to_dict("records")] if len(df) else []
    return df


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` whose ``status`` is ``ok``."""
    return df[df["status"].astype(str) == "ok"]


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (:func:`prepare_results` output) in the paper's order: dataset, size, model, distance."""
    if df.empty:
        return df
    keys = [(dataset_order(d), int(s), model_order(lab), str(dist))
            for d, s, lab, dist in zip(df["dataset"], df["size"], df["label"], df["distance"])]
    order = sorted(range(len(df)), key=lambda i: keys[i])
    return df.iloc[order]


def results_path(f: str, results_dir: Path) -> Path:
    """A path of the results table (``per_query_file``): absolute as is, else relative to ``results_dir``."""
    return Path(f) if Path(f).is_absolute() else results_dir / f

"""The study's report from a results table: Markdown tables, PNG figures, statistics.

``build_report(results_csv, output_dir)`` writes ``<output>/report.md`` and ``<output>/figures/*.png``
(and the statistics as CSV: ``<output>/stats_ci.csv``, ``<output>/stats_paired.csv``). Layout
follows Mahbod et al. (2025), *Engineering Applications of Artificial Intelligence* 150:110571:

* Tables S1-S4 — one table per image size, rows dataset x model, columns the five metrics, each
  with the paper's value beside ours and the difference (ours - paper, percentage points);
* Tables 3 and 4 — per-model averages over the 2D and the 3D datasets: ours, the paper's over the
  same (dataset, size) cells, and the paper's full tables recomputed from the supplementary rows,
  with the printed values that disagree (:func:`cbmir.evaluation.reference.table_disagreements`);
* Table 5 — size robustness: range of ACC@1 across sizes (:func:`cbmir.evaluation.reference.size_robustness`);
* Tables 6 and 7 — database creation time, and test time split into query extraction and search;
* Figures 3-10 — ACC@1 per model grouped by image size, one figure per dataset; Figure 11 — t-SNE of
  the database features of one collection, coloured by class;
* beyond the study: 95% percentile-bootstrap CIs of every metric, paired comparisons of models on
  the same dataset / size (paired bootstrap of the difference; McNemar for ACC@1, Holm-adjusted per
  dataset and size), cosine vs Euclidean where both were run (:mod:`cbmir.evaluation.stats`).

Rules every report follows (DESIGN.md §3): rows of random-weight runs are labelled ``RANDOM-INIT``
everywhere; ``hog`` is labelled "handcrafted baseline"; each dataset shows its majority-class rate
and its weights-free baseline (or says that none was run).

With no results table the report holds the published tables only: Tables 3 and 4 recomputed from
the supplementary rows, the disagreement of the printed Table 3 (VGG19 ACC@5: 87.39 printed,
91.52 recomputed), Table 5, and the paper's own Figures 3-10 redrawn from its rows.

All metric values are in percent (0-100); times in seconds unless the column says ms.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cbmir.evaluation.reference import (
    DATASETS_2D,
    DATASETS_3D,
    METRICS,
    PRINTED_TABLE_VALUES,
    load_published,
    published_averages,
    size_robustness,
    table_disagreements,
)
from cbmir.core.errors import CbmirError
__all__ = [
    "ReportOutput",
    "build_report",
    "paper_model_name",
    "is_baseline",
    "dataset_display_name",
    "row_label",
    "prepare_results",
    "per_size_table",
    "average_table",
    "robustness_table",
    "timing_tables",
    "ci_table",
    "paired_table",
    "distance_table",
    "tie_diagnostics",
    "plot_acc1_by_size",
    "tsne_figure",
    "markdown_table",
    "SANITY_REFERENCE",
]

_PAPER_MODEL_ORDER = ("VGG19", "ResNet50", "DenseNet121", "EfficientNetV2M", "MedCLIP", "BiomedCLIP",
                      "OpenCLIP", "CONCH", "UNI")

#: Weights-free sanity reference measured while designing cbmir (DESIGN.md §3; not from the study):
#: HOG (skimage, 9 orientations, 4x4 cells, 2x2 blocks), cosine, train = database, test = queries,
#: in percent ``(mAP@5, mMV@5, ACC@1, ACC@3, ACC@5)``; 3D: HOG per slice, concatenated.
SANITY_REFERENCE: dict[tuple[str, int], tuple[float, ...]] = {
    ("breastmnist", 28): (84.53, 73.08, 80.13, 92.95, 96.15),
    ("pneumoniamnist", 28): (86.50, 86.06, 81.25, 94.87, 96.63),
    ("retinamnist", 28): (52.21, 49.50, 40.75, 65.75, 75.50),
    ("adrenalmnist3d", 28): (78.56, 74.16, 71.14, 89.60, 95.64),
    ("adrenalmnist3d", 64): (80.17, 76.51, 74.16, 91.95, 94.63),
    ("vesselmnist3d", 28): (92.61, 90.31, 91.10, 97.12, 98.17),
}

_PAPER_TIMING_NOTE = (
    "The paper's timings (minutes, TITAN V GPU, 64 px): PathMNIST test phase 10-44 min per model, "
    "of which 90-99.5% was the similarity search; 3D database creation 21-72 min per model. "
    "Our times are seconds on this machine (see `device`), for the datasets run here."
)


# ----------------------------------------------------------------------------- names and labels
def _spec(model: str):
    """The registry entry of ``model`` (None for a name the registry does not know)."""
    from cbmir.ingest.extractors import get_spec

    try:
        return get_spec(str(model))
    except CbmirError:
        return None


def is_baseline(model: str) -> bool:
    """Whether ``model`` is a weights-free baseline (its registry entry's ``baseline``, e.g. ``hog``)."""
    spec = _spec(model)
    return bool(spec is not None and spec.baseline)


def paper_model_name(model: str) -> str | None:
    """The paper's name of cbmir model ``model`` (its entry's ``paper_name``: ``resnet50`` -> ``ResNet50``, or
    the paper's own spelling); None if not in the study."""
    key = str(model).strip().lower()
    spec = _spec(key)
    if spec is not None:
        return spec.paper_name or None
    for name in _PAPER_MODEL_ORDER:
        if key == name.lower():
            return name
    return None


#: MedMNIST v2 flags -> display names (medmnist 3.0.2 ``INFO[flag]["python_class"]``), so that naming a
#: dataset does not import medmnist (and torch).
_DATASET_NAMES = {
    **{n.lower(): n for n in ("PathMNIST", "ChestMNIST", "DermaMNIST", "OCTMNIST", "PneumoniaMNIST", "RetinaMNIST",
                              "BreastMNIST", "BloodMNIST", "TissueMNIST", "OrganAMNIST", "OrganCMNIST", "OrganSMNIST",
                              "OrganMNIST3D", "NoduleMNIST3D", "AdrenalMNIST3D", "FractureMNIST3D", "VesselMNIST3D",
                              "SynapseMNIST3D")},
    **{d.lower(): d for d in (*DATASETS_2D, *DATASETS_3D)},
}


def dataset_display_name(flag: str) -> str:
    """Display name of a MedMNIST flag: the paper's spelling, else medmnist's class name
    (``vesselmnist3d`` -> ``VesselMNIST3D``), else the flag."""
    key = str(flag).lower()
    if key in _DATASET_NAMES:
        return _DATASET_NAMES[key]
    try:
        from medmnist import INFO

        return str(INFO[key]["python_class"])
    except Exception:  # noqa: BLE001 - display only
        return str(flag)


def row_label(model: str, random_init: bool = False, family: str | None = None, backend: str | None = None,
              input_size: str | None = None) -> str:
    """Row label of a model: its display name (the paper's for the study's models), ``(handcrafted baseline)``
    after a weights-free baseline (``HOG (handcrafted baseline)``), ``[keras]`` for a non-default backend,
    ``[input 224]`` for a CNN input size other than ``native`` and a ``RANDOM-INIT`` suffix for random weights."""
    spec = _spec(model)
    if (spec is not None and spec.baseline) or family in ("handcrafted", "handcrafted baseline"):
        name = f"{spec.display_name if spec is not None else model} (handcrafted baseline)"
    else:
        name = (spec.display_name if spec is not None else None) or paper_model_name(model) or str(model)
    if backend and backend not in ("torch", "numpy", "nan"):
        name += f" [{backend}]"
    if input_size not in (None, "", "native", "nan"):
        name += f" [input {input_size}]"
    if random_init:
        name += " RANDOM-INIT"
    return name


def _model_order(label: str) -> tuple:
    base = label.replace(" RANDOM-INIT", "")
    if "(handcrafted baseline)" in base:
        return (0, 0, label)
    for i, name in enumerate(_PAPER_MODEL_ORDER):
        if base.startswith(name):
            return (1, i, label)
    return (2, 0, label)


def _dataset_order(flag: str) -> tuple:
    order = [d.lower() for d in (*DATASETS_2D, *DATASETS_3D)]
    f = str(flag).lower()
    return (order.index(f), f) if f in order else (len(order), f)


# ----------------------------------------------------------------------------- results
def prepare_results(df: pd.DataFrame) -> pd.DataFrame:
    """Add display columns to a results table (:mod:`cbmir.evaluation.grid`): ``label`` (row label),
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
    from cbmir.evaluation.grid import _input_size_of, _to_bool

    df["random_init"] = df["random_init"].map(_to_bool)
    df["size"] = df["size"].astype(int)
    df["input_size"] = df["input_size"].map(_input_size_of)
    df["label"] = [row_label(m, ri, fam if isinstance(fam, str) else None, str(b), ins)
                   for m, ri, fam, b, ins in zip(df["model"], df["random_init"], df["family"], df["backend"],
                                                 df["input_size"])]
    df["dataset_name"] = [dataset_display_name(d) for d in df["dataset"]]
    df["paper_model"] = [paper_model_name(m) for m in df["model"]]

    def kind(row) -> str:
        v = row["is_3d"]
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, str) and v.lower() in ("true", "false")):
            return "3d" if _to_bool(v) else "2d"
        d = str(row["dataset"]).lower()
        return "3d" if d in {x.lower() for x in DATASETS_3D} or d.endswith("3d") else "2d"

    df["kind"] = [kind(r) for r in df.to_dict("records")] if len(df) else []
    return df


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].astype(str) == "ok"]


def _published_lookup() -> dict[tuple[str, int, str], dict[str, float]]:
    pub = load_published()
    return {(str(r["dataset"]).lower(), int(r["size"]), str(r["model"])): {m: float(r[m]) for m in METRICS}
            for r in pub.to_dict("records")}


def _sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    keys = [(_dataset_order(d), int(s), _model_order(lab), str(dist))
            for d, s, lab, dist in zip(df["dataset"], df["size"], df["label"], df["distance"])]
    order = sorted(range(len(df)), key=lambda i: keys[i])
    return df.iloc[order]


# ----------------------------------------------------------------------------- tables
def per_size_table(df: pd.DataFrame, size: int, distance: str) -> pd.DataFrame:
    """The Table S1-S4 layout for one size and distance: rows dataset x model (the majority-class
    rate as an extra row per dataset), for each metric ``<m>``, ``<m> paper`` and ``<m> Δ``.

    Args:
        df: :func:`prepare_results` output.

    Returns:
        Columns ``Dataset, Model, <m>, <m> paper, <m> Δ`` for m in :data:`METRICS` (percent;
        Δ = ours - paper, percentage points; NaN where the paper has no such row).
    """
    pub = _published_lookup()
    ok = _ok(df)
    rows = _sort_rows(ok[(ok["size"] == int(size)) & (ok["distance"] == distance)])
    out = []
    for dataset, group in rows.groupby("dataset", sort=False):
        name = group["dataset_name"].iloc[0]
        for r in group.to_dict("records"):
            rec = {"Dataset": name, "Model": r["label"]}
            ref = pub.get((str(dataset).lower(), int(size), r["paper_model"])) if r["paper_model"] else None
            for m in METRICS:
                ours = float(r[m])
                paper = ref[m] if ref else float("nan")
                rec[m], rec[f"{m} paper"], rec[f"{m} Δ"] = ours, paper, ours - paper
            out.append(rec)
        maj = group["majority_class_rate"].astype(float).dropna()
        rec = {"Dataset": name, "Model": "majority class (constant answer)"}
        for m in METRICS:
            rec[m] = rec[f"{m} paper"] = rec[f"{m} Δ"] = float("nan")
        rec["ACC@1"] = float(maj.iloc[0]) if len(maj) else float("nan")
        out.append(rec)
    cols = ["Dataset", "Model"] + [c for m in METRICS for c in (m, f"{m} paper", f"{m} Δ")]
    return pd.DataFrame(out, columns=cols)


def average_table(df: pd.DataFrame, kind: str, distance: str) -> pd.DataFrame:
    """Tables 3 / 4 for our rows: per-model means over the ``kind`` (``2d``/``3d``) datasets x sizes.

    ``<m>`` is our mean over every (dataset, size) row of the model; ``<m> paper`` is the paper's
    mean over the same (dataset, size) cells where the paper has the model (NaN for models not in
    the study); ``n`` is our number of rows, ``n paper`` the number of matched paper rows. Datasets
    of the study and others (e.g. VesselMNIST3D) both count in ``<m>``; ``datasets`` lists them.

    Returns:
        One row per model label (sorted like the paper), columns ``Model, n, n paper, datasets``
        and ``<m>``, ``<m> paper`` for m in :data:`METRICS` (percent).
    """
    pub = _published_lookup()
    rows = _ok(df)
    rows = rows[(rows["kind"] == kind) & (rows["distance"] == distance)]
    out = []
    for label, g in rows.groupby("label", sort=False):
        rec: dict[str, Any] = {"Model": label, "n": int(len(g))}
        matched = []
        for r in g.to_dict("records"):
            if r["paper_model"]:
                ref = pub.get((str(r["dataset"]).lower(), int(r["size"]), r["paper_model"]))
                if ref:
                    matched.append(ref)
        rec["n paper"] = len(matched)
        rec["datasets"] = ", ".join(f"{dataset_display_name(d)}@{s}" for d, s in
                                    sorted(zip(g["dataset"], g["size"]), key=lambda x: (_dataset_order(x[0]), x[1])))
        for m in METRICS:
            rec[m] = float(g[m].astype(float).mean())
            rec[f"{m} paper"] = float(np.mean([x[m] for x in matched])) if matched else float("nan")
        out.append(rec)
    cols = ["Model", "n", "n paper", *[c for m in METRICS for c in (m, f"{m} paper")], "datasets"]
    table = pd.DataFrame(out, columns=cols)
    if len(table):
        table = table.iloc[sorted(range(len(table)), key=lambda i: _model_order(table["Model"].iloc[i]))]
    return table.reset_index(drop=True)


def robustness_table(df: pd.DataFrame, distance: str, metric: str = "ACC@1") -> pd.DataFrame:
    """Table 5 for our rows: range of ``metric`` across sizes per (dataset, model), with the paper's
    range over the same sizes and over all of its sizes.

    Only pairs run at two or more sizes are listed.

    Returns:
        Columns ``Dataset, Model, sizes, min, max, range, paper range (same sizes),
        paper range (all sizes)`` (percent / percentage points).
    """
    rows = _ok(df)
    rows = rows[rows["distance"] == distance]
    if rows.empty:
        return pd.DataFrame(columns=["Dataset", "Model", "sizes", "min", "max", "range",
                                     "paper range (same sizes)", "paper range (all sizes)"])
    ours = size_robustness(rows[["dataset", "size", "label", metric]].rename(columns={"label": "model"}),
                           metric=metric)
    pub = load_published()
    out = []
    for r in ours.to_dict("records"):
        if r["n_sizes"] < 2:
            continue
        sub = rows[(rows["dataset"] == r["dataset"]) & (rows["label"] == r["model"])]
        sizes = sorted(int(s) for s in sub["size"])
        pm = paper_model_name(sub["model"].iloc[0]) if not is_baseline(sub["model"].iloc[0]) else None
        p = pub[(pub["dataset"].str.lower() == str(r["dataset"]).lower()) & (pub["model"] == pm)] if pm else pub.iloc[0:0]
        same = p[p["size"].isin(sizes)][metric]
        out.append({
            "Dataset": dataset_display_name(r["dataset"]), "Model": r["model"],
            "sizes": ",".join(map(str, sizes)), "min": r["min"], "max": r["max"], "range": r["range"],
            "paper range (same sizes)": float(same.max() - same.min()) if len(same) >= 2 else float("nan"),
            "paper range (all sizes)": float(p[metric].max() - p[metric].min()) if len(p) >= 2 else float("nan"),
        })
    return pd.DataFrame(out, columns=["Dataset", "Model", "sizes", "min", "max", "range",
                                      "paper range (same sizes)", "paper range (all sizes)"])


def published_robustness_pivot(metric: str = "ACC@1") -> pd.DataFrame:
    """The paper's Table 5 recomputed: range of ``metric`` across sizes, rows dataset, columns model."""
    rob = size_robustness(metric=metric)
    piv = rob.pivot(index="dataset", columns="model", values="range")
    piv = piv.reindex(index=[d for d in (*DATASETS_2D, *DATASETS_3D) if d in piv.index],
                      columns=[m for m in _PAPER_MODEL_ORDER if m in piv.columns])
    piv.index.name = "Dataset"
    return piv.reset_index()


def timing_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables 6 and 7: database creation time, and test time = query extraction + search.

    Extraction times are taken from the cell that extracted the features: a cell whose features were
    replayed from the cache of its other-distance twin (``features_cached``) reports its twin's
    extraction time (the search time is always its own).

    Returns:
        ``(table6, table7)``. table6: ``Dataset, size, Model, threads (torch CPU threads), model load s,
        database creation s, items/s, note``; table7: ``Dataset, size, Model, distance, query extraction s, search s,
        test s, search share %, search ms/query, latency p50 ms, latency p95 ms``.
    """
    from cbmir.evaluation.grid import _to_bool

    rows = _sort_rows(_ok(df))
    cols6 = ["Dataset", "size", "Model", "threads", "model load s", "database creation s", "items/s", "note"]
    cols7 = ["Dataset", "size", "Model", "distance", "query extraction s", "search s", "test s",
             "search share %", "search ms/query", "latency p50 ms", "latency p95 ms"]
    if rows.empty:
        return pd.DataFrame(columns=cols6), pd.DataFrame(columns=cols7)
    for c in ("features_cached", "model_load_s", "database_creation_s", "database_items_per_s",
              "query_extraction_s", "search_s", "search_per_query_ms", "latency_p50_ms", "latency_p95_ms",
              "timing_note", "threads"):
        if c not in rows.columns:
            rows[c] = np.nan
    cached = rows["features_cached"].map(_to_bool)
    t6, src = [], {}
    for (d, s, lab), g in rows.groupby(["dataset", "size", "label"], sort=False):
        gc = cached.loc[g.index]
        pick = g[~gc] if (~gc).any() else g
        r = pick.iloc[0]
        src[(d, s, lab)] = r
        note = r.get("timing_note")
        thr = r.get("threads")
        t6.append({"Dataset": dataset_display_name(d), "size": int(s), "Model": lab,
                   "threads": int(thr) if pd.notna(thr) else None,
                   "model load s": float(r["model_load_s"]), "database creation s": float(r["database_creation_s"]),
                   "items/s": float(r["database_items_per_s"]),
                   "note": "" if not isinstance(note, str) else note})
    t7 = []
    for r in rows.to_dict("records"):
        ext = float(src[(r["dataset"], r["size"], r["label"])]["query_extraction_s"])
        search = float(r["search_s"])
        test = ext + search
        t7.append({"Dataset": dataset_display_name(r["dataset"]), "size": int(r["size"]), "Model": r["label"],
                   "distance": r["distance"], "query extraction s": ext, "search s": search, "test s": test,
                   "search share %": 100.0 * search / test if test > 0 else float("nan"),
                   "search ms/query": float(r["search_per_query_ms"]),
                   "latency p50 ms": float(r["latency_p50_ms"]), "latency p95 ms": float(r["latency_p95_ms"])})
    return pd.DataFrame(t6, columns=cols6), pd.DataFrame(t7, columns=cols7)


# ----------------------------------------------------------------------------- statistics
def _load_outcomes(row: dict, results_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    from cbmir.evaluation.grid import load_per_query, per_query_outcomes

    f = row.get("per_query_file")
    if not isinstance(f, str) or not f:
        return None
    p = _abs(f, results_dir)
    if not p.is_file():
        return None
    pq = load_per_query(p)
    return np.asarray(pq["query_indices"]), per_query_outcomes(pq)


def ci_table(df: pd.DataFrame, results_dir: Path, n_boot: int = 2000, seed: int = 0,
             alpha: float = 0.05) -> pd.DataFrame:
    """95% percentile-bootstrap CIs of every metric of every ok row with a per-query file.

    The metric is recomputed from the per-query top-k labels and checked against the table
    (``check`` = largest |recomputed - table| in percentage points).

    Returns:
        Long format: ``dataset, size, model, label, distance, random_init, metric, n, value, lo, hi,
        check`` (percent).
    """
    from cbmir.evaluation.stats import bootstrap_ci

    out = []
    for r in _sort_rows(_ok(df)).to_dict("records"):
        loaded = _load_outcomes(r, results_dir)
        if loaded is None:
            continue
        _, outcomes = loaded
        for m in METRICS:
            if m not in outcomes:
                continue
            mean, lo, hi = bootstrap_ci(outcomes[m], n_boot=n_boot, alpha=alpha, seed=seed)
            out.append({"dataset": r["dataset"], "size": int(r["size"]), "model": r["model"], "label": r["label"],
                        "distance": r["distance"], "random_init": bool(r["random_init"]), "metric": m,
                        "n": int(len(outcomes[m])), "value": 100 * mean, "lo": 100 * lo, "hi": 100 * hi,
                        "check": abs(100 * mean - float(r[m]))})
    return pd.DataFrame(out, columns=["dataset", "size", "model", "label", "distance", "random_init", "metric",
                                      "n", "value", "lo", "hi", "check"])


_CI_MISMATCH_MARK = "†"


def _cells_without_ci(df: pd.DataFrame, ci: pd.DataFrame, results_dir: Path) -> list[str]:
    """``ok`` rows of ``df`` absent from ``ci``, each with why (per-query file not saved / not found)."""
    have = set(zip(ci["dataset"], ci["size"].astype(int), ci["label"], ci["distance"]))
    out = []
    for r in _sort_rows(_ok(df)).to_dict("records"):
        if (r["dataset"], int(r["size"]), r["label"], r["distance"]) in have:
            continue
        f = r.get("per_query_file")
        if not (isinstance(f, str) and f):
            why = "no per-query file saved"
        else:
            why = f"per-query file {_abs(f, results_dir)} " + ("unusable" if _abs(f, results_dir).is_file()
                                                               else "not found")
        out.append(f"{dataset_display_name(r['dataset'])}@{int(r['size'])} {r['label']} {r['distance']} ({why})")
    return out


def tie_diagnostics(df: pd.DataFrame, results_dir: Path, threshold: float = 10.0) -> pd.DataFrame:
    """Rows whose retrieval is decided by ties: the percentage of queries whose k scores are all equal.

    When a feature extractor collapses (e.g. random weights mapping most inputs to one vector), many
    database points tie with the query and the tie rule (lower database index first) picks the top-k,
    so the metrics describe the tie rule, not similarity. Equality is within 1e-6 (relative).

    Returns:
        Columns ``Dataset, size, Model, distance, tied top-k %`` for ok rows with a per-query file
        where that percentage exceeds ``threshold``.
    """
    out = []
    for r in _sort_rows(_ok(df)).to_dict("records"):
        f = r.get("per_query_file")
        if not isinstance(f, str) or not f or not _abs(f, results_dir).is_file():
            continue
        from cbmir.evaluation.grid import load_per_query

        sc = np.asarray(load_per_query(_abs(f, results_dir))["topk_scores"], dtype=np.float64)
        tol = 1e-6 * np.maximum(1.0, np.abs(sc[:, :1]))
        tied = 100.0 * float(np.mean(np.all(np.abs(sc - sc[:, :1]) <= tol, axis=1)))
        if tied > threshold:
            out.append({"Dataset": dataset_display_name(r["dataset"]), "size": int(r["size"]), "Model": r["label"],
                        "distance": r["distance"], "tied top-k %": tied})
    return pd.DataFrame(out, columns=["Dataset", "size", "Model", "distance", "tied top-k %"])


def _holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    n = len(p)
    if n == 0:
        return []
    order = np.argsort(p, kind="stable")
    adj = np.empty(n)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (n - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def paired_table(df: pd.DataFrame, results_dir: Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired comparisons of every pair of models on the same dataset, size and distance.

    For each pair (A, B) with per-query files over the same queries: ACC@1 and mAP@5 differences
    (A - B, percentage points) with paired-bootstrap 95% CIs and p-values
    (:func:`cbmir.evaluation.stats.paired_bootstrap`), and McNemar's test on ACC@1
    (:func:`cbmir.evaluation.stats.mcnemar`; ``b01`` = A wrong & B right, ``b10`` = A right & B wrong)
    with Holm-adjusted p-values over the pairs of the same dataset / size / distance.

    Returns:
        Columns ``Dataset, size, distance, A, B, n, ΔACC@1, ΔACC@1 lo, ΔACC@1 hi, p boot ACC@1,
        b01, b10, p McNemar, p McNemar (Holm), method, ΔmAP@5, ΔmAP@5 lo, ΔmAP@5 hi, p boot mAP@5``.
    """
    from cbmir.evaluation.stats import mcnemar, paired_bootstrap

    cols = ["Dataset", "size", "distance", "A", "B", "n", "ΔACC@1", "ΔACC@1 lo", "ΔACC@1 hi", "p boot ACC@1",
            "b01", "b10", "p McNemar", "p McNemar (Holm)", "method", "ΔmAP@5", "ΔmAP@5 lo", "ΔmAP@5 hi",
            "p boot mAP@5"]
    out = []
    rows = _sort_rows(_ok(df))
    for (d, s, dist), g in rows.groupby(["dataset", "size", "distance"], sort=False):
        loaded = [(r, _load_outcomes(r, results_dir)) for r in g.to_dict("records")]
        loaded = [(r, x) for r, x in loaded if x is not None]
        group = []
        for i in range(len(loaded)):
            for j in range(i + 1, len(loaded)):
                (ra, (qa, oa)), (rb, (qb, ob)) = loaded[i], loaded[j]
                if qa.shape != qb.shape or not np.array_equal(qa, qb):
                    continue
                acc = paired_bootstrap(oa["ACC@1"], ob["ACC@1"], n_boot=n_boot, seed=seed)
                mc = mcnemar(oa["ACC@1"], ob["ACC@1"])
                mapb = paired_bootstrap(oa["mAP@5"], ob["mAP@5"], n_boot=n_boot, seed=seed)
                group.append({
                    "Dataset": dataset_display_name(d), "size": int(s), "distance": dist,
                    "A": ra["label"], "B": rb["label"], "n": int(len(qa)),
                    "ΔACC@1": 100 * acc["diff"], "ΔACC@1 lo": 100 * acc["lo"], "ΔACC@1 hi": 100 * acc["hi"],
                    "p boot ACC@1": acc["p_value"], "b01": mc["b01"], "b10": mc["b10"],
                    "p McNemar": mc["p_value"], "method": mc["method"],
                    "ΔmAP@5": 100 * mapb["diff"], "ΔmAP@5 lo": 100 * mapb["lo"], "ΔmAP@5 hi": 100 * mapb["hi"],
                    "p boot mAP@5": mapb["p_value"],
                })
        for rec, adj in zip(group, _holm([x["p McNemar"] for x in group])):
            rec["p McNemar (Holm)"] = adj
        out.extend(group)
    return pd.DataFrame(out, columns=cols)


def distance_table(df: pd.DataFrame, results_dir: Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Cosine vs Euclidean for the same (dataset, size, model) where both were run.

    Returns:
        Columns ``Dataset, size, Model, <m> cosine, <m> euclidean`` for every metric, then
        ``ΔACC@1`` (cosine - euclidean, pp), its paired-bootstrap CI, ``p McNemar`` and
        ``identical top-k`` (fraction of queries whose top-k database rows are the same, in order).
    """
    from cbmir.evaluation.grid import load_per_query
    from cbmir.evaluation.stats import mcnemar, paired_bootstrap

    rows = _sort_rows(_ok(df))
    cols = ["Dataset", "size", "Model", *[f"{m} {d}" for m in METRICS for d in ("cosine", "euclidean")],
            "ΔACC@1", "ΔACC@1 lo", "ΔACC@1 hi", "p McNemar", "identical top-k"]
    out = []
    for (d, s, lab), g in rows.groupby(["dataset", "size", "label"], sort=False):
        by = {r["distance"]: r for r in g.to_dict("records")}
        if not {"cosine", "euclidean"} <= set(by):
            continue
        c, e = by["cosine"], by["euclidean"]
        rec: dict[str, Any] = {"Dataset": dataset_display_name(d), "size": int(s), "Model": lab}
        for m in METRICS:
            rec[f"{m} cosine"], rec[f"{m} euclidean"] = float(c[m]), float(e[m])
        lc, le = _load_outcomes(c, results_dir), _load_outcomes(e, results_dir)
        rec.update({"ΔACC@1": float(c["ACC@1"]) - float(e["ACC@1"]), "ΔACC@1 lo": float("nan"),
                    "ΔACC@1 hi": float("nan"), "p McNemar": float("nan"), "identical top-k": float("nan")})
        if lc is not None and le is not None and np.array_equal(lc[0], le[0]):
            pb = paired_bootstrap(lc[1]["ACC@1"], le[1]["ACC@1"], n_boot=n_boot, seed=seed)
            rec["ΔACC@1 lo"], rec["ΔACC@1 hi"] = 100 * pb["lo"], 100 * pb["hi"]
            rec["p McNemar"] = mcnemar(lc[1]["ACC@1"], le[1]["ACC@1"])["p_value"]
            pc = load_per_query(_abs(c["per_query_file"], results_dir))
            pe = load_per_query(_abs(e["per_query_file"], results_dir))
            rec["identical top-k"] = 100 * float(np.mean(np.all(pc["topk_indices"] == pe["topk_indices"], axis=1)))
        out.append(rec)
    return pd.DataFrame(out, columns=cols)


def _abs(f: str, results_dir: Path) -> Path:
    return Path(f) if Path(f).is_absolute() else results_dir / f


# ----------------------------------------------------------------------------- markdown
def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}f}"
    s = str(v)
    return "—" if s in ("nan", "None") else s.replace("|", "\\|").replace("\n", " ")


def _fmt_p(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def markdown_table(df: pd.DataFrame, digits: int = 2, formats: dict[str, Any] | None = None,
                   signed: Iterable[str] = ()) -> str:
    """A pipe table of ``df``: floats with ``digits`` decimals, NaN as ``—``; ``formats`` maps a
    column to a function value -> str; columns in ``signed`` get an explicit sign (differences)."""
    formats = dict(formats or {})
    signed = set(signed)
    if df is None or df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
                            else "---" for c in cols) + "|"]
    for rec in df.to_dict("records"):
        cells = []
        for c in cols:
            v = rec[c]
            if c in formats:
                cells.append(formats[c](v))
            elif c in signed and isinstance(v, (float, np.floating)) and not math.isnan(v):
                cells.append(f"{v:+.{digits}f}")
            else:
                cells.append(_fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_acc1_by_size(values: pd.DataFrame, path: Path, title: str, *, majority: dict[int, float] | None = None,
                      paper: pd.DataFrame | None = None) -> Path:
    """Figures 3-10: ACC@1 per model, one bar per image size.

    Args:
        values: columns ``Model, size, ACC@1`` (percent) and optionally ``lo, hi`` (95% CI).
        path: PNG file to write.
        title: figure title.
        majority: ``{size: majority-class rate}``, drawn as dashed lines (the ACC@1 floor).
        paper: columns ``Model, size, ACC@1`` of the paper, drawn as black ``x`` markers.

    Returns:
        ``path``.
    """
    plt = _plt()
    models = sorted(values["Model"].unique(), key=_model_order)
    sizes = sorted(int(s) for s in values["size"].unique())
    width = 0.8 / max(1, len(sizes))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(models) + 2.5), 4.8))
    cmap = plt.get_cmap("viridis")
    x = np.arange(len(models))
    for j, s in enumerate(sizes):
        sub = values[values["size"] == s].set_index("Model")
        h = [float(sub.at[m, "ACC@1"]) if m in sub.index else np.nan for m in models]
        offs = x - 0.4 + width * (j + 0.5)
        color = cmap(0.15 + 0.7 * j / max(1, len(sizes) - 1)) if len(sizes) > 1 else cmap(0.35)
        err = None
        if "lo" in sub.columns and "hi" in sub.columns:
            lo = np.array([float(sub.at[m, "lo"]) if m in sub.index else np.nan for m in models])
            hi = np.array([float(sub.at[m, "hi"]) if m in sub.index else np.nan for m in models])
            hh = np.array(h)
            if np.isfinite(lo).any():
                # clipped at 0: a table value outside its per-query CI (flagged in the statistics section)
                err = np.maximum(0, np.vstack([np.where(np.isfinite(lo), hh - lo, 0),
                                               np.where(np.isfinite(hi), hi - hh, 0)]))
        ax.bar(offs, h, width=width * 0.95, color=color, label=f"{s} px" if s else str(s), yerr=err,
               capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
        if paper is not None and len(paper):
            ps = paper[paper["size"] == s].set_index("Model")
            ph = [float(ps.at[m, "ACC@1"]) if m in ps.index else np.nan for m in models]
            if np.isfinite(ph).any():
                ax.scatter(offs, ph, marker="x", color="black", zorder=5, s=28,
                           label="paper" if j == 0 else None)
    if majority:
        for j, (s, v) in enumerate(sorted(majority.items())):
            if v is not None and np.isfinite(v):
                ax.axhline(v, color="tab:red", ls="--", lw=1,
                           label=("majority class" if len(set(majority.values())) == 1 else f"majority class ({s} px)")
                           if j == 0 or len(set(majority.values())) > 1 else None)
    ax.set_xticks(x)
    ax.set_xticklabels([m.replace(" RANDOM-INIT", "\nRANDOM-INIT").replace(" (handcrafted", "\n(handcrafted")
                        for m in models], fontsize=8)
    ax.set_ylabel("ACC@1 (%)")
    finite = values["ACC@1"].astype(float)
    lo_lim = max(0.0, min(finite.min(), *(majority or {0: 100}).values()) - 15)
    ax.set_ylim(lo_lim, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tsne_figure(vectors: np.ndarray, labels: np.ndarray, path: Path, title: str, *,
                class_names: Sequence[str] | None = None, max_points: int = 2000, seed: int = 0,
                max_iter: int = 500) -> Path:
    """Figure 11: t-SNE of feature vectors coloured by class.

    Args:
        vectors: float32 ``(N, D)`` features (e.g. the database split of one collection).
        labels: int ``(N,)`` class labels.
        path: PNG file to write.
        max_points: at most this many points, a uniform random subsample (seeded) when N is larger.
        class_names: legend names by label index.
        max_iter: t-SNE optimisation iterations (scikit-learn's minimum is 250).

    Steps: subsample; PCA to 50 dims when D > 50 (scikit-learn); ``TSNE(n_components=2,
    perplexity=min(30, (n - 1) / 3), init="pca", max_iter=max_iter, random_state=seed)`` on one
    OpenMP thread.

    Raises:
        CbmirError: fewer than 5 points.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(vectors, dtype=np.float32)
    y = np.asarray(labels)
    if len(x) < 5:
        raise CbmirError(f"t-SNE needs at least 5 points, got {len(x)}")
    rng = np.random.default_rng(seed)
    if len(x) > max_points:
        idx = np.sort(rng.choice(len(x), size=max_points, replace=False))
        x, y = x[idx], y[idx]
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, len(x) - 1), random_state=seed).fit_transform(x)
    # One OpenMP thread: on a shared, oversubscribed CPU the gradient's OpenMP threads spin-wait
    # (measured here: 49 s with the default threads vs 4 s with one, 150 points).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        emb = TSNE(n_components=2, perplexity=float(min(30.0, (len(x) - 1) / 3.0)), init="pca",
                   learning_rate="auto", max_iter=int(max_iter), random_state=seed).fit_transform(x)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    cmap = plt.get_cmap("tab10")
    for i, lab in enumerate(np.unique(y)):
        m = y == lab
        name = class_names[int(lab)] if class_names is not None and 0 <= int(lab) < len(class_names) else str(lab)
        ax.scatter(emb[m, 0], emb[m, 1], s=6, alpha=0.7, color=cmap(i % 10), label=f"{int(lab)}: {name}"[:40])
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report
@dataclass
class ReportOutput:
    """What :func:`build_report` wrote: the Markdown file, the PNG figures, notes (skipped parts),
    and the tables as DataFrames (keyed by section)."""

    markdown: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _published_section(lines: list[str], out: ReportOutput) -> None:
    lines.append("## The published tables (recomputed from the supplementary Tables S1-S4)\n")
    lines.append("Per-model means of the study's supplementary rows (`evaluation/data/paper_results.csv`): "
                 "Table 3 over the six 2D datasets x four sizes, Table 4 over the two 3D datasets x two sizes. "
                 "A `printed` column gives the value printed in the paper's table where it is transcribed "
                 "(`cbmir.evaluation.reference.PRINTED_TABLE_VALUES`).\n")
    for table, kind in (("Table 3", "2d"), ("Table 4", "3d")):
        avg = published_averages(kind).reset_index()
        avg = avg.rename(columns={"model": "Model", "n_rows": "n rows"})
        for (t, model, metric), v in PRINTED_TABLE_VALUES.items():
            if t == table:
                avg[f"{metric} printed"] = [v if m == model else np.nan for m in avg["Model"]]
        out.tables[f"published {table}"] = avg
        what = "2D datasets (BreastMNIST ... PathMNIST; 28, 64, 128, 224 px)" if kind == "2d" else \
            "3D datasets (AdrenalMNIST3D, SynapseMNIST3D; 28³, 64³)"
        lines.append(f"### {table}: average over the {what}\n")
        lines.append(markdown_table(avg))
    dis = table_disagreements()
    out.tables["disagreements"] = dis
    lines.append("### Printed values that disagree with the recomputation\n")
    if dis.empty:
        lines.append("None.\n")
    else:
        lines.append(markdown_table(dis.rename(columns={"difference": "printed - recomputed"}),
                                    signed=["printed - recomputed"]))
        for r in dis.to_dict("records"):
            lines.append(f"- {r['table']}, {r['model']} {r['metric']}: printed **{r['printed']:.2f}**, "
                         f"the supplementary rows average **{r['recomputed']:.2f}** "
                         f"({r['difference']:+.2f} pp).")
        lines.append("")
    lines.append("MedCLIP has no BreastMNIST 64 px row in the supplement, so its 2D average is over 23 rows "
                 "(`n rows`).\n")


def _published_figures(fig_dir: Path, out: ReportOutput) -> list[tuple[str, Path]]:
    pub = load_published()
    figs = []
    for i, d in enumerate((*DATASETS_2D, *DATASETS_3D)):
        sub = pub[pub["dataset"] == d].rename(columns={"model": "Model"})
        path = plot_acc1_by_size(sub[["Model", "size", "ACC@1"]], fig_dir / f"paper_acc1_{d.lower()}.png",
                                 f"Paper, {d}: ACC@1 per model and image size (Figure {3 + i} redrawn)")
        figs.append((f"Figure {3 + i} (paper, redrawn): {d}", path))
        out.figures.append(path)
    return figs


def _open_store_for(row: dict, store_path, qdrant_url):
    from cbmir.search.store import open_store

    if qdrant_url:
        return open_store(qdrant_url=qdrant_url)
    if store_path:
        return open_store(store_path=store_path)
    loc = row.get("store")
    if isinstance(loc, str) and loc.startswith(("http://", "https://")):
        return open_store(qdrant_url=loc)
    if isinstance(loc, str) and loc and Path(loc).exists():
        return open_store(store_path=loc)
    raise CbmirError("no store for the t-SNE figure: pass --store-path (or --qdrant-url)")


def _class_names(dataset: str) -> list[str] | None:
    try:
        from medmnist import INFO

        lab = INFO[str(dataset).lower()]["label"]
        return [lab[k] for k in sorted(lab, key=int)]
    except Exception:  # noqa: BLE001 - legend only
        return None


def _tsne_section(df: pd.DataFrame, fig_dir: Path, out: ReportOutput, *, store_path, qdrant_url,
                  collection: str | None, max_points: int = 2000) -> tuple[str, Path] | None:
    ok = _ok(df)
    if collection:
        cand = ok[ok["collection"] == collection]
        if cand.empty:
            out.notes.append(f"t-SNE: collection {collection!r} is not in the results table; figure skipped")
            return None
    else:
        cand = ok[ok["kind"] == "2d"] if (ok["kind"] == "2d").any() else ok
        cand = cand.sort_values(["random_init", "ACC@1"], ascending=[True, False])
    if cand.empty:
        return None
    row = cand.iloc[0].to_dict()
    name = str(row["collection"])
    try:
        store = _open_store_for(row, store_path, qdrant_url)
        try:
            _, vecs, pays = store.fetch(name, "train", with_vectors=True)
        finally:
            store.close()
    except Exception as e:  # noqa: BLE001 - a figure must not stop the report
        out.notes.append(f"t-SNE of {name}: store not readable ({e}); figure skipped")
        return None
    labels = np.asarray([p["label"] for p in pays], dtype=np.int64)
    path = fig_dir / f"tsne_{name}.png"
    n = min(len(vecs), int(max_points))
    tsne_figure(vecs, labels, path,
                f"t-SNE of database features: {row['label']}\n{dataset_display_name(row['dataset'])} "
                f"{row['size']} px, {row['distance']}, {n} of {len(vecs)} points", class_names=_class_names(row["dataset"]),
                max_points=max_points)
    out.figures.append(path)
    return (f"Figure 11: t-SNE of the database (train) features of `{name}` ({row['label']})", path)


def read_results_tables(paths: Sequence[str | os.PathLike]) -> tuple[pd.DataFrame, list[str]]:
    """One results table from several (e.g. grids run in parallel or on different machines).

    Each table is read with :func:`cbmir.evaluation.grid.read_results`; relative ``per_query_file`` paths are
    made absolute against their own table's folder; a table given twice (same resolved path) is read
    once. Where two tables hold the same cell (:data:`cbmir.evaluation.grid.KEY`), an ``ok`` row wins over
    one of another status (``failed``); among rows of the same status the later table's row wins.

    Returns:
        (table, notes): ``notes`` names each cell found in more than one table and whose row is used.

    Raises:
        CbmirError: a path is missing or not a results table (names the path).
    """
    from cbmir.evaluation.grid import KEY, read_results

    frames, seen = [], set()
    for p in paths:
        rp = Path(p)
        if rp.is_dir():
            raise CbmirError(f"--results {rp} is a directory; give the results CSV/Parquet file of `cbmir "
                             f"benchmark` (e.g. {rp / 'results.csv'})")
        if not rp.is_file():
            raise CbmirError(f"results table {rp} does not exist; run `cbmir benchmark --results {rp}` first, "
                             "or omit --results for the published tables only")
        if rp.resolve() in seen:
            continue
        seen.add(rp.resolve())
        t = read_results(rp)
        t["per_query_file"] = [_abs(f, rp.parent).resolve().as_posix() if isinstance(f, str) and f else f
                               for f in t["per_query_file"]]
        t["_table"] = str(rp)
        frames.append(t)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["_pos"] = np.arange(len(df))
    df["_last"] = df.groupby(list(KEY), sort=False)["_pos"].transform("max")
    multi = df.duplicated(list(KEY), keep=False)
    # the row kept for a cell: the last of its ok rows, else the last row
    ranked = df.assign(_is_ok=df["status"] == "ok").sort_values(["_is_ok", "_pos"], kind="stable")
    kept = ranked.index[~ranked.duplicated(list(KEY), keep="last")]
    df = df.loc[sorted(kept, key=lambda i: df.at[i, "_pos"])]
    notes = []
    for r in df[multi.loc[df.index]].to_dict("records"):
        which = ("the row of the later table is used" if r["_pos"] == r["_last"]
                 else f"the ok row of {r['_table']} is used, not a later table's non-ok row")
        notes.append(f"cell {r['dataset']}@{r['size']} {r['model']}/{r['backend']} {r['distance']}"
                     f"{' random-init' if r['random_init'] else ''} is in more than one table; {which}")
    df = df.drop(columns=["_table", "_pos", "_last"]).reset_index(drop=True)
    return df, notes


def _emit(lines: list[str], out: ReportOutput, key: str, table: pd.DataFrame, heading: str, **fmt) -> bool:
    """Append ``heading`` and ``table`` (Markdown) to ``lines`` and keep it as ``out.tables[key]``;
    nothing when the table is empty. Returns whether it was emitted."""
    if table.empty:
        return False
    out.tables[key] = table
    lines.append(heading)
    lines.append(markdown_table(table, **fmt))
    return True


def build_report(results: str | os.PathLike | Sequence[str | os.PathLike] | None, output: str | os.PathLike, *,
                 store_path=None,
                 qdrant_url: str | None = None, tsne_collection: str | None = None, tsne: bool = True,
                 tsne_max_points: int = 2000, n_boot: int = 2000, seed: int = 0) -> ReportOutput:
    """Write the report (``<output>/report.md``, ``<output>/figures/*.png``, statistics CSVs).

    Args:
        results: results CSV of :func:`cbmir.evaluation.grid.run_grid`, a list of them (merged by
            :func:`read_results_tables`), or None for the published tables only.
        output: output directory (created).
        store_path / qdrant_url: store holding the t-SNE collection (default: each row's ``store``).
        tsne_collection: collection of the t-SNE figure (default: the 2D row with the best ACC@1,
            pretrained rows first).
        tsne: draw the t-SNE figure; tsne_max_points: its subsample size (at most 2,000 in the study's
            spirit; fewer is faster).
        n_boot: bootstrap resamples for CIs and paired tests; seed: their seed.

    Returns:
        :class:`ReportOutput`.

    Raises:
        CbmirError: ``results`` is given but missing or not a results table.
    """
    out_dir = Path(output)
    fig_dir = out_dir / "figures"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # /proc, /sys, a read-only or unwritable folder
        raise CbmirError(f"--output {out_dir}: cannot create the report folder there ({exc.strerror or exc}); "
                         "choose a writable directory") from None
    out = ReportOutput(markdown=out_dir / "report.md")
    lines: list[str] = ["# cbmir retrieval report\n"]
    lines.append("Reproduction of Mahbod, Saeidi, Hatamikia, Woitek, *Evaluating pre-trained convolutional "
                 "neural networks and foundation models as feature extractors for content-based medical image "
                 "retrieval*, Eng. Appl. Artif. Intell. 150 (2025) 110571. Protocol: zero-shot, train split = "
                 "database, test split = queries, exact top-k; metrics in percent (mAP@5, mMV@5, ACC@1/3/5).\n")

    df = None
    tables = [] if results is None else ([results] if isinstance(results, (str, os.PathLike)) else list(results))
    if tables:
        merged, merge_notes = read_results_tables(tables)
        out.notes.extend(merge_notes)
        df = prepare_results(merged)
        results_dir = Path(tables[0]).parent  # per-query paths are absolute after the merge
    if df is None or df.empty:
        lines.append("No results table given: this report holds the study's published tables only.\n")
        _published_section(lines, out)
        lines.append("## Table 5 (published): range of ACC@1 across image sizes\n")
        piv = published_robustness_pivot()
        out.tables["published Table 5"] = piv
        lines.append(markdown_table(piv))
        lines.append("## Figures 3-10 (published values, redrawn)\n")
        for caption, path in _published_figures(fig_dir, out):
            lines.append(f"**{caption}**\n\n![{caption}](figures/{path.name})\n")
        out.markdown.write_text("\n".join(lines), encoding="utf-8")
        return out

    ok = _ok(df)
    failed = df[df["status"].astype(str) != "ok"]
    distances = [d for d in ("cosine", "euclidean") if d in set(ok["distance"])]
    # ------------------------------------------------------------------ provenance
    lines.append("## Runs\n")
    lines.append(f"Results table{'s' if len(tables) > 1 else ''}: "
                 f"{', '.join(f'`{Path(t).resolve()}`' for t in tables)} — {len(df)} cells, {len(ok)} ok, "
                 f"{len(failed)} failed. Distances: {', '.join(distances) or 'none'}.")
    vers = []
    for c in ("cbmir_version", "torch_version", "timm_version", "qdrant_edge_version", "numpy_version",
              "python_version", "engine", "device"):
        if c in ok.columns and ok[c].notna().any():
            vals = sorted({str(v) for v in ok[c].dropna()})
            vers.append(f"{c.replace('_version', '')} {'/'.join(vals)}")
    if vers:
        lines.append("Software and engine: " + "; ".join(vers) + ".\n")
    if ok["random_init"].any():
        lines.append("> **RANDOM-INIT rows** use randomly initialised CNN weights (a seeded smoke run of the "
                     "pipeline), not the pretrained ImageNet weights of the study. Their difference to the "
                     "paper measures what pretraining contributes, nothing about cbmir's fidelity. The "
                     "weights-free HOG baseline and the majority-class rate are the fair references.\n")
    if len(failed):
        lines.append("### Failed cells\n")
        ft = failed[["dataset", "size", "model", "backend", "distance", "random_init", "error"]].copy()
        lines.append(markdown_table(_sort_rows(prepare_results(ft))[["dataset", "size", "model", "backend",
                                                                     "distance", "random_init", "error"]]))

    ties = tie_diagnostics(df, results_dir)
    out.tables["ties"] = ties
    if len(ties):
        lines.append("### Warning: retrieval decided by ties (collapsed features)\n")
        lines.append("For these rows, the listed share of queries has all top-k scores equal: the extractor maps "
                     "many inputs to the same vector, so the top-k is chosen by the tie rule (lower database "
                     "index first), not by similarity. Their metrics (often ACC@3/ACC@5 near 100%) are "
                     "artifacts.\n")
        lines.append(markdown_table(ties))

    # ------------------------------------------------------------------ baselines
    lines.append("## Baselines per dataset: majority class and weights-free features\n")
    lines.append("The majority-class rate is the ACC@1 of always answering the database's most frequent class "
                 "(every metric of that constant answer equals it); any feature extractor should beat it. "
                 "HOG is the weights-free handcrafted baseline; `design ref.` is the HOG result measured when "
                 "cbmir was designed (DESIGN.md §3, cosine), a pipeline check.\n")
    base = []
    for (d, s), g in _sort_rows(ok).groupby(["dataset", "size"], sort=False):
        maj = g["majority_class_rate"].astype(float).dropna()
        rec = {"Dataset": dataset_display_name(d), "size": int(s),
               "n database": int(g["n_database"].iloc[0]) if "n_database" in g and pd.notna(g["n_database"].iloc[0]) else None,
               "n queries": int(g["n_queries"].iloc[0]) if "n_queries" in g and pd.notna(g["n_queries"].iloc[0]) else None,
               "majority class ACC@1": float(maj.iloc[0]) if len(maj) else float("nan")}
        for dist in distances:
            h = g[g["model"].map(is_baseline) & (g["distance"] == dist)]
            rec[f"HOG ACC@1 ({dist})"] = float(h["ACC@1"].iloc[0]) if len(h) else "not run"
        ref = SANITY_REFERENCE.get((str(d).lower(), int(s)))
        rec["HOG ACC@1 design ref."] = ref[2] if ref else float("nan")
        best = g[~g["model"].map(is_baseline)]
        if len(best):
            b = best.loc[best["ACC@1"].astype(float).idxmax()]
            rec["best other ACC@1"] = f"{float(b['ACC@1']):.2f} ({b['label']}, {b['distance']})"
        base.append(rec)
    base_df = pd.DataFrame(base)
    out.tables["baselines"] = base_df
    lines.append(markdown_table(base_df))
    hog_cols = [f"HOG ACC@1 ({dist})" for dist in distances]
    missing_hog = [f"{r['Dataset']}@{r['size']}" for r in base
                   if hog_cols and all(r.get(c) == "not run" for c in hog_cols)]
    if missing_hog:
        lines.append(f"No weights-free baseline was run for: {', '.join(missing_hog)}.\n")
    for dist, col in zip(distances, hog_cols):  # HOG run, but not with every distance of the table
        partial = [f"{r['Dataset']}@{r['size']}" for r in base
                   if r.get(col) == "not run" and any(r.get(c) != "not run" for c in hog_cols)]
        if partial:
            lines.append(f"HOG was not run with the {dist} distance for: {', '.join(partial)} "
                         "(its other-distance result is in the table).\n")

    from cbmir.evaluation.study_rows import side_by_side_section

    lines += side_by_side_section(ok, distances, markdown_table)
    # ------------------------------------------------------------------ S1-S4
    lines.append("## Per-size results (layout of the study's Tables S1-S4)\n")
    lines.append("Ours, the paper's value (`paper`) and ours - paper (`Δ`, percentage points). The paper's "
                 "numbers are pretrained Keras models (and foundation models); `—` where the paper has no row.\n")
    s_names = {28: "S1", 64: "S2", 128: "S3", 224: "S4"}
    for size in sorted(set(int(s) for s in ok["size"])):
        for dist in distances:
            t = per_size_table(df, size, dist)
            _emit(lines, out, f"size {size} {dist}", t,
                  f"### Table {s_names.get(size, '')} layout: {size} px ({size}³ for 3D), {dist}\n",
                  signed=[c for c in t.columns if c.endswith("Δ")])

    # ------------------------------------------------------------------ Tables 3/4
    lines.append("## Averages over the 2D and the 3D datasets (Tables 3 and 4)\n")
    lines.append("`<metric>` = our mean over the (dataset, size) rows listed; `<metric> paper` = the paper's "
                 "mean over the same cells (where the study has the model). Our 3D average includes 3D "
                 "datasets outside the study (e.g. VesselMNIST3D); `n paper` counts the matched cells.\n")
    for kind, table in (("2d", "Table 3"), ("3d", "Table 4")):
        for dist in distances:
            _emit(lines, out, f"{table} ours {dist}", average_table(df, kind, dist),
                  f"### {table} layout ({kind.upper()}), {dist}\n")
    _published_section(lines, out)

    # ------------------------------------------------------------------ Table 5
    lines.append("## Size robustness (Table 5): range of ACC@1 across sizes\n")
    any_rob = False
    for dist in distances:
        any_rob |= _emit(lines, out, f"Table 5 ours {dist}", robustness_table(df, dist), f"### Ours, {dist}\n")
    if not any_rob:
        lines.append("No (dataset, model) was run at two or more sizes.\n")
    lines.append("### Published (all sizes)\n")
    piv = published_robustness_pivot()
    out.tables["published Table 5"] = piv
    lines.append(markdown_table(piv))

    # ------------------------------------------------------------------ Tables 6/7
    t6, t7 = timing_tables(df)
    out.tables["Table 6"], out.tables["Table 7"] = t6, t7
    lines.append("## Timings (Tables 6 and 7)\n")
    lines.append(_PAPER_TIMING_NOTE + "\n")
    lines.append("### Table 6 layout: database creation (train split: extraction + upsert), seconds\n")
    lines.append("`threads`: torch CPU threads of the run (`—`: not recorded, torch's default). On a shared CPU "
                 "the times depend on the load of the machine; compare them within one run.\n")
    lines.append(markdown_table(t6, formats={"threads": lambda v: "—" if v is None or pd.isna(v) else str(int(v))}))
    lines.append("### Table 7 layout: test time = query extraction + search, seconds\n")
    lines.append("Query extraction is the test split's extraction + upsert (taken from the cell that extracted "
                 "the features when a twin replayed them); search is every query, batched, exact top-k; "
                 "latency is one query at a time.\n")
    lines.append(markdown_table(t7))

    # ------------------------------------------------------------------ statistics
    lines.append("## Statistics (beyond the study)\n")
    ci = ci_table(df, results_dir, n_boot=n_boot, seed=seed)
    out.tables["ci"] = ci
    if ci.empty:
        lines.append("No per-query files (run the grid with `--save-per-query`): no CIs or paired tests.\n")
    else:
        ci.to_csv(out_dir / "stats_ci.csv", index=False)
        worst = float(ci["check"].max())
        lines.append(f"### 95% bootstrap confidence intervals ({n_boot} resamples of the queries, percentile "
                     "interval; `cbmir.evaluation.stats.bootstrap_ci`)\n")
        lines.append(f"Every metric was recomputed from the saved per-query top-k labels; largest difference "
                     f"to the table: {worst:.2g} pp.\n")
        bad = ci[ci["check"] > 1e-6]
        if not bad.empty:
            cells = sorted({f"{dataset_display_name(r['dataset'])}@{int(r['size'])} {r['label']} {r['distance']}"
                            for r in bad.to_dict("records")})
            msg = (f"per-query files disagree with the results table for {', '.join(cells)}: the file may come "
                   "from another run of that cell; re-run the cell to make them agree")
            lines.append(f"**Warning:** {msg}.\n")
            out.notes.append(msg)
        wide = []
        for (d, s, lab, dist), g in ci.groupby(["dataset", "size", "label", "distance"], sort=False):
            mark = _CI_MISMATCH_MARK if float(g["check"].max()) > 1e-6 else ""
            rec = {"Dataset": dataset_display_name(d), "size": int(s), "Model": lab + mark, "distance": dist,
                   "n": int(g["n"].iloc[0])}
            for r in g.to_dict("records"):
                rec[r["metric"]] = f"{r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
            wide.append(rec)
        lines.append(markdown_table(pd.DataFrame(wide)))
        if not bad.empty:
            lines.append(f"{_CI_MISMATCH_MARK} per-query file disagrees with the table; CI not comparable.\n")
        without = _cells_without_ci(df, ci, results_dir)
        if without:
            msg = f"no CIs for {', '.join(without)}"
            lines.append(f"**Note:** {msg}.\n")
            out.notes.append(msg)
        pt = paired_table(df, results_dir, n_boot=n_boot, seed=seed)
        out.tables["paired"] = pt
        if not pt.empty:
            pt.to_csv(out_dir / "stats_paired.csv", index=False)
        lines.append("### Paired comparisons of models (same dataset, size, distance and queries)\n")
        lines.append("Δ = A - B in percentage points with the paired-bootstrap 95% CI and p-value "
                     "(`cbmir.evaluation.stats.paired_bootstrap`); McNemar's test on ACC@1 (`b01`: A wrong, B right; "
                     "`b10`: A right, B wrong; exact binomial below 25 discordant pairs, else chi-square with "
                     "continuity correction) and its Holm adjustment over the pairs of one dataset/size/distance.\n")
        p_fmt = {c: _fmt_p for c in ("p boot ACC@1", "p McNemar", "p McNemar (Holm)", "p boot mAP@5")}
        lines.append(markdown_table(pt, formats=p_fmt, signed=["ΔACC@1", "ΔmAP@5"]))
        dt = distance_table(df, results_dir, n_boot=n_boot, seed=seed)
        out.tables["distance"] = dt
        if not dt.empty:
            lines.append("### Cosine vs Euclidean (the paper states cosine; its published code ranks by "
                         "Euclidean distance on unnormalised features)\n")
            lines.append("`identical top-k`: % of queries with the same top-k database rows in the same order. "
                         "2D HOG vectors are L2-normalised by the extractor, so both distances rank them alike; a 3D HOG vector is a concatenation of per-slice unit vectors (empty slices give zeros), so its norm varies and the rankings differ.\n")
            lines.append(markdown_table(dt, formats={"p McNemar": _fmt_p}, signed=["ΔACC@1"]))

    # ------------------------------------------------------------------ figures
    lines.append("## Figures\n")
    pub = load_published()
    fig_no = {d.lower(): 3 + i for i, d in enumerate((*DATASETS_2D, *DATASETS_3D))}
    ci_acc = ci[ci["metric"] == "ACC@1"] if not ci.empty else ci
    for dist in distances:
        rows = _sort_rows(ok[ok["distance"] == dist])
        for d, g in rows.groupby("dataset", sort=False):
            vals = g[["label", "size", "ACC@1"]].rename(columns={"label": "Model"}).copy()
            if not ci_acc.empty:
                c = ci_acc[(ci_acc["dataset"] == d) & (ci_acc["distance"] == dist)]
                lo = {(r["label"], r["size"]): (r["lo"], r["hi"]) for r in c.to_dict("records")}
                vals["lo"] = [lo.get((m, s), (np.nan, np.nan))[0] for m, s in zip(vals["Model"], vals["size"])]
                vals["hi"] = [lo.get((m, s), (np.nan, np.nan))[1] for m, s in zip(vals["Model"], vals["size"])]
            paper_rows = []
            for lab, pm in dict.fromkeys(zip(g["label"], g["paper_model"])):  # once per model, not per size
                if pm:
                    for r in pub[(pub["dataset"].str.lower() == str(d).lower()) & (pub["model"] == pm)].to_dict("records"):
                        paper_rows.append({"Model": lab, "size": int(r["size"]), "ACC@1": float(r["ACC@1"])})
            paper = pd.DataFrame(paper_rows, columns=["Model", "size", "ACC@1"])
            have = set(zip(vals["Model"], vals["size"].astype(int)))
            paper = paper[[(m, int(s)) in have for m, s in zip(paper["Model"], paper["size"])]]
            majority = {int(s): float(v) for s, v in zip(g["size"], g["majority_class_rate"]) if pd.notna(v)}
            name = dataset_display_name(d)
            num = fig_no.get(str(d).lower())
            title = (f"{name}: ACC@1 per model and image size, {dist}"
                     + (f"\n(layout of the paper's Figure {num})" if num else ""))
            path = plot_acc1_by_size(vals, fig_dir / f"acc1_{str(d).lower()}_{dist}.png", title,
                                     majority=majority, paper=paper)
            out.figures.append(path)
            lines.append(f"**{title.replace(chr(10), ' ')}.** Bars: ours (95% bootstrap CI); x: the paper's pretrained value; dashed: "
                         f"majority-class rate.\n\n![{name} {dist}](figures/{path.name})\n")
    if tsne:
        res = _tsne_section(df, fig_dir, out, store_path=store_path, qdrant_url=qdrant_url,
                            collection=tsne_collection, max_points=tsne_max_points)
        if res:
            caption, path = res
            lines.append(f"**{caption}.** Up to {tsne_max_points:,} database points (random subsample), PCA to "
                         f"50 dims, then t-SNE (scikit-learn, perplexity 30, 500 iterations, seed 0).\n\n"
                         f"![t-SNE](figures/{path.name})\n")
    if out.notes:
        lines.append("## Notes\n")
        lines.extend(f"- {n}" for n in out.notes)
        lines.append("")
    out.markdown.write_text("\n".join(lines), encoding="utf-8")
    return out

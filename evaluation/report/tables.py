"""The study's tables for our rows: Tables S1-S4 (per size), 3 and 4 (averages), 5 (size robustness),
6 and 7 (timings), and the per-dataset baselines (majority class, weights-free HOG).

All metric values are in percent (0-100); times in seconds unless the column says ms.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from cbmir.evaluation.reference import DATASETS_2D, DATASETS_3D, METRICS, load_published, size_robustness
from cbmir.evaluation.report.labels import (
    PAPER_MODEL_ORDER,
    dataset_display_name,
    dataset_order,
    is_baseline,
    model_order,
    paper_model_name,
)
from cbmir.evaluation.report.rows import ok_rows, sort_rows
from cbmir.evaluation.results import to_bool

__all__ = ["SANITY_REFERENCE", "per_size_table", "average_table", "robustness_table", "published_robustness_pivot",
           "timing_tables", "baseline_table"]


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


def published_lookup() -> dict[tuple[str, int, str], dict[str, float]]:
    """The paper's rows: ``(dataset flag, size, paper model name) -> {metric: percent}``."""
    pub = load_published()
    return {(str(r["dataset"]).lower(), int(r["size"]), str(r["model"])): {m: float(r[m]) for m in METRICS}
            for r in pub.to_dict("records")}


def per_size_table(df: pd.DataFrame, size: int, distance: str) -> pd.DataFrame:
    """The Table S1-S4 layout for one size and distance: rows dataset x model (the majority-class
    rate as an extra row per dataset), for each metric ``<m>``, ``<m> paper`` and ``<m> Δ``.

    Args:
        df: :func:`prepare_results` output.

    Returns:
        Columns ``Dataset, Model, <m>, <m> paper, <m> Δ`` for m in :data:`METRICS` (percent;
        Δ = ours - paper, percentage points; NaN where the paper has no such row).
    """
    pub = published_lookup()
    ok = ok_rows(df)
    rows = sort_rows(ok[(ok["size"] == int(size)) & (ok["distance"] == distance)])
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
    pub = published_lookup()
    rows = ok_rows(df)
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
                                    sorted(zip(g["dataset"], g["size"]), key=lambda x: (dataset_order(x[0]), x[1])))
        for m in METRICS:
            rec[m] = float(g[m].astype(float).mean())
            rec[f"{m} paper"] = float(np.mean([x[m] for x in matched])) if matched else float("nan")
        out.append(rec)
    cols = ["Model", "n", "n paper", *[c for m in METRICS for c in (m, f"{m} paper")], "datasets"]
    table = pd.DataFrame(out, columns=cols)
    if len(table):
        table = table.iloc[sorted(range(len(table)), key=lambda i: model_order(table["Model"].iloc[i]))]
    return table.reset_index(drop=True)


def robustness_table(df: pd.DataFrame, distance: str, metric: str = "ACC@1") -> pd.DataFrame:
    """Table 5 for our rows: range of ``metric`` across sizes per (dataset, model), with the paper's
    range over the same sizes and over all of its sizes.

    Only pairs run at two or more sizes are listed.

    Returns:
        Columns ``Dataset, Model, sizes, min, max, range, paper range (same sizes),
        paper range (all sizes)`` (percent / percentage points).
    """
    rows = ok_rows(df)
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
        p = (pub[(pub["dataset"].str.lower() == str(r["dataset"]).lower()) & (pub["model"] == pm)] if pm
             else pub.iloc[0:0])
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
                      columns=[m for m in PAPER_MODEL_ORDER if m in piv.columns])
    piv.index.name = "Dataset"
    return piv.reset_index()


def timing_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables 6 and 7: database creation time, and test time = query extraction + search.

    Extraction times are taken from the cell that extracted the features: a cell whose features were
    replayed from the cache of its other-distance twin (``features_cached``) reports its twin's
    extraction time (the search time is always its own).

    Returns:
        ``(table6, table7)``. table6: ``Dataset, size, Model, threads (torch CPU threads), precision (the
        collection's forward-pass precision, ``""`` when not recorded), model load s,
        database creation s, items/s, note``; table7: ``Dataset, size, Model, distance, query extraction s, search s,
        test s, search share %, search ms/query, latency p50 ms, latency p95 ms``.
    """
    rows = sort_rows(ok_rows(df))
    cols6 = ["Dataset", "size", "Model", "threads", "precision", "model load s", "database creation s", "items/s",
             "note"]
    cols7 = ["Dataset", "size", "Model", "distance", "query extraction s", "search s", "test s",
             "search share %", "search ms/query", "latency p50 ms", "latency p95 ms"]
    if rows.empty:
        return pd.DataFrame(columns=cols6), pd.DataFrame(columns=cols7)
    for c in ("features_cached", "model_load_s", "database_creation_s", "database_items_per_s",
              "query_extraction_s", "search_s", "search_per_query_ms", "latency_p50_ms", "latency_p95_ms",
              "timing_note", "threads", "precision"):
        if c not in rows.columns:
            rows[c] = np.nan
    cached = rows["features_cached"].map(to_bool)
    t6, src = [], {}
    for (d, s, lab), g in rows.groupby(["dataset", "size", "label"], sort=False):
        gc = cached.loc[g.index]
        pick = g[~gc] if (~gc).any() else g
        r = pick.iloc[0]
        src[(d, s, lab)] = r
        note = r.get("timing_note")
        thr, prec = r.get("threads"), r.get("precision")
        t6.append({"Dataset": dataset_display_name(d), "size": int(s), "Model": lab,
                   "threads": int(thr) if pd.notna(thr) else None,
                   "precision": prec if isinstance(prec, str) else "",
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


def baseline_table(ok: pd.DataFrame, distances: Sequence[str]) -> pd.DataFrame:
    """Per (dataset, size) of the ok rows ``ok``: database and query counts, the majority-class rate,
    HOG's ACC@1 per distance (``"not run"`` where absent), the design-time HOG reference
    (:data:`SANITY_REFERENCE`, cosine) and the best other model's ACC@1.

    Returns:
        Columns ``Dataset, size, n database, n queries, majority class ACC@1, HOG ACC@1 (<distance>)...,
        HOG ACC@1 design ref., best other ACC@1`` (percent; the last one ``"<value> (<label>, <distance>)"``).
    """
    base = []
    for (d, s), g in sort_rows(ok).groupby(["dataset", "size"], sort=False):
        maj = g["majority_class_rate"].astype(float).dropna()
        rec = {"Dataset": dataset_display_name(d), "size": int(s),
               "n database": _first_int(g, "n_database"), "n queries": _first_int(g, "n_queries"),
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
    return pd.DataFrame(base)


def _first_int(g: pd.DataFrame, column: str) -> int | None:
    """``column`` of the first row of ``g`` as an int; None when the column is absent or the value NaN."""
    return int(g[column].iloc[0]) if column in g and pd.notna(g[column].iloc[0]) else None

"""The report's statistics (beyond the study): bootstrap CIs of every metric, paired comparisons of
models, cosine vs Euclidean, and the rows whose retrieval is decided by ties.

All read the per-query files of the grid (:func:`cbmir.evaluation.results.load_per_query`); values in
percent (differences in percentage points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cbmir.evaluation.reference import METRICS
from cbmir.evaluation.report.labels import dataset_display_name
from cbmir.evaluation.report.rows import ok_rows, results_path, sort_rows
from cbmir.evaluation.results import load_per_query, per_query_outcomes

__all__ = ["CI_MISMATCH_MARK", "ci_table", "ci_wide_table", "cells_without_ci", "tie_diagnostics", "holm",
           "paired_table", "distance_table"]


def load_outcomes(row: dict, results_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """``(query_indices, per-query outcomes)`` of a results row from its per-query file
    (:func:`cbmir.evaluation.results.per_query_outcomes`); None when the row has no readable file."""
    f = row.get("per_query_file")
    if not isinstance(f, str) or not f:
        return None
    p = results_path(f, results_dir)
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
    for r in sort_rows(ok_rows(df)).to_dict("records"):
        loaded = load_outcomes(r, results_dir)
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


#: Marks a model whose per-query file disagrees with the results table (its CI is not comparable).
CI_MISMATCH_MARK = "†"


def ci_wide_table(ci: pd.DataFrame) -> pd.DataFrame:
    """:func:`ci_table` one row per cell: ``Dataset, size, Model, distance, n`` and each metric as
    ``value [lo, hi]`` (percent, 2 decimals); the model is marked :data:`CI_MISMATCH_MARK` when a
    recomputed metric differs from the table by more than 1e-6 pp."""
    wide = []
    for (d, s, lab, dist), g in ci.groupby(["dataset", "size", "label", "distance"], sort=False):
        mark = CI_MISMATCH_MARK if float(g["check"].max()) > 1e-6 else ""
        rec = {"Dataset": dataset_display_name(d), "size": int(s), "Model": lab + mark, "distance": dist,
               "n": int(g["n"].iloc[0])}
        for r in g.to_dict("records"):
            rec[r["metric"]] = f"{r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
        wide.append(rec)
    return pd.DataFrame(wide)


def cells_without_ci(df: pd.DataFrame, ci: pd.DataFrame, results_dir: Path) -> list[str]:
    """``ok`` rows of ``df`` absent from ``ci``, each with why (per-query file not saved / not found)."""
    have = set(zip(ci["dataset"], ci["size"].astype(int), ci["label"], ci["distance"]))
    out = []
    for r in sort_rows(ok_rows(df)).to_dict("records"):
        if (r["dataset"], int(r["size"]), r["label"], r["distance"]) in have:
            continue
        f = r.get("per_query_file")
        if not (isinstance(f, str) and f):
            why = "no per-query file saved"
        else:
            p = results_path(f, results_dir)
            why = f"per-query file {p} " + ("unusable" if p.is_file() else "not found")
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
    for r in sort_rows(ok_rows(df)).to_dict("records"):
        f = r.get("per_query_file")
        if not isinstance(f, str) or not f or not results_path(f, results_dir).is_file():
            continue
        sc = np.asarray(load_per_query(results_path(f, results_dir))["topk_scores"], dtype=np.float64)
        tol = 1e-6 * np.maximum(1.0, np.abs(sc[:, :1]))
        tied = 100.0 * float(np.mean(np.all(np.abs(sc - sc[:, :1]) <= tol, axis=1)))
        if tied > threshold:
            out.append({"Dataset": dataset_display_name(r["dataset"]), "size": int(r["size"]), "Model": r["label"],
                        "distance": r["distance"], "tied top-k %": tied})
    return pd.DataFrame(out, columns=["Dataset", "size", "Model", "distance", "tied top-k %"])


def holm(pvalues: Sequence[float]) -> list[float]:
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
    rows = sort_rows(ok_rows(df))
    for (d, s, dist), g in rows.groupby(["dataset", "size", "distance"], sort=False):
        loaded = [(r, load_outcomes(r, results_dir)) for r in g.to_dict("records")]
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
        for rec, adj in zip(group, holm([x["p McNemar"] for x in group])):
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
    from cbmir.evaluation.stats import mcnemar, paired_bootstrap

    rows = sort_rows(ok_rows(df))
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
        lc, le = load_outcomes(c, results_dir), load_outcomes(e, results_dir)
        rec.update({"ΔACC@1": float(c["ACC@1"]) - float(e["ACC@1"]), "ΔACC@1 lo": float("nan"),
                    "ΔACC@1 hi": float("nan"), "p McNemar": float("nan"), "identical top-k": float("nan")})
        if lc is not None and le is not None and np.array_equal(lc[0], le[0]):
            pb = paired_bootstrap(lc[1]["ACC@1"], le[1]["ACC@1"], n_boot=n_boot, seed=seed)
            rec["ΔACC@1 lo"], rec["ΔACC@1 hi"] = 100 * pb["lo"], 100 * pb["hi"]
            rec["p McNemar"] = mcnemar(lc[1]["ACC@1"], le[1]["ACC@1"])["p_value"]
            pc = load_per_query(results_path(c["per_query_file"], results_dir))
            pe = load_per_query(results_path(e["per_query_file"], results_dir))
            rec["identical top-k"] = 100 * float(np.mean(np.all(pc["topk_indices"] == pe["topk_indices"], axis=1)))
        out.append(rec)
    return pd.DataFrame(out, columns=cols)

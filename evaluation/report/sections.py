"""The sections of a report with results: each appends its Markdown to ``lines`` and keeps its tables
in the :class:`~cbmir.evaluation.report.markdown.ReportOutput` (``out.tables``).

Order in the report (:func:`cbmir.evaluation.report.build.build_report`): metric definitions, runs,
evaluation warnings, ties, baselines, ours beside the study's, per-size tables (S1-S4), averages (Tables 3
and 4), size robustness (Table 5), timings (Tables 6 and 7), statistics, figures, t-SNE, query galleries
(:mod:`cbmir.evaluation.report.galleries`); then the appendix
with the study's published tables (:func:`cbmir.evaluation.report.published.appendix_section`).

``df`` is :func:`cbmir.evaluation.report.rows.prepare_results` output; ``ok`` its ok rows;
``distances`` the distances of the ok rows (cosine first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from cbmir.evaluation.report.labels import dataset_display_name
from cbmir.evaluation.report.markdown import ReportOutput, emit, fmt_p, markdown_table
from cbmir.evaluation.report.rows import prepare_results, sort_rows
from cbmir.evaluation.report.statistics import (
    CI_MISMATCH_MARK,
    cells_without_ci,
    ci_table,
    ci_wide_table,
    distance_table,
    paired_table,
    tie_diagnostics,
)
from cbmir.evaluation.report.tables import (
    average_table,
    baseline_table,
    per_size_table,
    robustness_table,
    timing_tables,
)

__all__ = ["definitions_section", "evaluation_notes_section", "runs_section", "ties_section", "baselines_section",
           "per_size_section", "averages_section", "robustness_section", "timings_section", "statistics_section"]

PAPER_TIMING_NOTE = (
    "The paper's timings (minutes, TITAN V GPU, 64 px): PathMNIST test phase 10-44 min per model, "
    "of which 90-99.5% was the similarity search; 3D database creation 21-72 min per model. "
    "Our times are seconds on this machine (see `device`), for the datasets run here."
)


def definitions_section(lines: list[str]) -> None:
    """The metric definitions and units, at the top of the report (the README section "Metrics")."""
    lines.append("## What the numbers mean\n")
    lines.append("For each query (a test image) the database (train split) is searched for its top-k most similar "
                 "images (exact search, ties to the lower database row); a retrieved image is **relevant** when "
                 "its class label equals the query's. All metrics are means over the queries, **in percent**:\n")
    lines.append("- **mAP@5**: mean average precision of the top 5: per query, the mean of the precision at each "
                 "rank that holds a relevant image (0 when none does).\n"
                 "- **mMV@5**: majority vote of the top 5: 1 when the query's class is among the classes with "
                 "the most votes in its top 5 (ties count), else 0.\n"
                 "- **ACC@k** (k = 1, 3, 5): a **hit rate**: 1 when at least one of the top k is relevant, else 0 "
                 "(not classification accuracy; ACC@1 is the strictest).\n"
                 "- **majority-class rate**: the ACC@1 of always answering the database's most frequent class, "
                 "the floor every model should beat.\n")
    lines.append("Unlabelled rows are never queries and never relevant; when the query split is the database split "
                 "each query's own point is left out (leave-one-out); ordinal grades (RetinaMNIST) match exactly. "
                 "Exact definitions, worked examples and these rules: the README section 'Metrics'. "
                 "Times are seconds unless "
                 "a column says ms.\n")


def evaluation_notes_section(lines: list[str], out: ReportOutput, ok: pd.DataFrame) -> None:
    """The evaluation's rules and warnings per row (results columns ``leave_one_out``, ``n_unlabelled_queries``,
    ``n_unlabelled_database``, ``warnings``): a table of the rows with any, or one line saying there is none."""
    from cbmir.evaluation.results import warnings_of

    recs = []
    for r in sort_rows(ok).to_dict("records"):
        warns = warnings_of(r.get("warnings"))
        loo = bool(r.get("leave_one_out")) if pd.notna(r.get("leave_one_out")) else False
        unl_q, unl_db = (int(r[c]) if pd.notna(r.get(c)) else 0 for c in ("n_unlabelled_queries",
                                                                             "n_unlabelled_database"))
        if warns or loo or unl_q or unl_db:
            recs.append({"Dataset": dataset_display_name(r["dataset"]), "size": int(r["size"]), "Model": r["label"],
                         "distance": r["distance"], "leave-one-out": "yes" if loo else "no",
                         "unlabelled queries (left out)": unl_q, "unlabelled database (never relevant)": unl_db,
                         "warnings": "; ".join(warns) or "—"})
    table = pd.DataFrame(recs, columns=["Dataset", "size", "Model", "distance", "leave-one-out",
                                        "unlabelled queries (left out)", "unlabelled database (never relevant)",
                                        "warnings"])
    out.tables["evaluation notes"] = table
    lines.append("## Evaluation warnings, unlabelled rows and leave-one-out\n")
    if table.empty:
        lines.append("None: every row searched test queries against the train database, with no unlabelled row, no "
                     "all-zero query vector and no collapsed collection (or a results table from before these "
                     "columns existed).\n")
        return
    lines.append("Rows whose evaluation printed a warning (all-zero query vectors, a collapsed collection: their "
                 "metrics may be artifacts), left unlabelled rows out, or ran leave-one-out (query split = "
                 "database split).\n")
    lines.append(markdown_table(table))


def _shown_path(table, report_dir: Path | None) -> str:
    """``table`` relative to ``report_dir`` when inside it, else its absolute path (POSIX separators)."""
    p = Path(table).resolve()
    if report_dir is not None and p.is_relative_to(Path(report_dir).resolve()):
        return p.relative_to(Path(report_dir).resolve()).as_posix()
    return str(p)


def runs_section(lines: list[str], df: pd.DataFrame, ok: pd.DataFrame, tables: Sequence, distances: list[str],
                 report_dir: Path | None = None) -> None:
    """Provenance: the results tables (relative to ``report_dir`` when they lie inside it, so the report and its
    table can move together; else absolute), cell counts, software versions, the RANDOM-INIT note and the
    failed cells."""
    failed = df[df["status"].astype(str) != "ok"]
    lines.append("## Runs\n")
    lines.append(f"Results table{'s' if len(tables) > 1 else ''}: "
                 f"{', '.join(f'`{_shown_path(t, report_dir)}`' for t in tables)} — {len(df)} cells, {len(ok)} ok, "
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
        lines.append(markdown_table(sort_rows(prepare_results(ft))[["dataset", "size", "model", "backend",
                                                                    "distance", "random_init", "error"]]))


def ties_section(lines: list[str], out: ReportOutput, df: pd.DataFrame, results_dir: Path) -> None:
    """A warning listing the rows whose top-k is decided by ties (:func:`tie_diagnostics`), if any."""
    ties = tie_diagnostics(df, results_dir)
    out.tables["ties"] = ties
    if len(ties):
        lines.append("### Warning: retrieval decided by ties (collapsed features)\n")
        lines.append("For these rows, the listed share of queries has all top-k scores equal: the extractor maps "
                     "many inputs to the same vector, so the top-k is chosen by the tie rule (lower database "
                     "index first), not by similarity. Their metrics (often ACC@3/ACC@5 near 100%) are "
                     "artifacts.\n")
        lines.append(markdown_table(ties))


def baselines_section(lines: list[str], out: ReportOutput, ok: pd.DataFrame, distances: list[str]) -> None:
    """Per dataset: the majority-class rate and the weights-free HOG baseline (:func:`baseline_table`),
    naming the datasets without a HOG run (with some distance)."""
    lines.append("## Baselines per dataset: majority class and weights-free features\n")
    lines.append("The majority-class rate is the ACC@1 of always answering the database's most frequent class "
                 "(every metric of that constant answer equals it); any feature extractor should beat it. "
                 "HOG is the weights-free handcrafted baseline; `design ref.` is the HOG result measured when "
                 "cbmir was designed (DESIGN.md §3, cosine), a pipeline check.\n")
    base_df = baseline_table(ok, distances)
    out.tables["baselines"] = base_df
    lines.append(markdown_table(base_df))
    base = base_df.to_dict("records")
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


def per_size_section(lines: list[str], out: ReportOutput, df: pd.DataFrame, ok: pd.DataFrame,
                     distances: list[str]) -> None:
    """Tables S1-S4: one table per size and distance, ours beside the paper's."""
    lines.append("## Per-size results (layout of the study's Tables S1-S4)\n")
    lines.append("Ours, the paper's value (`paper`) and ours - paper (`Δ`, percentage points). The paper's "
                 "numbers are pretrained Keras models (and foundation models); `—` where the paper has no row.\n")
    s_names = {28: "S1", 64: "S2", 128: "S3", 224: "S4"}
    for size in sorted(set(int(s) for s in ok["size"])):
        for dist in distances:
            t = per_size_table(df, size, dist)
            emit(lines, out, f"size {size} {dist}", t,
                 f"### Table {s_names.get(size, '')} layout: {size} px ({size}³ for 3D), {dist}\n",
                 signed=[c for c in t.columns if c.endswith("Δ")])


def averages_section(lines: list[str], out: ReportOutput, df: pd.DataFrame, distances: list[str]) -> None:
    """Tables 3 and 4 for our rows: per-model means over the 2D and the 3D datasets."""
    lines.append("## Averages over the 2D and the 3D datasets (Tables 3 and 4)\n")
    lines.append("`<metric>` = our mean over the (dataset, size) rows listed; `<metric> paper` = the paper's "
                 "mean over the same cells (where the study has the model). Our 3D average includes 3D "
                 "datasets outside the study (e.g. VesselMNIST3D); `n paper` counts the matched cells.\n")
    for kind, table in (("2d", "Table 3"), ("3d", "Table 4")):
        for dist in distances:
            emit(lines, out, f"{table} ours {dist}", average_table(df, kind, dist),
                 f"### {table} layout ({kind.upper()}), {dist}\n")


def robustness_section(lines: list[str], out: ReportOutput, df: pd.DataFrame, distances: list[str]) -> None:
    """Table 5: range of ACC@1 across sizes, ours per distance and the paper's."""
    lines.append("## Size robustness (Table 5): range of ACC@1 across sizes\n")
    any_rob = False
    for dist in distances:
        any_rob |= emit(lines, out, f"Table 5 ours {dist}", robustness_table(df, dist), f"### Ours, {dist}\n")
    if not any_rob:
        lines.append("No (dataset, model) was run at two or more sizes.\n")
    lines.append("The study's own Table 5 is in the appendix.\n")


def timings_section(lines: list[str], out: ReportOutput, df: pd.DataFrame) -> None:
    """Tables 6 and 7: database creation time, and test time = query extraction + search."""
    t6, t7 = timing_tables(df)
    out.tables["Table 6"], out.tables["Table 7"] = t6, t7
    lines.append("## Timings (Tables 6 and 7)\n")
    lines.append(PAPER_TIMING_NOTE + "\n")
    lines.append("### Table 6 layout: database creation (train split: extraction + upsert), seconds\n")
    lines.append("`threads`: torch CPU threads of the run (`—`: not recorded, torch's default). `precision`: the "
                 "forward pass the collection was built with (`fp32`, `bf16-autocast`; empty: not recorded or no "
                 "torch model); bf16 reorders near-tied neighbours, so compare metrics within one precision. "
                 "On a shared CPU "
                 "the times depend on the load of the machine; compare them within one run. `note`: how a time "
                 "was obtained when not measured in this run: a reused collection shows the time its earlier "
                 "ingest (`cbmir run` or the grid) recorded, with its date.\n")
    lines.append(markdown_table(t6, formats={"threads": lambda v: "—" if v is None or pd.isna(v) else str(int(v))}))
    lines.append("### Table 7 layout: test time = query extraction + search, seconds\n")
    lines.append("`query extraction s`: the test split's feature extraction + upsert (taken from the cell that "
                 "extracted the features when a twin replayed them). `search s`: wall seconds of one **batched** "
                 "exact top-k search of every query at once (the study's test phase; `search ms/query` = search s "
                 "/ queries). `latency p50 ms` / `p95 ms`: median and 95th percentile of **one query at a time** "
                 "(a sample of queries, each searched alone: what one user waits). `test s` = query extraction + "
                 "search; `search share %` = search / test.\n")
    lines.append(markdown_table(t7))


def statistics_section(lines: list[str], out: ReportOutput, df: pd.DataFrame, results_dir: Path, out_dir: Path, *,
                       n_boot: int, seed: int) -> pd.DataFrame:
    """Bootstrap CIs (written to ``<out_dir>/stats_ci.csv``), then the paired comparisons and cosine vs
    Euclidean (:func:`_comparisons`); nothing but a note without per-query files.

    Returns:
        The CI table (:func:`ci_table`; empty without per-query files), for the figures' error bars.
    """
    lines.append("## Statistics (beyond the study)\n")
    ci = ci_table(df, results_dir, n_boot=n_boot, seed=seed)
    out.tables["ci"] = ci
    if ci.empty:
        lines.append("No per-query files (run the grid with `--save-per-query`): no CIs or paired tests.\n")
        return ci
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
    lines.append(markdown_table(ci_wide_table(ci)))
    if not bad.empty:
        lines.append(f"{CI_MISMATCH_MARK} per-query file disagrees with the table; CI not comparable.\n")
    without = cells_without_ci(df, ci, results_dir)
    if without:
        msg = f"no CIs for {', '.join(without)}"
        lines.append(f"**Note:** {msg}.\n")
        out.notes.append(msg)
    _comparisons(lines, out, df, results_dir, out_dir, n_boot=n_boot, seed=seed)
    return ci


def _comparisons(lines: list[str], out: ReportOutput, df: pd.DataFrame, results_dir: Path, out_dir: Path, *,
                 n_boot: int, seed: int) -> None:
    """Paired comparisons of models (written to ``<out_dir>/stats_paired.csv``) and cosine vs Euclidean."""
    pt = paired_table(df, results_dir, n_boot=n_boot, seed=seed)
    out.tables["paired"] = pt
    if not pt.empty:
        pt.to_csv(out_dir / "stats_paired.csv", index=False)
    lines.append("### Paired comparisons of models (same dataset, size, distance and queries)\n")
    lines.append("Δ = A - B in percentage points with the paired-bootstrap 95% CI and p-value "
                 "(`cbmir.evaluation.stats.paired_bootstrap`); McNemar's test on ACC@1 (`b01`: A wrong, B right; "
                 "`b10`: A right, B wrong; exact binomial below 25 discordant pairs, else chi-square with "
                 "continuity correction) and its Holm adjustment over the pairs of one dataset/size/distance.\n")
    p_fmt = {c: fmt_p for c in ("p boot ACC@1", "p McNemar", "p McNemar (Holm)", "p boot mAP@5")}
    lines.append(markdown_table(pt, formats=p_fmt, signed=["ΔACC@1", "ΔmAP@5"]))
    dt = distance_table(df, results_dir, n_boot=n_boot, seed=seed)
    out.tables["distance"] = dt
    if not dt.empty:
        lines.append("### Cosine vs Euclidean (the paper states cosine; its published code ranks by "
                     "Euclidean distance on unnormalised features)\n")
        lines.append("`identical top-k`: % of queries with the same top-k database rows in the same order. "
                     "2D HOG vectors are L2-normalised by the extractor, so both distances rank them alike; a 3D HOG "
                     "vector is a concatenation of per-slice unit vectors (empty slices give zeros), so its norm "
                     "varies and the rankings differ.\n")
        lines.append(markdown_table(dt, formats={"p McNemar": fmt_p}, signed=["ΔACC@1"]))

"""The report's bar figures: ACC@1 per model and image size, one figure per dataset (the layout of the
paper's Figures 3-10), and one cross-dataset figure comparing the models; ours with 95% bootstrap CIs, the
paper's pretrained values and the majority-class rate.

Rules every figure follows (issue 17): written twice by :func:`save_figure`, as a vector PDF and a 300 dpi PNG;
bar charts' y-axis spans 0-100 % on every dataset (:data:`ACC_YLIM`, one common range, stated in the captions);
titles name the dataset and what is drawn, never the paper's figure number (the captions do); the paper's
pretrained values are never drawn over a ``RANDOM-INIT`` bar (they measure other weights).

matplotlib is imported when a figure is drawn (Agg backend), not with this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cbmir.evaluation.reference import load_published
from cbmir.evaluation.report.labels import dataset_display_name, model_order
from cbmir.evaluation.report.markdown import ReportOutput
from cbmir.evaluation.report.rows import sort_rows

__all__ = ["pyplot", "save_figure", "plot_acc1_by_size", "plot_acc1_across_datasets", "figures_section",
           "FIGURE_DPI", "VECTOR_SUFFIX", "ACC_YLIM", "RANDOM_INIT"]

#: Resolution of the PNG of every figure (dots per inch).
FIGURE_DPI = 300
#: Suffix of the vector copy of every figure (written beside the PNG).
VECTOR_SUFFIX = ".pdf"
#: y-axis range of every ACC@1 bar chart, percent: from 0, the same on every dataset.
ACC_YLIM = (0.0, 100.0)
#: Marker of random-weight rows in their labels (:func:`cbmir.evaluation.report.labels.row_label`).
RANDOM_INIT = "RANDOM-INIT"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: figures only)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> list[Path]:
    """Write ``fig`` as ``path`` (PNG, :data:`FIGURE_DPI` dpi) and as its vector copy (``path`` with
    :data:`VECTOR_SUFFIX`, fonts embedded), then close it.

    Returns:
        ``[png path, vector path]``.
    """
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vector = path.with_suffix(VECTOR_SUFFIX)
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")
    fig.savefig(vector, bbox_inches="tight")
    plt.close(fig)
    return [path, vector]


def _no_paper_on_random_init(paper: pd.DataFrame | None) -> pd.DataFrame | None:
    """``paper`` without rows of ``RANDOM-INIT`` models: the paper's values are pretrained weights."""
    if paper is None or not len(paper):
        return paper
    return paper[~paper["Model"].astype(str).str.contains(RANDOM_INIT, regex=False)]


def _tick_label(model: str) -> str:
    return model.replace(f" {RANDOM_INIT}", f"\n{RANDOM_INIT}").replace(" (handcrafted", "\n(handcrafted")


def _error_bars(sub: pd.DataFrame, keys: list, heights: list[float]) -> np.ndarray | None:
    """``(2, n)`` lower / upper error-bar lengths from the ``lo, hi`` columns of ``sub`` (indexed by ``keys``);
    None without CIs. Clipped at 0: a table value outside its per-query CI is flagged in the statistics."""
    if "lo" not in sub.columns or "hi" not in sub.columns:
        return None
    lo = np.array([float(sub.at[m, "lo"]) if m in sub.index else np.nan for m in keys])
    hi = np.array([float(sub.at[m, "hi"]) if m in sub.index else np.nan for m in keys])
    if not np.isfinite(lo).any():
        return None
    hh = np.array(heights)
    return np.maximum(0, np.vstack([np.where(np.isfinite(lo), hh - lo, 0), np.where(np.isfinite(hi), hi - hh, 0)]))


def _hatch_random_init(bars, models: list[str]) -> None:
    """Hatch the bars of ``RANDOM-INIT`` models (``bars[i]`` is of ``models[i]``): told apart at a glance."""
    for bar, m in zip(bars, models):
        if RANDOM_INIT in str(m):
            bar.set_hatch("///")
            bar.set_edgecolor("white")


def _finish_bar_chart(fig, ax, x: np.ndarray, ticks: list[str], ylabel: str, title: str, path: Path) -> Path:
    """Ticks, the y-axis (:data:`ACC_YLIM`: from 0, the same on every figure), title, grid and legend (right of
    the axes) of a bar chart; written by :func:`save_figure`. Returns ``path``."""
    ax.set_xticks(x)
    ax.set_xticklabels(ticks, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ACC_YLIM)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_acc1_by_size(values: pd.DataFrame, path: Path, title: str, *, majority: dict[int, float] | None = None,
                      paper: pd.DataFrame | None = None, whose: str = "ours") -> Path:
    """ACC@1 per model, one bar per image size (the layout of the paper's Figures 3-10); y-axis 0-100 %.

    Args:
        values: columns ``Model, size, ACC@1`` (percent) and optionally ``lo, hi`` (95% CI).
        path: PNG file to write (its vector copy beside it: :func:`save_figure`).
        title: figure title.
        majority: ``{size: majority-class rate}``, drawn as dashed lines (the ACC@1 floor).
        paper: columns ``Model, size, ACC@1`` of the paper, drawn as black ``x`` markers; rows of
            ``RANDOM-INIT`` models are never drawn (the paper's values are pretrained weights).
        whose: whose values the bars are, in the legend (``ours, 28 px``; ``paper`` for the study's redrawn figures).

    Returns:
        ``path``.
    """
    plt = pyplot()
    paper = _no_paper_on_random_init(paper)
    models = sorted(values["Model"].unique(), key=model_order)
    sizes = sorted(int(s) for s in values["size"].unique())
    width = 0.8 / max(1, len(sizes))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(models) + 2.5), 4.2))
    cmap = plt.get_cmap("viridis")
    x = np.arange(len(models))
    for j, s in enumerate(sizes):
        sub = values[values["size"] == s].set_index("Model")
        h = [float(sub.at[m, "ACC@1"]) if m in sub.index else np.nan for m in models]
        offs = x - 0.4 + width * (j + 0.5)
        color = cmap(0.15 + 0.7 * j / max(1, len(sizes) - 1)) if len(sizes) > 1 else cmap(0.35)
        bars = ax.bar(offs, h, width=width * 0.95, color=color, label=f"{whose}, {s} px",
                      yerr=_error_bars(sub, models, h), capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
        _hatch_random_init(bars, models)
        if paper is not None and len(paper):
            ps = paper[paper["size"] == s].set_index("Model")
            ph = [float(ps.at[m, "ACC@1"]) if m in ps.index else np.nan for m in models]
            if np.isfinite(ph).any():
                ax.scatter(offs, ph, marker="x", color="black", zorder=5, s=28,
                           label="paper (pretrained)" if j == 0 else None)
    if majority:
        several = len(set(majority.values())) > 1
        for j, (s, v) in enumerate(sorted(majority.items())):
            if v is not None and np.isfinite(v) and (several or j == 0):
                ax.axhline(v, color="tab:red", ls="--", lw=1,
                           label=f"majority class ({s} px)" if several else "majority class")
    return _finish_bar_chart(fig, ax, x, [_tick_label(m) for m in models], "ACC@1 (%)", title, path)


def plot_acc1_across_datasets(values: pd.DataFrame, path: Path, title: str, *,
                              majority: dict[str, float] | None = None) -> Path:
    """The cross-dataset figure: ACC@1 of every model on every dataset (and size), one group of bars per
    dataset, one colour per model, 95% CIs as error bars; y-axis 0-100 %.

    Args:
        values: columns ``Dataset`` (group label, e.g. ``BreastMNIST 28 px``), ``Model``, ``ACC@1`` (percent:
            the mean over the queries) and optionally ``lo, hi`` (95% CI).
        path: PNG file to write (its vector copy beside it: :func:`save_figure`).
        title: figure title.
        majority: ``{group label: majority-class rate}``, drawn as a short dashed line over each group.

    Returns:
        ``path``.
    """
    plt = pyplot()
    groups = list(dict.fromkeys(values["Dataset"]))
    models = sorted(values["Model"].unique(), key=model_order)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(groups) * max(1, len(models)) ** 0.5 + 3.5), 4.2))
    cmap = plt.get_cmap("tab10")
    x = np.arange(len(groups))
    for j, m in enumerate(models):
        sub = values[values["Model"] == m].set_index("Dataset")
        h = [float(sub.at[g, "ACC@1"]) if g in sub.index else np.nan for g in groups]
        bars = ax.bar(x - 0.4 + width * (j + 0.5), h, width=width * 0.95, color=cmap(j % 10), label=m,
                      yerr=_error_bars(sub, groups, h), capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
        _hatch_random_init(bars, [m] * len(groups))
    labelled = False
    for i, g in enumerate(groups):
        v = (majority or {}).get(g)
        if v is not None and np.isfinite(v):
            ax.hlines(v, i - 0.45, i + 0.45, colors="tab:red", linestyles="--", lw=1,
                      label=None if labelled else "majority class")
            labelled = True
    return _finish_bar_chart(fig, ax, x, groups, "ACC@1 (%), mean over the queries", title, path)


def _figure_values(g: pd.DataFrame, ci_acc: pd.DataFrame, dataset: str, dist: str) -> pd.DataFrame:
    """Bars of one dataset's figure: ``Model, size, ACC@1`` of its rows ``g``, with ``lo, hi`` from the
    ACC@1 CIs ``ci_acc`` (NaN where a row has none; no such columns without CIs)."""
    vals = g[["label", "size", "ACC@1"]].rename(columns={"label": "Model"}).copy()
    if not ci_acc.empty:
        c = ci_acc[(ci_acc["dataset"] == dataset) & (ci_acc["distance"] == dist)]
        lo = {(r["label"], r["size"]): (r["lo"], r["hi"]) for r in c.to_dict("records")}
        vals["lo"] = [lo.get((m, s), (np.nan, np.nan))[0] for m, s in zip(vals["Model"], vals["size"])]
        vals["hi"] = [lo.get((m, s), (np.nan, np.nan))[1] for m, s in zip(vals["Model"], vals["size"])]
    return vals


def _paper_points(g: pd.DataFrame, pub: pd.DataFrame, dataset: str, vals: pd.DataFrame, *,
                  random_init: bool = False) -> pd.DataFrame:
    """The paper's ACC@1 (``Model, size, ACC@1``) of the pretrained models of rows ``g`` (with ``random_init``:
    of its RANDOM-INIT models instead, for the caption), at the sizes of ``vals``."""
    paper_rows = []
    rows = g[g["random_init"].astype(bool) == random_init]  # the paper's values are pretrained weights
    for lab, pm in dict.fromkeys(zip(rows["label"], rows["paper_model"])):  # once per model
        if pm:
            sel = pub[(pub["dataset"].str.lower() == str(dataset).lower()) & (pub["model"] == pm)]
            for r in sel.to_dict("records"):
                paper_rows.append({"Model": lab, "size": int(r["size"]), "ACC@1": float(r["ACC@1"])})
    paper = pd.DataFrame(paper_rows, columns=["Model", "size", "ACC@1"])
    have = set(zip(vals["Model"], vals["size"].astype(int)))
    keep = np.array([(m, int(s)) in have for m, s in zip(paper["Model"], paper["size"])], dtype=bool)
    return paper[keep]  # a boolean mask even when empty (an empty list would select no columns)


def _cross_dataset_values(rows: pd.DataFrame, ci_acc: pd.DataFrame, dist: str) -> tuple[pd.DataFrame, dict]:
    """Bars of the cross-dataset figure for the ok rows ``rows`` of one distance: ``Dataset`` (``<name> <size>
    px``), ``Model``, ``ACC@1`` and ``lo, hi`` (NaN without a CI); and the majority-class rate per group."""
    vals, majority = [], {}
    for d, g in rows.groupby("dataset", sort=False):
        part = _figure_values(g, ci_acc, d, dist)
        for r in part.to_dict("records"):
            grp = f"{dataset_display_name(d)} {int(r['size'])} px"
            vals.append({**r, "Dataset": grp})
        for s, v in zip(g["size"], g["majority_class_rate"]):
            if pd.notna(v):
                majority.setdefault(f"{dataset_display_name(d)} {int(s)} px", float(v))
    return pd.DataFrame(vals), majority  # rows come sorted: dataset, size, model


def figures_section(lines: list[str], out: ReportOutput, ok: pd.DataFrame, ci: pd.DataFrame, distances: list[str],
                    fig_dir: Path) -> None:
    """The figures of the ok rows ``ok`` (error bars from the CI table ``ci``), drawn into ``fig_dir`` (PNG + PDF)
    and appended to ``lines`` under ``## Figures``: per distance, the cross-dataset comparison of the models, then
    one ACC@1 figure per dataset."""
    lines.append("## Figures\n")
    lines.append("Every figure is a 300 dpi PNG (shown) with a vector PDF of the same name beside it (for print). "
                 "Bar charts: ACC@1 in percent on a y-axis from 0 to 100 % on every dataset (one common range), "
                 "error bars the 95% bootstrap CI over the queries (where per-query files exist), dashed red lines "
                 "the majority-class rate; `x` markers the paper's value for the same pretrained model, dataset and "
                 "size (never drawn for RANDOM-INIT rows, whose weights differ from the paper's).\n")
    pub = load_published()
    ci_acc = ci[ci["metric"] == "ACC@1"] if not ci.empty else ci
    for dist in distances:
        rows = sort_rows(ok[ok["distance"] == dist])
        vals, majority = _cross_dataset_values(rows, ci_acc, dist)
        path = plot_acc1_across_datasets(vals, fig_dir / f"acc1_all_datasets_{dist}.png",
                                         f"ACC@1 of every model on every dataset, {dist}", majority=majority)
        _add_figure(lines, out, path, f"Models compared across datasets, {dist}",
                    "Mean ACC@1 over the queries of each dataset and size (bars, one colour per model) with its 95% "
                    "bootstrap CI; dashed red: the dataset's majority-class rate.")
        for d, g in rows.groupby("dataset", sort=False):
            vals = _figure_values(g, ci_acc, d, dist)
            paper = _paper_points(g, pub, d, vals)
            majority = {int(s): float(v) for s, v in zip(g["size"], g["majority_class_rate"]) if pd.notna(v)}
            name = dataset_display_name(d)
            path = plot_acc1_by_size(vals, fig_dir / f"acc1_{str(d).lower()}_{dist}.png",
                                     f"{name}: ACC@1 per model and image size, {dist}", majority=majority,
                                     paper=paper)
            rnd = _paper_points(g, pub, d, vals, random_init=True)
            not_drawn = "; ".join(f"{m.replace(' ' + RANDOM_INIT, '')} {int(s)} px {v:.2f} %"
                                  for m, s, v in zip(rnd["Model"], rnd["size"], rnd["ACC@1"]))
            _add_figure(lines, out, path, f"{name}: ACC@1 per model and image size, {dist} (the layout of the "
                        "paper's figure for this dataset)",
                        "Bars: ours (95% bootstrap CI; hatched: RANDOM-INIT); x: the paper's pretrained value of the "
                        f"same model ({len(paper)} drawn); dashed: majority-class rate."
                        + (f" The paper's pretrained values of our RANDOM-INIT models, not drawn: {not_drawn}."
                           if not_drawn else ""))


def _add_figure(lines: list[str], out: ReportOutput, png: Path, caption: str, legend: str) -> None:
    """Record the figure ``png`` (and its vector copy) in ``out`` and append its caption and image to ``lines``."""
    out.figures.append(png)
    out.vector_figures.append(png.with_suffix(VECTOR_SUFFIX))
    lines.append(f"**{caption}.** {legend} Vector: [`{png.with_suffix(VECTOR_SUFFIX).name}`]"
                 f"(figures/{png.with_suffix(VECTOR_SUFFIX).name}).\n\n![{caption}](figures/{png.name})\n")

"""The report's bar figures: ACC@1 per model and image size (the paper's Figures 3-10), ours with
95% bootstrap CIs, the paper's values and the majority-class rate.

matplotlib is imported when a figure is drawn (Agg backend), not with this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cbmir.evaluation.reference import DATASETS_2D, DATASETS_3D, load_published
from cbmir.evaluation.report.labels import dataset_display_name, model_order
from cbmir.evaluation.report.markdown import ReportOutput
from cbmir.evaluation.report.rows import sort_rows

__all__ = ["pyplot", "plot_acc1_by_size", "figures_section"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: figures only)."""
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
    plt = pyplot()
    models = sorted(values["Model"].unique(), key=model_order)
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


def _paper_points(g: pd.DataFrame, pub: pd.DataFrame, dataset: str, vals: pd.DataFrame) -> pd.DataFrame:
    """The paper's ACC@1 (``Model, size, ACC@1``) of the models of rows ``g``, at the sizes of ``vals``."""
    paper_rows = []
    for lab, pm in dict.fromkeys(zip(g["label"], g["paper_model"])):  # once per model, not per size
        if pm:
            sel = pub[(pub["dataset"].str.lower() == str(dataset).lower()) & (pub["model"] == pm)]
            for r in sel.to_dict("records"):
                paper_rows.append({"Model": lab, "size": int(r["size"]), "ACC@1": float(r["ACC@1"])})
    paper = pd.DataFrame(paper_rows, columns=["Model", "size", "ACC@1"])
    have = set(zip(vals["Model"], vals["size"].astype(int)))
    return paper[[(m, int(s)) in have for m, s in zip(paper["Model"], paper["size"])]]


def figures_section(lines: list[str], out: ReportOutput, ok: pd.DataFrame, ci: pd.DataFrame, distances: list[str],
                    fig_dir: Path) -> None:
    """One ACC@1 figure per dataset and distance of the ok rows ``ok`` (error bars from the CI table
    ``ci``), drawn into ``fig_dir`` and appended to ``lines`` under ``## Figures``."""
    lines.append("## Figures\n")
    pub = load_published()
    fig_no = {d.lower(): 3 + i for i, d in enumerate((*DATASETS_2D, *DATASETS_3D))}
    ci_acc = ci[ci["metric"] == "ACC@1"] if not ci.empty else ci
    for dist in distances:
        rows = sort_rows(ok[ok["distance"] == dist])
        for d, g in rows.groupby("dataset", sort=False):
            vals = _figure_values(g, ci_acc, d, dist)
            paper = _paper_points(g, pub, d, vals)
            majority = {int(s): float(v) for s, v in zip(g["size"], g["majority_class_rate"]) if pd.notna(v)}
            name = dataset_display_name(d)
            num = fig_no.get(str(d).lower())
            title = (f"{name}: ACC@1 per model and image size, {dist}"
                     + (f"\n(layout of the paper's Figure {num})" if num else ""))
            path = plot_acc1_by_size(vals, fig_dir / f"acc1_{str(d).lower()}_{dist}.png", title,
                                     majority=majority, paper=paper)
            out.figures.append(path)
            lines.append(f"**{title.replace(chr(10), ' ')}.** Bars: ours (95% bootstrap CI); x: the paper's "
                         f"pretrained value; dashed: majority-class rate.\n\n![{name} {dist}](figures/{path.name})\n")

"""The study's published tables and figures, recomputed from its supplementary rows (Tables S1-S4).

Tables 3 and 4 recomputed, with the printed values that disagree
(:func:`cbmir.evaluation.reference.table_disagreements`; VGG19 ACC@5 in Table 3: 87.39 printed, 91.52
recomputed), Table 5, and the paper's own Figures 3-10 redrawn from its rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbmir.evaluation.reference import (
    DATASETS_2D,
    DATASETS_3D,
    PRINTED_TABLE_VALUES,
    load_published,
    published_averages,
    table_disagreements,
)
from cbmir.evaluation.report.figures import VECTOR_SUFFIX, plot_acc1_by_size
from cbmir.evaluation.report.markdown import ReportOutput, markdown_table
from cbmir.evaluation.report.tables import published_robustness_pivot

__all__ = ["APPENDIX_HEADING", "published_section", "published_figures", "published_only", "appendix_section"]

#: Title of the appendix that holds the study's published tables in a report with results (after ours).
APPENDIX_HEADING = "## Appendix: the study's published tables"


def published_section(lines: list[str], out: ReportOutput, heading: str = "##") -> None:
    """Append the published Tables 3 and 4 (recomputed, with the printed values) and the printed values
    that disagree with the recomputation to ``lines`` (under a ``heading``-level title, ``###`` in the appendix
    of a report with results); keep the tables in ``out.tables``."""
    sub = heading + "#"
    lines.append(f"{heading} The published tables (recomputed from the supplementary Tables S1-S4)\n")
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
        lines.append(f"{sub} {table}: average over the {what}\n")
        lines.append(markdown_table(avg))
    dis = table_disagreements()
    out.tables["disagreements"] = dis
    lines.append(f"{sub} Printed values that disagree with the recomputation\n")
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


def published_figures(fig_dir: Path, out: ReportOutput) -> list[tuple[str, Path]]:
    """Draw the paper's Figures 3-10 from its rows into ``fig_dir``; ``(caption, PNG path)`` per figure."""
    pub = load_published()
    figs = []
    for i, d in enumerate((*DATASETS_2D, *DATASETS_3D)):
        sub = pub[pub["dataset"] == d].rename(columns={"model": "Model"})
        path = plot_acc1_by_size(sub[["Model", "size", "ACC@1"]], fig_dir / f"paper_acc1_{d.lower()}.png",
                                 f"{d}: ACC@1 per model and image size, the study's published values",
                                 whose="paper")
        figs.append((f"Figure {3 + i} of the paper, redrawn from its rows: {d} (PNG 300 dpi; vector: "
                     f"`{path.with_suffix(VECTOR_SUFFIX).name}`)", path))
        out.figures.append(path)
        out.vector_figures.append(path.with_suffix(VECTOR_SUFFIX))
    return figs


def published_only(lines: list[str], out: ReportOutput, fig_dir: Path) -> None:
    """The body of a report without a results table: the published tables, Table 5 and Figures 3-10."""
    lines.append("No results table given: this report holds the study's published tables only.\n")
    published_section(lines, out)
    lines.append("## Table 5 (published): range of ACC@1 across image sizes\n")
    piv = published_robustness_pivot()
    out.tables["published Table 5"] = piv
    lines.append(markdown_table(piv))
    lines.append("## Figures 3-10 (published values, redrawn)\n")
    for caption, path in published_figures(fig_dir, out):
        lines.append(f"**{caption}**\n\n![{caption}](figures/{path.name})\n")


def appendix_section(lines: list[str], out: ReportOutput) -> None:
    """The appendix of a report with results, after all of ours: the study's published Tables 3 and 4
    (recomputed, :func:`published_section`) and its Table 5 (range of ACC@1 across sizes)."""
    lines.append(f"{APPENDIX_HEADING}\n")
    lines.append("The study's own numbers, for reference: ours are in the sections above (where a cell of ours "
                 "has a published counterpart, the tables above print it beside ours).\n")
    published_section(lines, out, heading="###")
    lines.append("### Table 5 (published): range of ACC@1 across image sizes\n")
    piv = published_robustness_pivot()
    out.tables["published Table 5"] = piv
    lines.append(markdown_table(piv))

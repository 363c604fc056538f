"""The study's report from a results table: Markdown tables, PNG figures, statistics.

``build_report(results_csv, output_dir)`` writes ``<output>/report.md`` and ``<output>/figures/*.png`` (300 dpi)
with a vector ``*.pdf`` beside each (and the statistics as CSV: ``<output>/stats_ci.csv``,
``<output>/stats_paired.csv``). Order: the metric definitions, then **our results** (runs, evaluation warnings,
baselines, tables, statistics, figures), then the study's published tables in an **appendix**. Layout of our
tables follows Mahbod et al. (2025), *Engineering Applications of Artificial Intelligence* 150:110571:

* Tables S1-S4 — one table per image size, rows dataset x model, columns the five metrics, each
  with the paper's value beside ours and the difference (ours - paper, percentage points);
* Tables 3 and 4 — per-model averages over the 2D and the 3D datasets: ours, the paper's over the
  same (dataset, size) cells, and the paper's full tables recomputed from the supplementary rows,
  with the printed values that disagree (:func:`cbmir.evaluation.reference.table_disagreements`);
* Table 5 — size robustness: range of ACC@1 across sizes (:func:`cbmir.evaluation.reference.size_robustness`);
* Tables 6 and 7 — database creation time, and test time split into query extraction and search;
* a cross-dataset figure (ACC@1 of every model on every dataset, 95% CIs); Figures 3-10 — ACC@1 per model
  grouped by image size, one figure per dataset, y-axis 0-100 %, the paper's pretrained values never over
  ``RANDOM-INIT`` bars; Figure 11 — t-SNE of the database features of one collection, its legend naming
  the classes;
* query galleries (:mod:`~cbmir.evaluation.report.galleries`): per collection with a per-query file, its best and
  worst queries with their top-k as pictures (``figures/gallery_<collection>.png``), from an image source the
  caller gives (``cbmir report``: :class:`cbmir.app.report_images.ReportImages`);
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

Modules: :mod:`~cbmir.evaluation.report.labels` (display names), :mod:`~cbmir.evaluation.report.rows`
(the results rows), :mod:`~cbmir.evaluation.report.merge` (several tables into one),
:mod:`~cbmir.evaluation.report.tables` (S1-S4, 3-7, baselines), :mod:`~cbmir.evaluation.report.statistics`
(CIs, paired tests), :mod:`~cbmir.evaluation.report.markdown` (pipe tables),
:mod:`~cbmir.evaluation.report.figures` and :mod:`~cbmir.evaluation.report.tsne` (PNG figures; matplotlib and
scikit-learn imported when drawing), :mod:`~cbmir.evaluation.report.galleries` (query galleries),
:mod:`~cbmir.evaluation.report.published` (the paper's own tables),
:mod:`~cbmir.evaluation.report.sections` (the Markdown sections), :mod:`~cbmir.evaluation.report.build`
(:func:`build_report`, the order of the sections).
"""

from cbmir.evaluation.report.build import build_report
from cbmir.evaluation.report.figures import plot_acc1_across_datasets, plot_acc1_by_size, save_figure
from cbmir.evaluation.report.labels import dataset_display_name, is_baseline, paper_model_name, row_label
from cbmir.evaluation.report.markdown import ReportOutput, markdown_table
from cbmir.evaluation.report.merge import read_results_tables
from cbmir.evaluation.report.rows import prepare_results
from cbmir.evaluation.report.statistics import ci_table, distance_table, paired_table, tie_diagnostics
from cbmir.evaluation.report.tables import (
    SANITY_REFERENCE,
    average_table,
    per_size_table,
    published_robustness_pivot,
    robustness_table,
    timing_tables,
)
from cbmir.evaluation.report.tsne import tsne_figure

__all__ = [
    "ReportOutput",
    "build_report",
    "read_results_tables",
    "paper_model_name",
    "is_baseline",
    "dataset_display_name",
    "row_label",
    "prepare_results",
    "per_size_table",
    "average_table",
    "robustness_table",
    "published_robustness_pivot",
    "timing_tables",
    "ci_table",
    "paired_table",
    "distance_table",
    "tie_diagnostics",
    "plot_acc1_by_size",
    "plot_acc1_across_datasets",
    "save_figure",
    "tsne_figure",
    "markdown_table",
    "SANITY_REFERENCE",
]

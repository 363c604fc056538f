"""``build_report``: the report of one or more results tables, section by section.

Writes ``<output>/report.md``, ``<output>/figures/*.png`` (300 dpi) with their vector ``*.pdf``, the query
galleries (``<output>/figures/gallery_<collection>.png``) and the statistics as CSV
(``<output>/stats_ci.csv``, ``<output>/stats_paired.csv``); each section is a function of
:mod:`cbmir.evaluation.report.sections`, :mod:`~cbmir.evaluation.report.figures`,
:mod:`~cbmir.evaluation.report.tsne`, :mod:`~cbmir.evaluation.report.galleries` or
:mod:`~cbmir.evaluation.report.published`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from cbmir.core.errors import CbmirError
from cbmir.evaluation.report.figures import figures_section
from cbmir.evaluation.report.galleries import DEFAULT_GALLERY_N, ImageSource, galleries_section
from cbmir.evaluation.report.markdown import ReportOutput, markdown_table
from cbmir.evaluation.report.merge import read_results_tables
from cbmir.evaluation.report.published import appendix_section, published_only
from cbmir.evaluation.report.rows import ok_rows, prepare_results
from cbmir.evaluation.report.sections import (
    averages_section,
    baselines_section,
    definitions_section,
    evaluation_notes_section,
    per_size_section,
    robustness_section,
    runs_section,
    statistics_section,
    ties_section,
    timings_section,
)
from cbmir.evaluation.report.tsne import tsne_section

__all__ = ["build_report"]

_TITLE = "# cbmir retrieval report\n"
_PROTOCOL = ("Reproduction of Mahbod, Saeidi, Hatamikia, Woitek, *Evaluating pre-trained convolutional "
             "neural networks and foundation models as feature extractors for content-based medical image "
             "retrieval*, Eng. Appl. Artif. Intell. 150 (2025) 110571. Protocol: zero-shot, train split = "
             "database, test split = queries, exact top-k; metrics in percent (mAP@5, mMV@5, ACC@1/3/5).\n")
_ORDER = "Our results come first; the study's published tables follow in the appendix at the end.\n"


def _report_dirs(output: str | os.PathLike) -> tuple[Path, Path]:
    """``(output folder, figures folder)``, created.

    Raises:
        CbmirError: the folder cannot be created there (``/proc``, read-only, unwritable).
    """
    out_dir = Path(output)
    fig_dir = out_dir / "figures"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # /proc, /sys, a read-only or unwritable folder
        raise CbmirError(f"--output {out_dir}: cannot create the report folder there ({exc.strerror or exc}); "
                         "choose a writable directory") from None
    return out_dir, fig_dir


def _write(out: ReportOutput, lines: list[str]) -> ReportOutput:
    out.markdown.write_text("\n".join(lines), encoding="utf-8")
    return out


def build_report(results: str | os.PathLike | Sequence[str | os.PathLike] | None, output: str | os.PathLike, *,
                 store_path=None,
                 qdrant_url: str | None = None, tsne_collection: str | None = None, tsne: bool = True,
                 tsne_max_points: int = 2000, n_boot: int = 2000, seed: int = 0, gallery: bool = True,
                 gallery_n: int = DEFAULT_GALLERY_N, images: ImageSource | None = None) -> ReportOutput:
    """Write the report (``<output>/report.md``, ``<output>/figures/*.png`` + ``*.pdf``, statistics CSVs): the
    metric definitions, our results, then the study's published tables in an appendix.

    Args:
        results: results CSV of :func:`cbmir.grid.run_grid`, a list of them (merged by
            :func:`read_results_tables`), or None for the published tables only.
        output: output directory (created).
        store_path / qdrant_url: store holding the t-SNE collection (default: each row's ``store``).
        tsne_collection: collection of the t-SNE figure (default: the 2D row with the best ACC@1,
            pretrained rows first).
        tsne: draw the t-SNE figure; tsne_max_points: its subsample size (at most 2,000 in the study's
            spirit; fewer is faster).
        n_boot: bootstrap resamples for CIs and paired tests; seed: their seed.
        gallery: add the "Query galleries" section (:mod:`~cbmir.evaluation.report.galleries`): per row with a
            per-query file, ``figures/gallery_<collection>.png`` with its ``gallery_n`` best and worst queries;
            images: where their pictures come from (:data:`~cbmir.evaluation.report.galleries.ImageSource`,
            e.g. :class:`cbmir.app.report_images.ReportImages`); None: the section says no source was given.

    Returns:
        :class:`ReportOutput`.

    Raises:
        CbmirError: ``results`` is given but missing or not a results table; ``output`` cannot be created;
            ``gallery_n`` below 1.
    """
    if gallery and gallery_n < 1:
        raise CbmirError(f"--gallery-n {gallery_n}: give at least 1 best / worst query per collection (e.g. 3)")
    out_dir, fig_dir = _report_dirs(output)
    out = ReportOutput(markdown=out_dir / "report.md")
    lines: list[str] = [_TITLE, _PROTOCOL]
    df = None
    tables = [] if results is None else ([results] if isinstance(results, (str, os.PathLike)) else list(results))
    if tables:
        merged, merge_notes = read_results_tables(tables)
        out.notes.extend(merge_notes)
        df = prepare_results(merged)
        results_dir = Path(tables[0]).parent  # per-query paths are absolute after the merge
    if df is None or df.empty:
        published_only(lines, out, fig_dir)
        return _write(out, lines)

    ok = ok_rows(df)
    distances = [d for d in ("cosine", "euclidean") if d in set(ok["distance"])]
    # ours first: what the numbers mean, the runs and their warnings, our tables, statistics and figures
    lines.append(_ORDER)
    definitions_section(lines)
    runs_section(lines, df, ok, tables, distances, report_dir=out_dir)
    evaluation_notes_section(lines, out, ok)
    ties_section(lines, out, df, results_dir)
    baselines_section(lines, out, ok, distances)
    from cbmir.evaluation.report.study_rows import side_by_side_section

    lines += side_by_side_section(ok, distances, markdown_table)
    per_size_section(lines, out, df, ok, distances)
    averages_section(lines, out, df, distances)
    robustness_section(lines, out, df, distances)
    timings_section(lines, out, df)
    ci = statistics_section(lines, out, df, results_dir, out_dir, n_boot=n_boot, seed=seed)
    figures_section(lines, out, ok, ci, distances, fig_dir)
    if tsne:
        tsne_section(lines, df, fig_dir, out, store_path=store_path, qdrant_url=qdrant_url,
                     collection=tsne_collection, max_points=tsne_max_points)
    if gallery:
        galleries_section(lines, out, df, results_dir, fig_dir, images=images, n=gallery_n)
    # then the study's own tables, in an appendix
    appendix_section(lines, out)
    if out.notes:
        lines.append("## Notes\n")
        lines.extend(f"- {n}" for n in out.notes)
        lines.append("")
    return _write(out, lines)

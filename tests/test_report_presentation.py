"""Issue 17, part 2: a report a reader can trust at a glance.

Each rule is checked on what was written or drawn (the Markdown's order, the axes of the figures as matplotlib
drew them, the PNG's stored resolution and the PDF's header, the JSON's keys), against values computed here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cbmir.evaluation.report.figures as figures_mod
from cbmir.evaluation.report import build_report, plot_acc1_by_size
from cbmir.evaluation.report.figures import ACC_YLIM, FIGURE_DPI, RANDOM_INIT
from cbmir.evaluation.report.labels import class_legend_names
from cbmir.evaluation.report.published import APPENDIX_HEADING
from test_grid_report import _row


def _results(tmp_path, rows) -> str:
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _two_datasets(**kw):
    """BreastMNIST with HOG, pretrained and RANDOM-INIT ResNet50; RetinaMNIST with HOG and RANDOM-INIT ResNet50.
    Every ACC@1 is above 70 % (an axis fitted to the data would not start at 0)."""
    return [_row("breastmnist", 28, "hog", 80.0, maj=73.0, **kw),
            _row("breastmnist", 28, "resnet50", 75.0, maj=73.0, **kw),
            _row("breastmnist", 28, "resnet50", 72.0, random_init=True, maj=73.0, **kw),
            _row("retinamnist", 28, "hog", 78.0, maj=71.0, **kw),
            _row("retinamnist", 28, "resnet50", 77.0, random_init=True, maj=71.0, **kw)]


@pytest.fixture
def drawn(monkeypatch):
    """What every bar chart drew, captured just before it is written: per figure, the y-limits, the x-tick labels
    and positions, the x positions of the ``x`` markers (scatter points) and the legend's texts."""
    seen = []
    real = figures_mod.save_figure

    def capture(fig, path):
        ax = fig.axes[0]
        marks = [float(x) for c in ax.collections if type(c).__name__ == "PathCollection"  # scatter markers
                 for x, y in np.asarray(c.get_offsets()) if np.isfinite(y)]  # a NaN point is not drawn
        leg = ax.get_legend()
        seen.append({"name": path.name, "ylim": ax.get_ylim(), "ticks": [t.get_text() for t in ax.get_xticklabels()],
                     "tick_x": list(ax.get_xticks()), "marks": marks, "title": ax.get_title(),
                     "legend": [t.get_text() for t in leg.get_texts()] if leg else []})
        return real(fig, path)

    monkeypatch.setattr(figures_mod, "save_figure", capture)
    return seen


def test_report_puts_definitions_first_ours_next_and_the_study_tables_in_an_appendix(tmp_path):
    md = build_report(_results(tmp_path, _two_datasets()), tmp_path / "rep", tsne=False, n_boot=50).markdown.read_text()
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    ours = ["## What the numbers mean", "## Runs", "## Evaluation warnings", "## Baselines", "## Per-size results",
            "## Averages", "## Size robustness", "## Timings", "## Statistics", "## Figures"]
    pos = [next(i for i, h in enumerate(heads) if h.startswith(o)) for o in ours]
    assert pos == sorted(pos)
    assert heads[-1] == APPENDIX_HEADING and pos[-1] < len(heads) - 1  # the appendix is last (no notes here)
    appendix = md.split(APPENDIX_HEADING)[1]
    body = md.split(APPENDIX_HEADING)[0]
    for published in ("The published tables (recomputed", "Table 5 (published)", "Printed values that disagree"):
        assert published in appendix and published not in body, published
    defs = md.split("## Runs")[0]
    for term in ("**mAP@5**",
                 "**mMV@5**", "**ACC@k**", "**hit rate**", "majority-class rate", "README section 'Metrics'"):
        assert term in defs, term


def test_bar_charts_start_at_zero_name_no_paper_figure_and_never_mark_random_init(tmp_path, drawn):
    out = build_report(_results(tmp_path, _two_datasets()), tmp_path / "rep", tsne=False, n_boot=50)
    assert {d["name"] for d in drawn} == {p.name for p in out.figures} == {
        "acc1_all_datasets_cosine.png", "acc1_breastmnist_cosine.png", "acc1_retinamnist_cosine.png"}
    for d in drawn:
        assert d["ylim"] == pytest.approx(ACC_YLIM) and d["ylim"][0] == 0, d["name"]
        assert "Figure" not in d["title"] and "layout" not in d["title"], d["title"]
    breast = next(d for d in drawn if d["name"] == "acc1_breastmnist_cosine.png")
    ticks = dict(zip(breast["ticks"], breast["tick_x"]))
    pretrained = next(x for t, x in ticks.items() if t == "ResNet50")
    random_init = [x for t, x in ticks.items() if RANDOM_INIT in t]
    assert len(random_init) == 1
    # the paper's pretrained ResNet50 value is drawn over the pretrained bar, nothing over the RANDOM-INIT one
    assert any(abs(m - pretrained) < 0.4 for m in breast["marks"])
    assert not any(abs(m - x) < 0.4 for m in breast["marks"] for x in random_init)
    retina = next(d for d in drawn if d["name"] == "acc1_retinamnist_cosine.png")
    assert retina["marks"] == []  # only HOG and a RANDOM-INIT model: no paper marker at all


def test_plot_never_draws_paper_values_over_random_init_bars_even_when_given(tmp_path, drawn):
    values = pd.DataFrame({"Model": ["ResNet50", f"DenseNet121 {RANDOM_INIT}"], "size": [28, 28],
                           "ACC@1": [90.0, 95.0]})
    paper = pd.DataFrame({"Model": ["ResNet50", f"DenseNet121 {RANDOM_INIT}"], "size": [28, 28],
                          "ACC@1": [80.0, 81.0]})
    plot_acc1_by_size(values, tmp_path / "f.png", "t", paper=paper)
    (d,) = drawn
    rnd = d["tick_x"][d["ticks"].index(f"DenseNet121\n{RANDOM_INIT}")]
    assert len(d["marks"]) == 1 and abs(d["marks"][0] - rnd) >= 0.4
    assert d["ylim"][0] == 0  # all values near 90 %: still from 0
    assert d["legend"] == ["paper (pretrained)", "ours, 28 px"] or d["legend"] == ["ours, 28 px", "paper (pretrained)"]


def test_published_figures_say_the_bars_are_the_papers(tmp_path, drawn):
    from cbmir.evaluation.report.markdown import ReportOutput
    from cbmir.evaluation.report.published import published_figures

    published_figures(tmp_path, ReportOutput(markdown=tmp_path / "r.md"))
    assert len(drawn) == 8
    for d in drawn:
        assert d["ylim"][0] == 0 and "Figure" not in d["title"]
        assert d["legend"] and all(t.startswith("paper, ") for t in d["legend"]), d["legend"]


def test_figures_are_written_as_vector_pdf_and_300_dpi_png(tmp_path):
    from PIL import Image

    out = build_report(_results(tmp_path, _two_datasets()), tmp_path / "rep", tsne=False, n_boot=50)
    assert len(out.figures) == len(out.vector_figures) == 3
    md = out.markdown.read_text()
    for png, vec in zip(out.figures, out.vector_figures):
        assert vec == png.with_suffix(".pdf") and vec.read_bytes()[:5] == b"%PDF-"
        with Image.open(png) as im:
            assert im.format == "PNG"
            assert im.info["dpi"] == pytest.approx((FIGURE_DPI, FIGURE_DPI), abs=0.01)
        assert f"figures/{png.name}" in md and f"figures/{vec.name}" in md


def test_legend_names_every_class_and_grades_of_ordinal_labels():
    breast = ["malignant", "normal, benign"]
    assert class_legend_names([0, 1], breast, "binary-class") == breast
    assert class_legend_names(range(5), ["0", "1", "2", "3", "4"], "ordinal-regression") == [
        f"grade {i}" for i in range(5)]
    assert class_legend_names([0, 2, -1], None, "") == ["class 0", "class 2", "unlabelled"]


def test_tsne_legend_shows_class_names(tmp_path, monkeypatch):
    import cbmir.evaluation.report.tsne as tsne_mod

    seen = []
    real = tsne_mod.save_figure

    def capture(fig, path):
        seen.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return real(fig, path)

    monkeypatch.setattr(tsne_mod, "save_figure", capture)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 12)
    vecs = rng.normal(size=(60, 8)).astype(np.float32) + labels[:, None]
    path = tsne_mod.tsne_figure(vecs, labels, tmp_path / "t.png", "t", class_names=[str(i) for i in range(5)],
                                task="ordinal-regression", max_iter=250)
    assert seen == [[f"grade {i}" for i in range(5)]]
    assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    # the collection metadata's names win over MedMNIST's; without them, MedMNIST INFO's
    meta = type("M", (), {"extra": {"class_names": ["a", "b"], "task": "binary-class"}})()
    assert tsne_mod._classes_of(meta, "breastmnist")  # noqa: SLF001 - the legend's source rule == {"class_names": ["a", "b"], "task": "binary-class"}
    got = tsne_mod._classes_of(None, "retinamnist")  # noqa: SLF001
    assert got["task"] == "ordinal-regression"
    assert class_legend_names(range(5), got["class_names"], got["task"])[0] == "grade 0"


def test_report_shows_evaluation_warnings_unlabelled_counts_and_leave_one_out(tmp_path):
    rows = _two_datasets()
    rows[2].update(warnings="collection 'x' looks collapsed | 3 all-zero query vectors (rows 1, 2, 7)",
                   leave_one_out=False, n_unlabelled_queries=0, n_unlabelled_database=0)
    rows[3].update(warnings="", leave_one_out=True, n_unlabelled_queries=4, n_unlabelled_database=9)
    out = build_report(_results(tmp_path, rows), tmp_path / "rep", tsne=False, n_boot=50)
    t = out.tables["evaluation notes"]
    assert len(t) == 2  # the three rows without any are not listed
    collapsed = t[t["Model"] == f"ResNet50 {RANDOM_INIT}"].iloc[0]
    assert collapsed["warnings"] == "collection 'x' looks collapsed; 3 all-zero query vectors (rows 1, 2, 7)"
    loo = t[t["Dataset"] == "RetinaMNIST"].iloc[0]
    assert loo["leave-one-out"] == "yes" and loo["unlabelled queries (left out)"] == 4
    assert loo["unlabelled database (never relevant)"] == 9
    section = out.markdown.read_text().split("## Evaluation warnings")[1].split("\n## ")[0]
    assert "looks collapsed" in section and "| 4 | 9 |" in section


def test_report_without_evaluation_columns_says_none(tmp_path):
    out = build_report(_results(tmp_path, _two_datasets()), tmp_path / "rep", tsne=False, n_boot=50)
    assert out.tables["evaluation notes"].empty
    assert "None: every row searched test queries" in out.markdown.read_text()


def test_timings_explain_batched_search_and_single_query_latency(tmp_path):
    md = build_report(_results(tmp_path, _two_datasets()), tmp_path / "rep", tsne=False, n_boot=50).markdown.read_text()
    t7 = md.split("### Table 7 layout")[1].split("\n## ")[0]
    assert "**batched**" in t7 and "**one query at a time**" in t7 and "`latency p50 ms`" in t7


def test_run_json_names_the_unit_of_its_metrics_and_the_cli_explains_the_timings(tmp_path):
    from test_evaluation_rules import evaluate_tiny_archive

    out, r, checked = evaluate_tiny_archive(tmp_path)
    assert "queries, batched)" in out and "(one query at a time, sampled)" in out
    assert r["metrics_unit"] == "fraction" and all(0 <= v <= 1 for v in r["metrics"].values())
    assert r["metrics_percent"] == pytest.approx({m: 100 * v for m, v in r["metrics"].items()})
    assert r["majority_class_rate_percent"] == pytest.approx(100 * r["majority_class_rate"])
    assert f"{r['metrics_percent']['ACC@1']:.2f}" in out  # printed in percent: the JSON's percent value
    assert checked == 0  # the brute-force check still reads the fractions


def test_reused_collection_reports_the_ingest_timing_recorded_in_its_metadata(data_dir, tmp_path):
    """A second grid with its own results folder (no shared ingest log) over the same store: the database
    creation time is the one the first ingest recorded in the collection (it was NaN, 'no earlier timing
    known')."""
    from cbmir.evaluation.results import read_results
    from cbmir.grid import GridConfig, run_grid
    from cbmir.search.store import open_store

    cfg = GridConfig(datasets=["breastmnist"], models=["hog"], sizes=[28], results=tmp_path / "a" / "results.csv",
                     store_path=tmp_path / "store", data_dir=data_dir, progress=False, latency_sample=3)
    run_grid(cfg, echo=lambda s: None)
    first = read_results(cfg.results).iloc[0]
    assert not first["train_reused"] and pd.isna(first["warnings"])  # an empty cell: no warning
    raw = pd.read_csv(cfg.results).iloc[0]  # the columns are written (read_results would default them)
    assert str(raw["leave_one_out"]) == "False" and raw["n_unlabelled_queries"] == 0
    assert first["n_unlabelled_queries"] == 0 and first["n_unlabelled_database"] == 0
    with open_store(store_path=tmp_path / "store") as store:
        rec = store.read_meta(first["collection"]).extra["ingest_timings"]
    assert rec["train"]["items"] == 546 and rec["test"]["items"] == 156
    assert rec["train"]["seconds"] == pytest.approx(first["database_creation_s"])
    cfg2 = GridConfig(**{**cfg.__dict__, "results": tmp_path / "b" / "results.csv"})
    run_grid(cfg2, echo=lambda s: None)
    second = read_results(cfg2.results).iloc[0]
    assert second["train_reused"] and second["test_reused"]
    assert second["database_creation_s"] == pytest.approx(first["database_creation_s"])
    assert second["query_extraction_s"] == pytest.approx(first["query_extraction_s"])
    assert "recorded in the collection" in second["timing_note"]
    assert "no earlier timing known" not in second["timing_note"]


def test_run_json_of_a_reused_collection_reports_the_recorded_ingest_times(tmp_path, data_dir):
    """A second ``cbmir run`` reuses the collection: its JSON gives the database-creation and query-extraction
    times recorded when the collection was built (not 0.0)."""
    import json

    from typer.testing import CliRunner

    from cbmir.cli import app

    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        r = CliRunner().invoke(app, ["run", "-d", "breastmnist", "-s", "28", "-m", "hog", "--data-dir", str(data_dir),
                                     "--store-path", str(tmp_path / "s"), "-o", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(json.loads(out.read_text()))
    assert outs[1]["reused_splits"] == ["train", "test"]
    for key in ("database_creation_s", "query_extraction_s"):
        assert outs[0]["timings"][key] > 0
        assert outs[1]["timings"][key] == outs[0]["timings"][key]

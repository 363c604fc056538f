"""Tests of the benchmark grid (cbmir.grid), its results table (cbmir.evaluation.results) and the report
(cbmir.evaluation.report).

Hand-computed expectations for the report's tables; the grid on a tiny real case (BreastMNIST 28 px
with HOG); the Euclidean ranking against numpy brute force over unnormalised vectors.
"""

from __future__ import annotations

import csv
import importlib.resources
import io

import numpy as np
import pandas as pd
import pytest

import cbmir.grid as grid_mod
from cbmir.evaluation.results import COLUMNS, load_per_query, per_query_outcomes, read_results
from cbmir.grid import GridConfig, config_from_cli, expand_cells, run_grid
from cbmir.grid import runner as grid_runner
from cbmir.evaluation.report import (
    average_table,
    build_report,
    per_size_table,
    prepare_results,
    robustness_table,
    row_label,
    timing_tables,
)
from cbmir.core.errors import CbmirError
from cbmir.ingest.base import Batch
def _paper_rows():
    text = (importlib.resources.files("evaluation") / "data" / "paper_results.csv").read_text(encoding="utf-8")
    return {(r["dataset"], int(r["size"]), r["model"]): r for r in csv.DictReader(io.StringIO(text))}


def _row(dataset, size, model, acc1, *, distance="cosine", random_init=False, base=50.0, maj=60.0, is_3d=False):
    r = {"dataset": dataset, "size": size, "model": model, "backend": "numpy" if model == "hog" else "torch",
         "distance": distance, "random_init": random_init, "status": "ok", "error": "",
         "family": "handcrafted baseline" if model == "hog" else "imagenet-cnn", "is_3d": is_3d,
         "majority_class_rate": maj, "n_database": 100, "n_queries": 10}
    for i, m in enumerate(("mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5")):
        r[m] = acc1 if m == "ACC@1" else base + i
    return r


# --------------------------------------------------------------------------- report tables, by hand
def test_average_table_matches_hand_computed_means_and_paper_same_cells():
    paper = _paper_rows()
    rows = [
        _row("breastmnist", 28, "resnet50", 70.0, random_init=True),
        _row("breastmnist", 64, "resnet50", 80.0, random_init=True),
        _row("retinamnist", 28, "resnet50", 45.0, random_init=True),
        _row("breastmnist", 28, "hog", 81.0),
        _row("adrenalmnist3d", 28, "resnet50", 66.0, random_init=True, is_3d=True),
        _row("vesselmnist3d", 28, "resnet50", 90.0, random_init=True, is_3d=True),
        _row("breastmnist", 28, "resnet50", 10.0, distance="euclidean", random_init=True),
    ]
    df = prepare_results(pd.DataFrame(rows))
    t2 = average_table(df, "2d", "cosine").set_index("Model")
    assert list(t2.index) == ["HOG (handcrafted baseline)", "ResNet50 RANDOM-INIT"]
    r = t2.loc["ResNet50 RANDOM-INIT"]
    assert r["n"] == 3 and r["n paper"] == 3
    assert r["ACC@1"] == pytest.approx((70.0 + 80.0 + 45.0) / 3)
    expect = (float(paper[("BreastMNIST", 28, "ResNet50")]["ACC@1"])
              + float(paper[("BreastMNIST", 64, "ResNet50")]["ACC@1"])
              + float(paper[("RetinaMNIST", 28, "ResNet50")]["ACC@1"])) / 3
    assert r["ACC@1 paper"] == pytest.approx(expect)  # (79.48 + 82.05 + 48.25) / 3
    assert r["mAP@5 paper"] == pytest.approx(
        sum(float(paper[k]["mAP@5"]) for k in [("BreastMNIST", 28, "ResNet50"), ("BreastMNIST", 64, "ResNet50"),
                                               ("RetinaMNIST", 28, "ResNet50")]) / 3)
    hog = t2.loc["HOG (handcrafted baseline)"]
    assert hog["ACC@1"] == 81.0 and hog["n paper"] == 0 and np.isnan(hog["ACC@1 paper"])
    # 3D: VesselMNIST3D counts in ours; only AdrenalMNIST3D has a paper row
    t3 = average_table(df, "3d", "cosine").set_index("Model")
    r3 = t3.loc["ResNet50 RANDOM-INIT"]
    assert r3["n"] == 2 and r3["n paper"] == 1
    assert r3["ACC@1"] == pytest.approx(78.0)
    assert r3["ACC@1 paper"] == pytest.approx(float(paper[("AdrenalMNIST3D", 28, "ResNet50")]["ACC@1"]))
    # the euclidean row is averaged separately
    te = average_table(df, "2d", "euclidean").set_index("Model")
    assert te.loc["ResNet50 RANDOM-INIT", "ACC@1"] == 10.0


def test_robustness_table_hand_computed_ranges():
    paper = _paper_rows()
    rows = [_row("adrenalmnist3d", 28, "vgg19", 70.5, is_3d=True),
            _row("adrenalmnist3d", 64, "vgg19", 66.0, is_3d=True),
            _row("adrenalmnist3d", 28, "hog", 71.14, is_3d=True), _row("adrenalmnist3d", 64, "hog", 74.16, is_3d=True),
            _row("breastmnist", 28, "vgg19", 75.0)]  # one size only: not listed
    t = robustness_table(prepare_results(pd.DataFrame(rows)), "cosine").set_index("Model")
    assert sorted(t.index) == ["HOG (handcrafted baseline)", "VGG19"]
    v = t.loc["VGG19"]
    assert (v["min"], v["max"]) == (66.0, 70.5) and v["range"] == pytest.approx(4.5) and v["sizes"] == "28,64"
    p28, p64 = (float(paper[("AdrenalMNIST3D", s, "VGG19")]["ACC@1"]) for s in (28, 64))
    assert v["paper range (same sizes)"] == pytest.approx(abs(p28 - p64))
    assert v["paper range (all sizes)"] == pytest.approx(abs(p28 - p64))  # 3D: the paper has only 28 and 64
    assert t.loc["HOG (handcrafted baseline)", "range"] == pytest.approx(3.02)
    assert np.isnan(t.loc["HOG (handcrafted baseline)", "paper range (same sizes)"])


def test_per_size_table_puts_paper_beside_ours_with_labels_and_majority_row():
    paper = _paper_rows()
    rows = [_row("breastmnist", 28, "densenet121", 77.0, random_init=True, maj=73.08),
            _row("breastmnist", 28, "hog", 80.13, maj=73.08)]
    t = per_size_table(prepare_results(pd.DataFrame(rows)), 28, "cosine")
    assert list(t["Model"]) == ["HOG (handcrafted baseline)", "DenseNet121 RANDOM-INIT",
                                "majority class (constant answer)"]
    d = t.iloc[1]
    assert d["ACC@1 paper"] == float(paper[("BreastMNIST", 28, "DenseNet121")]["ACC@1"])  # 80.12
    assert d["ACC@1 Δ"] == pytest.approx(77.0 - 80.12)
    assert np.isnan(t.iloc[0]["ACC@1 paper"])
    assert t.iloc[2]["ACC@1"] == 73.08


def test_row_labels():
    assert row_label("hog") == "HOG (handcrafted baseline)"
    assert row_label("efficientnetv2m", random_init=True) == "EfficientNetV2M RANDOM-INIT"
    assert row_label("resnet50", backend="keras") == "ResNet50 [keras]"


def test_timing_tables_split_test_time_and_use_the_extracting_twin():
    a = _row("breastmnist", 28, "vgg19", 75.0)
    a.update(model_load_s=1.0, database_creation_s=30.0, database_items_per_s=18.2, query_extraction_s=10.0,
             search_s=0.5, search_per_query_ms=3.2, latency_p50_ms=1.0, latency_p95_ms=2.0, features_cached=False)
    b = dict(a, distance="euclidean", database_creation_s=0.3, query_extraction_s=0.1, search_s=1.5,
             features_cached=True)
    t6, t7 = timing_tables(prepare_results(pd.DataFrame([a, b])))
    assert len(t6) == 1 and t6.iloc[0]["database creation s"] == 30.0
    assert t6.iloc[0]["precision"] == ""  # not recorded (a table from before the column)
    t6b, _ = timing_tables(prepare_results(pd.DataFrame([dict(a, precision="bf16-autocast")])))
    assert t6b.iloc[0]["precision"] == "bf16-autocast"
    e = t7.set_index("distance").loc["euclidean"]
    assert e["query extraction s"] == 10.0 and e["search s"] == 1.5 and e["test s"] == 11.5
    assert e["search share %"] == pytest.approx(100 * 1.5 / 11.5)


def test_report_says_hog_missing_only_where_no_distance_ran_it(tmp_path):
    # 2D: HOG with both distances; AdrenalMNIST3D: HOG with cosine only (3D cells run cosine only);
    # VesselMNIST3D: no HOG at all. Only VesselMNIST3D lacks the weights-free baseline.
    rows = [_row("breastmnist", 28, "hog", 80.0), _row("breastmnist", 28, "hog", 80.0, distance="euclidean"),
            _row("adrenalmnist3d", 28, "hog", 71.0, is_3d=True),
            _row("adrenalmnist3d", 28, "densenet121", 72.0, random_init=True, is_3d=True),
            _row("vesselmnist3d", 28, "densenet121", 90.0, random_init=True, is_3d=True)]
    results = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    md = build_report(results, tmp_path / "rep", tsne=False, n_boot=50).markdown.read_text()
    assert "No weights-free baseline was run for: VesselMNIST3D@28.\n" in md
    assert f"Results table: `{results.resolve()}`" in md  # outside the report's folder: absolute
    inside = tmp_path / "rep2" / "table" / "results.csv"
    inside.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(inside, index=False)
    md2 = build_report(inside, tmp_path / "rep2", tsne=False, n_boot=50).markdown.read_text()
    assert "Results table: `table/results.csv`" in md2  # inside: relative, so report and table move together
    assert "HOG was not run with the euclidean distance for: AdrenalMNIST3D@28 " in md
    assert "BreastMNIST@28" not in md.split("## Baselines")[1].split("## Per-size")[0]  # HOG ran with both


def test_report_figure_with_a_model_at_two_sizes_marks_each_paper_value_once(tmp_path):
    """A model run at 28 and 64 on one study dataset: the figure's paper markers are one per size (they
    were duplicated per run size, which broke the figure)."""
    rows = [_row("adrenalmnist3d", 28, "densenet121", 72.0, random_init=True, is_3d=True),
            _row("adrenalmnist3d", 64, "densenet121", 74.0, random_init=True, is_3d=True),
            _row("adrenalmnist3d", 64, "hog", 74.2, is_3d=True)]
    results = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    out = build_report(results, tmp_path / "rep", tsne=False, n_boot=50)
    assert [p.name for p in out.figures if "adrenal" in p.name] == ["acc1_adrenalmnist3d_cosine.png"]
    t = out.tables["Table 5 ours cosine"]
    assert len(t[t["Model"].str.contains("DenseNet121")]) == 1


def test_published_only_report_reproduces_tables_3_and_4_and_the_disagreement(tmp_path):
    """`cbmir report` with no results: the study's Tables 3 and 4 recomputed, and the one disagreement."""
    from typer.testing import CliRunner

    from cbmir.cli import app

    res = CliRunner().invoke(app, ["report", "--output", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text()
    paper = _paper_rows()
    vgg = [float(r["ACC@5"]) for k, r in paper.items() if k[2] == "VGG19" and k[0] not in
           ("AdrenalMNIST3D", "SynapseMNIST3D")]
    assert len(vgg) == 24 and f"{sum(vgg) / 24:.2f}" == "91.52"
    # Table 3 (2D) row of VGG19 with the printed 87.39 beside the recomputed 91.52; MedCLIP over 23 rows
    assert "| VGG19 | 77.69 | 77.13 | 72.27 | 86.70 | 91.52 | 24 | 87.39 |" in md
    assert "| MedCLIP | 75.96 | 76.18 | 69.77 | 85.69 | 90.68 | 23 | — |" in md
    # Table 4 (3D)
    assert "| CONCH | 78.86 | 75.02 | 72.67 | 91.09 | 94.49 | 4 |" in md
    assert "| Table 3 | VGG19 | ACC@5 | 87.39 | 91.52 | -4.13 |" in md
    assert "printed **87.39**" in md and "average **91.52**" in md
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert len(pngs) == 8 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# --------------------------------------------------------------------------- configuration
def test_grid_config_from_yaml_toml_and_flags(tmp_path):
    y = tmp_path / "g.yaml"
    y.write_text("models: [hog, resnet50]\nrandom-init: true\ndistances: [cosine, euclidean]\n"
                 "datasets:\n  breastmnist: [28]\n  adrenalmnist3d: [28, 64]\nresults: r/results.csv\n")
    cfg = config_from_cli(y)
    cells = expand_cells(cfg)
    assert [(c.dataset, c.size) for c in cells[::4]] == [("breastmnist", 28), ("adrenalmnist3d", 28),
                                                         ("adrenalmnist3d", 64)]
    hog = [c for c in cells if c.model == "hog"]
    assert {c.backend for c in hog} == {"numpy"} and not any(c.random_init for c in hog)
    assert all(c.random_init for c in cells if c.model == "resnet50")
    assert len(cells) == 3 * 2 * 2
    t = tmp_path / "g.toml"
    t.write_text('datasets = ["breastmnist"]\nmodels = ["hog"]\nsizes = [28, 64]\n')
    cfg = config_from_cli(t, sizes=["28"], distances="euclidean")  # flags override the file
    assert [(c.size, c.distance) for c in expand_cells(cfg)] == [(28, "euclidean")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("modles: [hog]\n")
    with pytest.raises(CbmirError, match="unknown grid setting"):
        config_from_cli(bad)
    with pytest.raises(CbmirError, match="distance"):
        GridConfig(datasets=["breastmnist"], models=["hog"], distances=["manhattan"])


# --------------------------------------------------------------------------- the grid, tiny real case
@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, data_dir):
    """``cbmir benchmark`` on BreastMNIST 28 px with pretrained VGG19 (its weights are unreachable offline:
    the cells fail at run time and are recorded) and HOG, cosine + Euclidean, per-query files; run_cell
    calls are counted."""
    from typer.testing import CliRunner

    from cbmir.cli import app

    root = tmp_path_factory.mktemp("grid")
    flags = dict(datasets="breastmnist", models="vgg19,hog", sizes="28", distances="cosine,euclidean",
                 results=root / "results" / "results.csv", store_path=root / "store", data_dir=data_dir)
    args = ["benchmark", "--save-per-query", "--no-progress"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    calls = []
    real = grid_mod.run_cell

    def counting(cell, *a, **kw):
        calls.append(cell.key)
        return real(cell, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grid_runner, "run_cell", counting)
        mp.setenv("HF_HUB_OFFLINE", "1")  # the VGG19 weights check fails fast, network or not
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 cells: 2 ran, 2 failed, 0 skipped" in res.output
    lists = {k: grid_mod.parse_list(flags[k]) for k in ("datasets", "models", "sizes", "distances")}
    cfg = config_from_cli(None, save_per_query=True, progress=False, **{**flags, **lists})
    return cfg, calls, root


def test_grid_writes_rows_records_failure_and_goes_on(tiny_grid):
    cfg, calls, root = tiny_grid
    assert len(calls) == 4  # the failing cells did not stop the grid
    df = read_results(cfg.results)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(df) == 4
    failed = df[df.status == "failed"]
    assert len(failed) == 2 and failed["error"].str.contains("no pretrained weights for model 'vgg19'").all()
    ok = df[df.status == "ok"].set_index("distance")
    assert set(ok["model"]) == {"hog"} and set(ok["backend"]) == {"numpy"}
    c = ok.loc["cosine"]
    # DESIGN.md §3 reference: HOG, BreastMNIST 28 px, cosine
    assert [round(c[m], 2) for m in ("mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5")] == [84.53, 73.08, 80.13, 92.95,
                                                                                        96.15]
    assert c["majority_class_rate"] == pytest.approx(100 * 114 / 156)
    assert (c["n_queries"], c["n_database"], c["k"]) == (156, 546, 5)
    assert c["engine"] == "qdrant-edge" and c["weights"] == "none" and not c["random_init"]
    assert c["database_creation_s"] > 0 and c["query_extraction_s"] > 0 and c["search_s"] > 0
    assert c["test_time_s"] == pytest.approx(c["query_extraction_s"] + c["search_s"])
    for v in ("cbmir_version", "torch_version", "timm_version", "qdrant_edge_version", "numpy_version"):
        assert isinstance(c[v], str) and c[v] not in ("", "n/a")
    # the Euclidean twin replayed the cosine cell's features instead of extracting again
    e = ok.loc["euclidean"]
    assert not c["features_cached"] and e["features_cached"]
    assert e["collection"] == "breastmnist_28_hog_euclidean"
    assert not (cfg.results.parent / ".feature_cache").exists()
    # per-query files recompute every metric
    pq = load_per_query(cfg.results.parent / c["per_query_file"])
    assert pq["topk_indices"].shape == (156, 5) and pq["distance"] == "cosine"
    outcomes = per_query_outcomes(pq)
    for m in ("mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5"):
        assert 100 * outcomes[m].mean() == pytest.approx(c[m])


def test_second_run_skips_finished_cells_without_recomputing(tiny_grid):
    cfg, _, _ = tiny_grid
    before = read_results(cfg.results)
    calls = []

    def runner(cell, *a, **kw):
        calls.append(cell.key)
        raise CbmirError(f"no pretrained weights for model {cell.model!r} (still)")

    summary = run_grid(cfg, cell_runner=runner, echo=lambda s: None)
    # ok cells are skipped; the two failed cells are retried (they fail again, quickly)
    assert len(summary.skipped) == 2 and len(calls) == 2
    assert all(k[2] == "vgg19" for k in calls)
    cfg2 = GridConfig(**{**cfg.__dict__, "retry_failed": False})
    calls.clear()
    summary = run_grid(cfg2, cell_runner=runner, echo=lambda s: None)
    assert calls == [] and len(summary.skipped) == 4
    after = read_results(cfg.results)
    cols = ["distance", "finished_at", "database_creation_s", "search_s", "ACC@1"]
    ok_b = before[before.status == "ok"][cols].sort_values("distance").reset_index(drop=True)
    ok_a = after[after.status == "ok"][cols].sort_values("distance").reset_index(drop=True)
    assert len(ok_a) == 2
    pd.testing.assert_frame_equal(ok_a, ok_b)  # the finished rows were not recomputed


def test_grid_refuses_unknown_names_sizes_and_k_before_any_cell(tmp_path):
    from cbmir.cli import app
    from typer.testing import CliRunner

    calls = []

    def runner(cell, *a, **kw):
        calls.append(cell.key)
        raise AssertionError("no cell may run")

    results = tmp_path / "r" / "results.csv"
    base = dict(datasets=["breastmnist"], models=["hog"], results=results, progress=False)
    cases = [
        (dict(models=["no-such-model", "hog"]), r"unknown model\(s\) 'no-such-model' \(valid models: .*hog"),
        (dict(datasets=["breastmnist", "nosuchmnist"]), r"unknown dataset\(s\) 'nosuchmnist' \(valid datasets: "
                                                        r".*breastmnist"),
        (dict(sizes=[28, 32]), r"breastmnist has no size 32 \(valid: 28, 64, 128, 224\)"),
        (dict(datasets={"adrenalmnist3d": [128]}), r"adrenalmnist3d has no size 128 \(valid: 28, 64\)"),
        (dict(k=9999), r"k 9999 exceeds the 546 database points of breastmnist"),
    ]
    for override, pattern in cases:
        with pytest.raises(CbmirError, match=pattern):
            run_grid(GridConfig(**{**base, **override}), cell_runner=runner, echo=lambda s: None)
    with pytest.raises(CbmirError, match="k must be an integer >= 1, got 0"):
        GridConfig(**{**base, "k": 0})
    assert calls == [] and not results.exists()
    # the CLI: refused (not exit 0 with failed rows), every bad entry named in one message
    res = CliRunner().invoke(app, ["benchmark", "--datasets", "breastmnist,nosuchmnist", "--models",
                                   "hog,no-such-model", "--results", str(results), "--no-progress"])
    assert res.exit_code != 0 and isinstance(res.exception, CbmirError)
    assert "'no-such-model'" in str(res.exception) and "'nosuchmnist'" in str(res.exception)
    assert not results.exists()
    # a user archive given as a path is not refused up front (its cell opens and checks it)
    grid_mod.validate_grid(GridConfig(**{**base, "datasets": ["./my_archive/images"]}))


def test_run_cell_refuses_k_larger_than_the_database(data_dir, tmp_path):
    cfg = GridConfig(datasets=["breastmnist"], models=["hog"], k=9999, data_dir=data_dir,
                     store_path=tmp_path / "store", results=tmp_path / "results.csv", progress=False)
    cell = expand_cells(cfg)[0]
    with pytest.raises(CbmirError, match=r"^k 9999 exceeds the 546 database points of breastmnist@28$"):
        grid_mod.run_cell(cell, cfg, results_dir=tmp_path, ingest_log={})


def test_grid_reruns_finished_cells_recorded_with_another_k(tmp_path):
    results = tmp_path / "results.csv"
    cfg = GridConfig(datasets=["breastmnist"], models=["hog"], sizes=[28, 64], distances=["cosine", "euclidean"],
                     k=5, results=results, progress=False)
    old = [dict(_row("breastmnist", 28, "hog", 70.0), k=3),                         # other k: re-run
           dict(_row("breastmnist", 28, "hog", 71.0, distance="euclidean"), k=5),   # same k: done
           _row("breastmnist", 64, "hog", 72.0)]                                    # no k (old table): done
    pd.DataFrame(old).to_csv(results, index=False)
    calls, said = [], []

    def runner(cell, config, **kw):
        calls.append(cell.key)
        return dict(_row(cell.dataset, cell.size, cell.model, 99.0, distance=cell.distance), k=config.k)

    summary = run_grid(cfg, cell_runner=runner, echo=said.append)
    assert calls == [("breastmnist", 28, "hog", "numpy", "cosine", False),
                     ("breastmnist", 64, "hog", "numpy", "euclidean", False)]  # the missing cell
    assert len(summary.skipped) == 2 and len(summary.ran) == 2
    assert "re-running breastmnist@28 hog/numpy cosine: table row has k=3, grid asks k=5" in said
    df = read_results(results).set_index(["size", "distance"]).sort_index()
    assert len(df) == 4  # one row per cell: the k=3 row was replaced
    assert df.loc[(28, "cosine"), "k"] == 5 and df.loc[(28, "cosine"), "ACC@1"] == 99.0
    assert df.loc[(28, "euclidean"), "ACC@1"] == 71.0 and df.loc[(64, "cosine"), "ACC@1"] == 72.0
    calls.clear()
    run_grid(cfg, cell_runner=runner, echo=lambda s: None)  # now every row has k=5 (or none)
    assert calls == []


def test_interrupted_cell_resumes_and_complete_collection_is_reused(data_dir, tmp_path, interrupted):
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.search.store import open_store

    store_path = tmp_path / "store"
    source = open_medmnist("breastmnist", 28, data_dir)

    emb = make_embedder(create_extractor("hog"), size=28, is_3d=False)
    with open_store(store_path=store_path) as store, pytest.raises(KeyboardInterrupt):
        ingest(interrupted(source, 2), emb, store, batch_size=64, collection="breastmnist_28_hog", progress=False)
    cfg3 = GridConfig(datasets=["breastmnist"], models=["hog"], sizes=[28], results=tmp_path / "r" / "results.csv",
                      store_path=store_path, data_dir=data_dir, progress=False, latency_sample=3)
    run_grid(cfg3, echo=lambda s: None)
    row = read_results(cfg3.results).iloc[0]
    assert row["status"] == "ok" and "train: resumed with 128 of 546 rows stored" in row["timing_note"]
    assert round(row["ACC@1"], 2) == 80.13
    # a new results table over the same store: the complete collection is reused, timings from the log
    cfg4 = GridConfig(**{**cfg3.__dict__, "results": tmp_path / "r" / "results2.csv"})
    run_grid(cfg4, echo=lambda s: None)
    row4 = read_results(cfg4.results).iloc[0]
    assert row4["train_reused"] and row4["test_reused"] and "reused collection" in row4["timing_note"]
    assert row4["database_creation_s"] == pytest.approx(row["database_creation_s"])  # from ingest_log.json
    assert round(row4["ACC@1"], 2) == 80.13


def test_report_renders_markdown_and_pngs_from_a_results_table(tiny_grid, tmp_path):
    cfg, _, _ = tiny_grid
    out = build_report(cfg.results, tmp_path / "rep", n_boot=300, tsne_max_points=150)
    md = out.markdown.read_text()
    for heading in ("Table S1 layout: 28 px", "Table 3 layout (2D), cosine", "Table 3: average over the 2D",
                    "Size robustness (Table 5)", "Table 6 layout", "Table 7 layout", "95% bootstrap confidence",
                    "Cosine vs Euclidean", "Failed cells", "majority class"):
        assert heading in md, heading
    assert "HOG (handcrafted baseline)" in md and "no pretrained weights for model 'vgg19'" in md
    assert "printed **87.39**" in md
    names = sorted(p.name for p in out.figures)
    assert names == ["acc1_all_datasets_cosine.png", "acc1_all_datasets_euclidean.png", "acc1_breastmnist_cosine.png",
                     "acc1_breastmnist_euclidean.png", "tsne_breastmnist_28_hog.png"]
    for p in out.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{p.name}" in md
    ci = out.tables["ci"]
    acc = ci[(ci.metric == "ACC@1") & (ci.distance == "cosine")].iloc[0]
    assert acc["lo"] < acc["value"] < acc["hi"] and acc["check"] < 1e-9
    dist = out.tables["distance"].iloc[0]
    assert dist["identical top-k"] == 100.0  # HOG vectors are unit-norm: both distances rank alike


def test_results_table_as_parquet_reads_back_equal_and_reports(tiny_grid, tmp_path):
    from cbmir.evaluation.results import write_results

    cfg, _, _ = tiny_grid
    csv_df = read_results(cfg.results)
    pq = cfg.results.with_suffix(".parquet")                      # beside the CSV: per-query paths resolve
    write_results(csv_df, pq)
    assert pq.read_bytes()[:4] == b"PAR1"
    pq_df = read_results(pq)
    pd.testing.assert_frame_equal(pq_df[csv_df.columns], csv_df, check_dtype=False)
    assert set(pq_df["status"]) == {"ok", "failed"} and "" in set(pq_df["error"])
    out = build_report(pq, tmp_path / "rep", tsne=False, n_boot=50)
    assert out.tables["ci"]["check"].max() < 1e-9
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(CbmirError, match="does not parse as Parquet"):
        read_results(tmp_path / "bad.parquet")
    pq.unlink()


def test_report_merges_tables_from_different_folders(tiny_grid, tmp_path):
    """Two tables (e.g. grids run in parallel): relative per-query paths resolve against each table's own
    folder, and a cell in both tables takes the later table's row, with a note."""
    import shutil

    from cbmir.cli import app
    from typer.testing import CliRunner

    cfg, _, root = tiny_grid
    df = pd.read_csv(cfg.results)
    ok = df[df["status"] == "ok"]
    cos, euc = ok[ok["distance"] == "cosine"], ok[ok["distance"] == "euclidean"]
    other = tmp_path / "elsewhere"
    (other / "per_query").mkdir(parents=True)
    for f in euc["per_query_file"]:
        shutil.copy(cfg.results.parent / f, other / f)  # same relative path, other folder
    euc_changed = euc.assign(**{"ACC@1": 12.5})
    pd.concat([cos, euc]).to_csv(tmp_path / "a.csv", index=False)  # relative paths resolve from tmp_path: none there
    shutil.copytree(cfg.results.parent / "per_query", tmp_path / "per_query")
    euc_changed.to_csv(other / "b.csv", index=False)
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path / "a.csv"), "--results",
                                   str(other / "b.csv"), "-o", str(tmp_path / "rep"), "--no-tsne", "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    assert "is in more than one table; the row of the later table is used" in res.output
    assert "per-query files disagree with the results table for BreastMNIST@28 HOG" in res.output  # 12.5 edited
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Results tables: " in md and "b.csv" in md
    from cbmir.evaluation.report import read_results_tables

    merged, notes = read_results_tables([tmp_path / "a.csv", other / "b.csv"])
    assert len(merged) == 2 and len(notes) == 1
    e = merged[merged["distance"] == "euclidean"].iloc[0]
    assert e["ACC@1"] == 12.5 and e["per_query_file"] == (other / euc["per_query_file"].iloc[0]).resolve().as_posix()
    with pytest.raises(CbmirError, match="nope.csv does not exist"):
        read_results_tables([tmp_path / "a.csv", tmp_path / "nope.csv"])


def test_merged_tables_prefer_ok_rows_and_read_a_repeated_table_once(tmp_path, monkeypatch):
    from cbmir.evaluation.report import read_results_tables

    x_ok = _row("breastmnist", 28, "hog", 80.0)
    x_failed = dict(_row("breastmnist", 28, "hog", float("nan")), status="failed", error="boom")
    y_a, y_b = _row("breastmnist", 64, "hog", 60.0), _row("breastmnist", 64, "hog", 65.0)
    z_failed_a = dict(_row("breastmnist", 128, "hog", float("nan")), status="failed", error="first")
    z_failed_b = dict(z_failed_a, error="second")
    (tmp_path / "b").mkdir()
    pd.DataFrame([x_ok, y_a, z_failed_a]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame([x_failed, y_b, z_failed_b]).to_csv(tmp_path / "b" / "b.csv", index=False)
    merged, notes = read_results_tables([tmp_path / "a.csv", tmp_path / "b" / "b.csv"])
    m = merged.set_index("size")
    assert len(merged) == 3
    assert m.loc[28, "status"] == "ok" and m.loc[28, "ACC@1"] == 80.0      # a's ok beats b's later failed row
    assert m.loc[64, "ACC@1"] == 65.0                                       # both ok: the later table
    assert m.loc[128, "error"] == "second"                                  # both failed: the later table
    assert len(notes) == 3
    assert notes[0] == (f"cell breastmnist@28 hog/numpy cosine is in more than one table; the ok row of "
                        f"{tmp_path / 'a.csv'} is used, not a later table's non-ok row")
    assert notes[1].endswith("the row of the later table is used") and "@64" in notes[1]
    # the same table twice (also through another spelling of its path): read once, no notes
    monkeypatch.chdir(tmp_path / "b")
    once, notes = read_results_tables([tmp_path / "a.csv", "../a.csv"])
    assert notes == [] and len(once) == 3
    pd.testing.assert_frame_equal(once, read_results_tables([tmp_path / "a.csv"])[0])


def test_ci_table_marks_rows_whose_per_query_file_disagrees_and_lists_cells_without_cis(tiny_grid, tmp_path):
    cfg, _, _ = tiny_grid
    df = pd.read_csv(cfg.results)
    ok = df[df["status"] == "ok"].copy()
    ok["per_query_file"] = [(cfg.results.parent / f).as_posix() for f in ok["per_query_file"]]
    ok.loc[ok["distance"] == "euclidean", "ACC@1"] = 12.5                 # disagrees with its per-query file
    extra = dict(ok[ok["distance"] == "cosine"].iloc[0], size=64, per_query_file="per_query/gone.npz")
    extra2 = dict(ok[ok["distance"] == "cosine"].iloc[0], size=128, per_query_file=float("nan"))
    pd.concat([ok, pd.DataFrame([extra, extra2])]).to_csv(tmp_path / "t.csv", index=False)
    out = build_report(tmp_path / "t.csv", tmp_path / "rep", tsne=False, n_boot=50)
    md = out.markdown.read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| BreastMNIST | 28 | HOG (handcrafted baseline)")
            and "[" in ln]
    assert len(rows) == 2
    assert [r.split(" | ")[2:4] for r in rows] == [["HOG (handcrafted baseline)", "cosine"],
                                                   ["HOG (handcrafted baseline)†", "euclidean"]]
    assert "† per-query file disagrees with the table; CI not comparable." in md
    note = (f"no CIs for BreastMNIST@64 HOG (handcrafted baseline) cosine (per-query file "
            f"{tmp_path / 'per_query' / 'gone.npz'} not found), BreastMNIST@128 HOG (handcrafted baseline) cosine "
            f"(no per-query file saved)")
    assert note in out.notes and f"**Note:** {note}." in md


# --------------------------------------------------------------------------- Euclidean end to end
class _ArraySource:
    """A tiny in-memory dataset whose 'images' are the feature vectors themselves."""

    name, size, is_3d, n_classes = "toy", 28, False, 3

    def __init__(self, train, test, ytr, yte):
        self.data = {"train": (train, ytr), "test": (test, yte)}

    def split_size(self, split):
        return len(self.data[split][0])

    def labels(self, split):
        return self.data[split][1]

    def iter_batches(self, split, batch_size, start=0):
        x, y = self.data[split]
        for lo in range(start, len(x), batch_size):
            idx = np.arange(lo, min(lo + batch_size, len(x)))
            yield Batch(images=x[idx], labels=y[idx], indices=idx, image_ids=[f"toy/{split}/{i}" for i in idx])


class _IdentityEmbedder:
    def __init__(self, dim):
        self.dim, self.aggregation, self.is_3d = dim, "none", False

    def embed(self, images):
        return np.asarray(images, dtype=np.float32)

    def identity(self):
        return {"model": "identity", "backend": "numpy", "weights": "none", "preprocessing": "none"}


def _brute_euclidean(db, q, k):
    d = ((q[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), d.shape), d), axis=-1)[:, :k]
    return order, np.sqrt(np.take_along_axis(d, order, 1))


@pytest.mark.parametrize("dim", [48, 70_000])  # one vector; two chunks above Qdrant's 65,535 dims
def test_euclidean_ranking_equals_numpy_brute_force_on_unnormalised_vectors(tmp_path, dim):
    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.ingest.job import ingest
    from cbmir.search.store import open_store

    rng = np.random.default_rng(dim)
    n_db, n_q = (120, 15) if dim < 1000 else (40, 6)
    scale = rng.uniform(0.05, 20.0, size=(n_db, 1))  # very different norms: cosine would rank otherwise
    db = (rng.normal(size=(n_db, dim)) * scale).astype(np.float32)
    db[7] = db[3]  # an exact tie: lower index first
    q = (rng.normal(size=(n_q, dim)) * 4).astype(np.float32)
    q[0] = db[3]
    ytr, yte = rng.integers(0, 3, n_db), rng.integers(0, 3, n_q)
    src = _ArraySource(db, q, ytr, yte)
    with open_store(store_path=tmp_path / "store") as store:
        rep = ingest(src, _IdentityEmbedder(dim), store, distance="euclidean", batch_size=32, progress=False)
        assert rep.collection == "toy_28_identity_euclidean"
        _, stored, _ = store.fetch(rep.collection, "train")
        np.testing.assert_array_equal(stored, db)  # kept unnormalised
        ev = evaluate_collection(store, rep.collection, k=5, progress=False, latency_sample=2)
    idx, dist = _brute_euclidean(db, q, 5)
    np.testing.assert_array_equal(ev.topk_indices, idx)
    assert ev.topk_indices[0, 0] == 3 and ev.topk_indices[0, 1] == 7
    np.testing.assert_allclose(ev.topk_scores, dist, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(ev.topk_scores, axis=1) >= 0)  # lower is closer
    # the cosine ranking of these vectors differs: the distance really matters here
    qn, dn = q / np.linalg.norm(q, axis=1, keepdims=True), db / np.linalg.norm(db, axis=1, keepdims=True)
    cos_top = np.argsort(-(qn @ dn.T), axis=1, kind="stable")[:, :5]
    assert not np.array_equal(cos_top[1:], idx[1:])


def test_tie_diagnostics_flags_collapsed_features(tmp_path):
    from cbmir.evaluation.report import tie_diagnostics

    scores = np.tile(np.array([0.9, 0.8, 0.7, 0.6, 0.5], dtype=np.float32), (10, 1))
    scores[:6] = 1.0  # 6 of 10 queries: all five scores tie (collapsed features)
    (tmp_path / "pq").mkdir()
    np.savez(tmp_path / "pq" / "c.npz", query_indices=np.arange(10), query_labels=np.zeros(10, np.int64),
             topk_indices=np.tile(np.arange(5), (10, 1)), topk_labels=np.zeros((10, 5), np.int64),
             topk_scores=scores, k=np.int64(5))
    row = _row("adrenalmnist3d", 28, "resnet50", 74.8, random_init=True, is_3d=True)
    row["per_query_file"] = "pq/c.npz"
    t = tie_diagnostics(prepare_results(pd.DataFrame([row])), tmp_path)
    assert t[["Model", "tied top-k %"]].values.tolist() == [["ResNet50 RANDOM-INIT", 60.0]]
    assert tie_diagnostics(prepare_results(pd.DataFrame([row])), tmp_path, threshold=70.0).empty

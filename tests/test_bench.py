"""`cbmir bench` end to end at toy sizes: every section runs, figures are consistent, target lines print."""

from __future__ import annotations

import json
import re

import numpy as np

from cbmir.benchmarks import bench


def test_bench_toy_run_prints_target_lines(tmp_path, monkeypatch, capsys):
    toy = dict(n_db=700, n_q=60, dim=48, n_train=40, n_val=2, n_test=3, image_size=224, loop_queries=2, reps=1)
    monkeypatch.setattr(bench, "QUICK", toy)
    out_json = tmp_path / "b.json"
    res = bench.run_bench(quick=True, work_dir=tmp_path, json_out=out_json)
    text = capsys.readouterr().out
    for name in ("search_store_vs_raw_edge", "blas_vs_faiss"):
        assert re.search(rf"^{name} ratio=\d+\.\d\d target=\d\.\d\d (PASS|FAIL)$", text, re.M), text
    assert re.search(r"^ingest_rss_gb value=\d+\.\d\d target=3\.00 (PASS|FAIL)$", text, re.M), text
    assert res["search"]["same_topk_as_raw"] == 1.0  # the store and the raw engine agree (no ties here)
    assert res["blas"]["identical_to_store"] is True
    assert res["ingest"]["images"] == 40 and res["ingest"]["stored"] == 40
    assert 0.05 < res["ingest"]["peak_rss_gb"] < 3.0
    assert json.loads(out_json.read_text())["targets"]["ingest_rss_gb"][1] == 3.0
    assert list(tmp_path.glob("cbmir-bench-*")) == []  # synthetic files removed


def test_study_loop_is_the_published_ranking():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    q = rng.standard_normal((4, 6)).astype(np.float32)
    ref = np.argsort(((q[:, None, :] - x[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(bench.study_loop(q, x, 5), ref)

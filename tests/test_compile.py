"""``--torch-compile``: the CNN forward pass through ``torch.compile`` gives the eager features (fp32 rounding)
across passes of different sizes, and is recorded per embedded split in the collection metadata and in the grid's
timing note; other families ignore it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
from cbmir.ingest.extractors import create_extractor


def test_compiled_features_equal_eager_ones_across_passes_of_different_sizes():
    """70 images in passes of 64 (``batch_size`` 4 at 32 px), then 6 (a recompile with a dynamic batch dimension),
    then 3: the compiled features match eager ones to fp32 rounding, row by row."""
    images = np.random.default_rng(0).integers(0, 256, size=(70, 28, 28, 3), dtype=np.uint8)
    eager = create_extractor("efficientnet_lite0", random_init=True, device="cpu", batch_size=4)
    compiled = create_extractor("efficientnet_lite0", random_init=True, device="cpu", batch_size=4,
                                torch_compile=True)
    assert compiled.torch_compile and not eager.torch_compile and compiled.forward_batch(32, 32) == 64
    a, b = eager.extract(images), compiled.extract(images)
    assert b.shape == a.shape == (70, 1280) and b.dtype == np.float32
    np.testing.assert_allclose(compiled.extract(images[:3]), a[:3], rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    assert not np.allclose(b[1:], b[:-1])  # rows are distinct images, not one repeated row


def test_other_families_ignore_torch_compile():
    hog = create_extractor("hog", torch_compile=True)
    assert not getattr(hog, "torch_compile", False)


def test_settings_and_grid_read_the_flag(monkeypatch):
    from cbmir.app import load_settings
    from cbmir.grid import GridConfig

    assert load_settings().torch_compile is False
    monkeypatch.setenv("CBMIR_TORCH_COMPILE", "1")
    assert load_settings().torch_compile is True
    assert GridConfig(datasets=["breastmnist"], models=["hog"], torch_compile=True).torch_compile is True
    for bad in ("yes", 2):
        with pytest.raises(CbmirError, match=f"torch_compile must be true or false, got {bad!r}"):
            GridConfig(datasets=["breastmnist"], models=["hog"], torch_compile=bad)


def test_benchmark_records_torch_compile_and_matches_the_eager_run(data_dir, tmp_path):
    """``cbmir benchmark --torch-compile``: the collection records it, the row's timing note says so, and the metrics
    equal those of an eager ``cbmir run --no-torch-compile`` of the same cell (same features to fp32 rounding)."""
    from typer.testing import CliRunner

    from cbmir.cli import app
    from cbmir.evaluation.results import read_results
    from cbmir.grid.cell import COMPILED_NOTE
    from cbmir.search.edge_store import EdgeStore

    env = {"CBMIR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    common = ["-m", "efficientnet_lite0", "--random-init", "--precision", "fp32", "--threads", "1",
              "--batch-size", "8"]
    table = tmp_path / "grid" / "results.csv"
    res = CliRunner().invoke(app, ["benchmark", "--datasets", "breastmnist", *common[2:], "--models",
                                   "efficientnet_lite0", "--torch-compile", "--results", str(table),
                                   "--store-path", str(tmp_path / "compiled"), "--no-progress"], env=env)
    assert res.exit_code == 0, res.output
    row = read_results(table).iloc[0]
    assert row["status"] == "ok" and row["precision"] == "fp32"
    assert row["timing_note"] == f"train, test: {COMPILED_NOTE}"
    compiled = EdgeStore(tmp_path / "compiled").meta(row["collection"]).extra
    assert all(compiled["ingest_timings"][sp]["torch_compile"] is True for sp in ("train", "test"))

    o = tmp_path / "eager.json"
    res = CliRunner().invoke(app, ["run", "-d", "breastmnist", *common, "--no-torch-compile", "--store-path",
                                   str(tmp_path / "eager"), "-o", str(o)], env=env)
    assert res.exit_code == 0, res.output
    result = json.loads(o.read_text())
    eager = EdgeStore(tmp_path / "eager").meta(result["collection"]).extra
    assert eager["precision"] == "fp32" and not any("torch_compile" in t for t in eager["ingest_timings"].values())
    assert {k: v for k, v in compiled.items() if k != "ingest_timings"} == \
        {k: v for k, v in eager.items() if k != "ingest_timings"}
    for name, value in result["metrics"].items():
        assert row[name] == pytest.approx(100.0 * value, abs=0.65), name  # one query of 156 at most


def test_compile_speed_benchmark_prints_both_modes(data_dir, capsys):
    from cbmir.benchmarks.compile_speed import main

    out = main(["--images", "10", "--input-size", "native", "--batch-size", "4", "--repeats", "1",
                "--data-dir", str(data_dir), "--threads", "1"])
    text = capsys.readouterr().out
    assert out["images"] == 10 and out["eager_images_per_s"] > 0 and out["compiled_images_per_s"] > 0
    assert out["max_abs_diff"] <= 1e-4 * out["max_abs_feature"]
    assert "eager" in text and "compiled" in text and "speed-up" in text


def test_a_compiler_failure_names_the_model_and_the_fix(monkeypatch):
    """Where TorchInductor cannot build (e.g. no C++ compiler), extraction fails with one message naming the model
    and ``--torch-compile``, not a compiler traceback."""
    import torch

    def broken_compile(fn, **_kw):
        def run(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    ext = create_extractor("efficientnet_lite0", random_init=True, device="cpu", torch_compile=True)
    images = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    with pytest.raises(CbmirError, match=r"torch.compile failed for efficientnet_lite0: RuntimeError: "
                                         r"InvalidCxxCompiler: No working C\+\+ compiler found; run without "
                                         r"--torch-compile"):
        ext.extract(images)

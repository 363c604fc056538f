"""``--precision auto|fp32|bf16``: the forward-pass precision of the torch extractors, checked against the fp32
features, recorded in the collection metadata, the CLI's settings and the grid's results column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
from cbmir.ingest.extractors import create_extractor
from cbmir.ingest.extractors.precision import PRECISIONS, autocast_dtype, precision_label


def test_autocast_dtype_per_device_and_precision():
    import torch

    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert [precision_label(d) for d in (None, torch.bfloat16, torch.float16)] == \
        ["fp32", "bf16-autocast", "fp16-autocast"]
    assert PRECISIONS == ("auto", "fp32", "bf16")
    for bad in ("fp16", "BF16", ""):
        with pytest.raises(CbmirError, match="--precision / CBMIR_PRECISION.*auto, fp32, bf16"):
            autocast_dtype(cpu, bad)
        with pytest.raises(CbmirError, match="--precision"):
            create_extractor("hog", precision=bad)


def test_strict_fp32_turns_tf32_off_and_restores_it():
    import torch

    from cbmir.ingest.extractors.precision import autocast, strict_fp32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with strict_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with autocast(torch.device("cpu"), None):  # the CPU has no TF32: nothing changes
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bf16_features_are_close_to_fp32_but_not_equal():
    """bf16 autocast really runs (features differ from fp32), keeps the fp32 output dtype and stays within
    bf16's rounding of the fp32 features (cosine > 0.99); ``auto`` on the CPU is fp32, bit for bit."""
    images = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28, 3), dtype=np.uint8)
    out = {}
    for p in PRECISIONS:
        ext = create_extractor("efficientnet_lite0", random_init=True, device="cpu", precision=p)
        out[p] = (ext.precision, ext.extract(images))
    assert [out[p][0] for p in PRECISIONS] == ["fp32", "fp32", "bf16-autocast"]
    fp32, bf16 = out["fp32"][1], out["bf16"][1]
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape == (6, 1280)
    np.testing.assert_array_equal(out["auto"][1], fp32)
    assert not np.array_equal(bf16, fp32)
    assert _cos(fp32, bf16).min() > 0.99


def test_settings_refuse_an_unknown_precision():
    from cbmir.app import load_settings

    assert load_settings().precision == "auto" and load_settings(precision="bf16").precision == "bf16"
    with pytest.raises(CbmirError, match="--precision / CBMIR_PRECISION value 'half'.*auto.*fp32.*bf16"):
        load_settings(precision="half")


def test_collection_and_results_row_record_the_precision(data_dir, tmp_path):
    """The grid in bf16: the collection records ``bf16-autocast``, the table's ``precision`` column shows it, and
    HOG (no torch forward pass) records none; the CLI flag reaches the same settings."""
    from typer.testing import CliRunner

    from cbmir.cli import app
    from cbmir.evaluation.results import read_results
    from cbmir.grid import GridConfig, run_grid
    from cbmir.search.edge_store import EdgeStore

    cfg = GridConfig(datasets=["breastmnist"], models=["hog", "efficientnet_lite0"], random_init=True,
                     precision="bf16", results=tmp_path / "r" / "results.csv", store_path=tmp_path / "store",
                     data_dir=data_dir, progress=False, threads=1)
    run_grid(cfg)
    df = read_results(cfg.results).set_index("model")
    assert df.loc["efficientnet_lite0", "precision"] == "bf16-autocast"
    assert df.loc["hog", "precision"] in ("", None) or df.loc["hog", "precision"] != df.loc["hog", "precision"]
    store = EdgeStore(tmp_path / "store")
    meta = store.meta(df.loc["efficientnet_lite0", "collection"])
    assert meta.extra["precision"] == "bf16-autocast"
    assert "precision" not in store.meta(df.loc["hog", "collection"]).extra

    env = {"CBMIR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    args = ["run", "-d", "breastmnist", "-m", "efficientnet_lite0", "--random-init", "--precision", "fp32",
            "--store-path", str(tmp_path / "s2"), "-o", str(tmp_path / "o.json"), "--threads", "1"]
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 0, res.output
    name = json.loads((tmp_path / "o.json").read_text())["collection"]
    assert EdgeStore(tmp_path / "s2").meta(name).extra["precision"] == "fp32"
    bad = CliRunner().invoke(app, [*args[:-4], "--precision", "fp8"], env=env)
    assert bad.exit_code != 0 and "--precision" in str(bad.exception or bad.output)

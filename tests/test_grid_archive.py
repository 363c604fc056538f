"""The benchmark grid and ``cbmir run`` share the application layer: a grid over a user folder archive runs
its cell (status ok) with the same metrics as ``cbmir run`` on that folder, and — the PNGs being lossless —
the same as the MedMNIST file they were written from (DESIGN.md §3: HOG on BreastMNIST 28)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

METRICS = ("mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5")


@pytest.fixture(scope="module")
def breast_folder(tmp_path_factory, data_dir):
    """BreastMNIST 28 written out as ``train/<class>/*.png`` and ``test/<class>/*.png``."""
    from cbmir.ingest.medmnist_data import open_medmnist

    src = open_medmnist("breastmnist", 28, data_dir)
    root = tmp_path_factory.mktemp("archive") / "breastfolder"
    for split in ("train", "test"):
        for batch in src.iter_batches(split, 256):
            for img, label, idx in zip(batch.images, batch.labels, batch.indices):
                d = root / split / f"class{int(label)}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[..., 0]).save(d / f"{int(idx):04d}.png")
    return root


def _cli(*args):
    from typer.testing import CliRunner

    from cbmir.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_grid_over_a_folder_archive_equals_run(breast_folder, tmp_path):
    out = tmp_path / "run.json"
    _cli("run", "-d", breast_folder, "-s", 28, "-m", "hog", "--store-path", tmp_path / "s1", "-o", out)
    run = json.loads(out.read_text())
    results = tmp_path / "grid" / "results.csv"
    _cli("benchmark", "--datasets", str(breast_folder), "--models", "hog", "--sizes", "28",
         "--store-path", tmp_path / "s2", "--results", results, "--no-progress")
    row = pd.read_csv(results).iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["collection"] == run["collection"] == "breastfolder_28_hog"
    for m in METRICS:
        assert row[m] == pytest.approx(100 * run["metrics"][m], abs=1e-9), m
    # the study's reference for HOG on BreastMNIST 28 (DESIGN.md §3), from lossless PNGs of the same pixels
    assert [round(100 * run["metrics"][m], 2) for m in METRICS] == [84.53, 73.08, 80.13, 92.95, 96.15]

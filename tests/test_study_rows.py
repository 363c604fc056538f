"""Issue 18: our rows beside the study's published rows for the same datasets and sizes."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd

from cbmir.evaluation.report import prepare_results
from cbmir.evaluation.report.study_rows import MAJORITY, side_by_side


def _published(dataset: str, size: int, model: str, metric: str) -> float:
    """The value in the shipped supplementary table, read with the csv module (independent of pandas code)."""
    from importlib.resources import files

    with files("cbmir.evaluation").joinpath("data/paper_results.csv").open() as fh:
        for r in csv.DictReader(fh):
            if (r["dataset"], int(r["size"]), r["model"]) == (dataset, size, model):
                return float(r[metric])
    return float("nan")


def test_side_by_side_puts_the_study_rows_of_the_same_cells_beside_ours():
    rows = [
        {"dataset": "breastmnist", "size": 28, "model": "hog", "ACC@1": 80.13, "majority_class_rate": 73.08},
        {"dataset": "breastmnist", "size": 28, "model": "efficientnet_lite0", "input_size": "224", "ACC@1": 83.33,
         "majority_class_rate": 73.08},
        {"dataset": "vesselmnist3d", "size": 28, "model": "hog", "ACC@1": 91.1, "majority_class_rate": 88.74},
        {"dataset": "adrenalmnist3d", "size": 64, "model": "hog", "ACC@1": 74.16, "majority_class_rate": 76.85},
        {"dataset": "breastmnist", "size": 28, "model": "hog", "ACC@1": 1.0, "majority_class_rate": 73.08,
         "distance": "euclidean"},
    ]
    rows = [{"distance": "cosine", **r} for r in rows]
    t = side_by_side(prepare_results(pd.DataFrame(rows)), "cosine", "ACC@1").set_index("Model")
    assert list(t.columns) == ["BreastMNIST 28", "AdrenalMNIST3D 64", "VesselMNIST3D 28"]
    assert list(t.index[:3]) == [MAJORITY, "HOG (handcrafted baseline)", "EfficientNet-Lite0 [input 224]"]
    assert t.loc[MAJORITY].tolist() == [73.08, 76.85, 88.74]
    assert t.loc["HOG (handcrafted baseline)", "BreastMNIST 28"] == 80.13  # the cosine row, not the euclidean
    assert np.isnan(t.loc["EfficientNet-Lite0 [input 224]", "VesselMNIST3D 28"])
    for model in ("DenseNet121", "UNI", "OpenCLIP"):
        assert t.loc[f"study: {model}", "BreastMNIST 28"] == _published("BreastMNIST", 28, model, "ACC@1")
        assert t.loc[f"study: {model}", "AdrenalMNIST3D 64"] == _published("AdrenalMNIST3D", 64, model, "ACC@1")
        assert np.isnan(t.loc[f"study: {model}", "VesselMNIST3D 28"])  # not in the study
    assert len(t) == 3 + 9
    assert side_by_side(prepare_results(pd.DataFrame(rows)), "euclidean", "ACC@1").shape == (1 + 1 + 9, 2)

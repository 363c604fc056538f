"""Tests of cbmir.evaluation.reference: the published table and the tables derived from it."""

import csv
import importlib.resources
import io
from pathlib import Path

import pandas as pd
import pytest

from cbmir.evaluation.reference import (
    DATASETS_2D,
    DATASETS_3D,
    METRICS,
    PRINTED_TABLE_VALUES,
    load_published,
    published_averages,
    size_robustness,
    table_disagreements,
)

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "paper_results.csv"


def _raw_rows():
    """The packaged CSV read with the csv module only (independent of pandas)."""
    text = (importlib.resources.files("evaluation") / "data" / "paper_results.csv").read_text(
        encoding="utf-8"
    )
    return list(csv.DictReader(io.StringIO(text)))


def _hand_mean(rows, datasets, model, metric):
    values = [float(r[metric]) for r in rows if r["dataset"] in datasets and r["model"] == model]
    total = 0.0
    for v in values:
        total += v
    return total / len(values), len(values)


# --------------------------------------------------------------------------- #
# the packaged table
# --------------------------------------------------------------------------- #
def test_packaged_table_shape_and_known_cells():
    df = load_published()
    assert list(df.columns) == ["dataset", "size", "model", *METRICS]
    assert len(df) == 251
    assert set(df["dataset"]) == set(DATASETS_2D) | set(DATASETS_3D)
    # BreastMNIST 64 px has no MedCLIP row in the source
    b64 = df[(df.dataset == "BreastMNIST") & (df["size"] == 64)]
    assert len(b64) == 8 and "MedCLIP" not in set(b64.model)
    # the cell printed "1.00" in Table S4 is stored as 100.0
    cell = df[(df.dataset == "BreastMNIST") & (df["size"] == 224) & (df.model == "VGG19")]
    assert cell["ACC@5"].item() == 100.0
    # first row of Table S1, as printed
    first = df.iloc[0]
    assert (first.dataset, first["size"], first.model, first["ACC@1"]) == (
        "BreastMNIST", 28, "VGG19", 79.48,
    )


def test_load_published_returns_a_copy():
    df = load_published()
    df.loc[0, "ACC@1"] = -1.0
    assert load_published().loc[0, "ACC@1"] == 79.48


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="shared reference not present")
def test_packaged_table_is_unchanged_copy_of_shared():
    packaged = (importlib.resources.files("evaluation") / "data" / "paper_results.csv").read_bytes()
    assert packaged == SHARED_CSV.read_bytes()


# --------------------------------------------------------------------------- #
# published_averages (Tables 3 and 4)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("model", ["VGG19", "UNI", "MedCLIP", "BiomedCLIP"])
@pytest.mark.parametrize("metric", ["mAP@5", "ACC@1", "ACC@5"])
def test_2d_averages_match_hand_computation(model, metric):
    expected, n = _hand_mean(_raw_rows(), set(DATASETS_2D), model, metric)
    got = published_averages("2d")
    assert got.at[model, metric] == pytest.approx(expected, abs=1e-9)
    assert got.at[model, "n_rows"] == n
    assert n == (23 if model == "MedCLIP" else 24)


@pytest.mark.parametrize("model", ["VGG19", "CONCH", "EfficientNetV2M"])
@pytest.mark.parametrize("metric", METRICS)
def test_3d_averages_match_hand_computation(model, metric):
    expected, n = _hand_mean(_raw_rows(), set(DATASETS_3D), model, metric)
    got = published_averages("3D")
    assert n == 4
    assert got.at[model, metric] == pytest.approx(expected, abs=1e-9)


def test_averages_cover_all_nine_models():
    for kind in ("2d", "3d"):
        avg = published_averages(kind)
        assert len(avg) == 9
        assert list(avg.columns) == [*METRICS, "n_rows"]


def test_averages_on_a_tiny_hand_made_table():
    # two 2D datasets x two sizes for model M, plus a 3D row and an unrelated
    # dataset that must be ignored; lower-case names as in cbmir's results.
    df = pd.DataFrame(
        [
            ("breastmnist", 28, "M", 10.0, 20.0, 30.0, 40.0, 50.0),
            ("breastmnist", 64, "M", 20.0, 20.0, 30.0, 40.0, 50.0),
            ("PathMNIST", 28, "M", 30.0, 20.0, 30.0, 40.0, 50.0),
            ("PathMNIST", 64, "M", 60.0, 20.0, 30.0, 40.0, 90.0),
            ("AdrenalMNIST3D", 28, "M", 99.0, 99.0, 99.0, 99.0, 99.0),
            ("SomethingElse", 28, "M", 0.0, 0.0, 0.0, 0.0, 0.0),
        ],
        columns=["dataset", "size", "model", *METRICS],
    )
    avg2 = published_averages("2d", df=df)
    assert avg2.at["M", "mAP@5"] == pytest.approx((10 + 20 + 30 + 60) / 4)  # 30
    assert avg2.at["M", "ACC@5"] == pytest.approx((50 * 3 + 90) / 4)  # 60
    assert avg2.at["M", "n_rows"] == 4
    avg3 = published_averages("3d", df=df)
    assert avg3.at["M", "mAP@5"] == 99.0 and avg3.at["M", "n_rows"] == 1


def test_averages_reject_bad_kind_and_columns():
    with pytest.raises(ValueError):
        published_averages("4d")
    with pytest.raises(ValueError):
        published_averages("2d", df=pd.DataFrame({"dataset": [], "model": []}))


# --------------------------------------------------------------------------- #
# table_disagreements
# --------------------------------------------------------------------------- #
def test_vgg19_acc5_disagreement_is_found():
    expected, n = _hand_mean(_raw_rows(), set(DATASETS_2D), "VGG19", "ACC@5")
    assert n == 24
    assert round(expected, 2) == 91.52  # the rows' average, not the printed 87.39
    dis = table_disagreements()
    assert len(dis) == 1
    row = dis.iloc[0]
    assert (row.table, row.model, row.metric) == ("Table 3", "VGG19", "ACC@5")
    assert row.printed == 87.39
    assert row.recomputed == pytest.approx(expected, abs=1e-9)
    assert row.difference == pytest.approx(87.39 - expected, abs=1e-9)


def test_disagreement_tolerance_and_custom_printed_values():
    # a tolerance above the 4.13-point gap hides it
    assert table_disagreements(tol=5.0).empty
    # printed values that equal the recomputation (rounded to 2 decimals) pass
    avg4 = published_averages("3d")
    ok = {("Table 4", m, "ACC@1"): round(avg4.at[m, "ACC@1"], 2) for m in avg4.index}
    assert table_disagreements(printed=ok).empty
    # an off-by-0.1 value is caught; an unknown model is reported with NaN
    bad = {("Table 4", "UNI", "ACC@1"): round(avg4.at["UNI", "ACC@1"], 2) + 0.1,
           ("Table 3", "NoSuchModel", "ACC@1"): 50.0}
    dis = table_disagreements(printed=bad)
    assert list(dis.model) == ["UNI", "NoSuchModel"]
    assert dis.recomputed.isna().tolist() == [False, True]
    with pytest.raises(ValueError):
        table_disagreements(printed={("Table 9", "UNI", "ACC@1"): 1.0})
    with pytest.raises(ValueError):
        table_disagreements(tol=-1)


def test_printed_values_are_sourced_only():
    assert PRINTED_TABLE_VALUES == {("Table 3", "VGG19", "ACC@5"): 87.39}


# --------------------------------------------------------------------------- #
# size_robustness (Table 5)
# --------------------------------------------------------------------------- #
def test_size_robustness_on_a_tiny_hand_made_table():
    df = pd.DataFrame(
        {
            "dataset": ["A", "A", "A", "A", "B"],
            "size": [28, 64, 128, 28, 28],
            "model": ["M", "M", "M", "N", "M"],
            "ACC@1": [70.0, 75.5, 72.0, 60.0, 80.0],
        }
    )
    out = size_robustness(df)
    assert list(out[["dataset", "model"]].itertuples(index=False, name=None)) == [
        ("A", "M"), ("A", "N"), ("B", "M"),
    ]
    am = out.iloc[0]
    assert (am.n_sizes, am["min"], am["max"], am["range"]) == (3, 70.0, 75.5, 5.5)
    assert (am.size_at_min, am.size_at_max) == (28, 64)
    assert out.iloc[1]["range"] == 0.0 and out.iloc[1].n_sizes == 1


def test_size_robustness_on_published_table():
    rows = _raw_rows()
    vals = [float(r["ACC@1"]) for r in rows if r["dataset"] == "BreastMNIST" and r["model"] == "VGG19"]
    assert len(vals) == 4
    out = size_robustness()
    assert len(out) == 8 * 9  # every (dataset, model) pair
    row = out[(out.dataset == "BreastMNIST") & (out.model == "VGG19")].iloc[0]
    assert row["range"] == pytest.approx(max(vals) - min(vals))
    medclip = out[(out.dataset == "BreastMNIST") & (out.model == "MedCLIP")].iloc[0]
    assert medclip.n_sizes == 3
    assert set(out[out.dataset.isin(DATASETS_3D)].n_sizes) == {2}


def test_size_robustness_other_metric_and_errors():
    df = pd.DataFrame({"dataset": ["A", "A"], "size": [28, 64], "model": ["M", "M"],
                       "mAP@5": [50.0, 41.0]})
    assert size_robustness(df, metric="mAP@5").iloc[0]["range"] == 9.0
    with pytest.raises(ValueError):
        size_robustness(df)  # no ACC@1 column
    dup = pd.DataFrame({"dataset": ["A", "A"], "size": [28, 28], "model": ["M", "M"],
                        "ACC@1": [1.0, 2.0]})
    with pytest.raises(ValueError):
        size_robustness(dup)

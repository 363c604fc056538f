"""Extractor registry, the four timm CNNs (random init, local weights, hub path), and HOG."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec
from cbmir.ingest.extractors import (
    create_extractor,
    get_spec,
    list_specs,
    register,
    registry,
    timm_cnn,
    weights,
)
from cbmir.ingest.transforms import to_rgb

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CBMIR_TEST_DATA_DIR", REPO.parent / "shared" / "data" / "medmnist"))
CNN_DIMS = {"vgg19": 512, "resnet50": 2048, "densenet121": 1024, "efficientnetv2m": 1280}

rng = np.random.default_rng(3)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny inputs: one intra-op thread is faster, and robust to a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, size: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every float parameter away from the seeded default random init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


def _real(file: str) -> Path:
    path = DATA_DIR / file
    if not path.is_file():
        pytest.skip(f"real MedMNIST file {path} not available (set CBMIR_TEST_DATA_DIR)")
    return path


# ----------------------------------------------------------------------------- registry
def test_registry_lists_entries_and_unknown_name_lists_valid_names():
    names = [s.name for s in list_specs()]
    assert set(CNN_DIMS) | {"hog"} <= set(names)
    for name, dim in CNN_DIMS.items():
        spec = get_spec(name)
        assert spec.dim == dim and spec.family == "imagenet-cnn" and "torch" in spec.backends
    assert get_spec("HOG").family == "handcrafted" and get_spec("hog").dim == 1296
    assert "hog" in [s.name for s in list_specs("handcrafted")]
    assert all(s.family == "handcrafted" for s in list_specs("handcrafted"))
    with pytest.raises(CbmirError) as info:
        get_spec("resnet5O")
    for name in names:
        assert name in str(info.value)
    with pytest.raises(CbmirError, match="valid models"):
        create_extractor("no-such-model")


def test_factory_argument_errors(monkeypatch):
    with pytest.raises(CbmirError, match="either"):
        create_extractor("resnet50", weights="x.pth", random_init=True)
    with pytest.raises(CbmirError, match="backend"):
        create_extractor("hog", backend="torch")
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))  # noqa: SLF001 - undone after the test
    register(ExtractorSpec("hogjax", "handcrafted", 1296, "", "none", backends=("jax",),
                           builder="no-such-builder"))
    with pytest.raises(CbmirError, match="no 'jax' builder"):
        create_extractor("hogjax")
    with pytest.raises(CbmirError, match="batch_size"):
        create_extractor("hog", batch_size=0)
    with pytest.raises(CbmirError, match="no weights"):
        create_extractor("hog", weights="x.pth")


def test_adding_a_model_is_one_entry(monkeypatch):
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))  # noqa: SLF001 - undone after the test
    spec = register(
        ExtractorSpec(
            name="hog8x8", family="handcrafted", dim=144, input_policy="own size",
            weights_source="none", backends=("numpy",), builder="hog",
            options={"pixels_per_cell": (8, 8)},
        )
    )
    ext = create_extractor("hog8x8")  # 28 px: 3 x 3 cells of 8 px -> 2 x 2 blocks x 36 = 144
    assert ext.spec is spec and ext.extract(_images(2, 28)).shape == (2, 144)
    with pytest.raises(ValueError):
        register(ExtractorSpec("hog8x8", "handcrafted", 1, "", "none", builder="hog"))


# ----------------------------------------------------------------------------- CNNs
@pytest.mark.parametrize("name", list(CNN_DIMS))
def test_cnn_dims_and_weights_file_round_trip(name, tmp_path):
    """Random init gives the paper's dims at 28 (-> 32), 32 and 224 px; a state dict saved with
    torch.save and loaded with create_extractor(weights=path) reproduces features exactly."""
    dim = CNN_DIMS[name]
    src = create_extractor(name, random_init=True, device="cpu", batch_size=2)
    small = _images(3, 28, 1)  # grayscale, upsampled to 32 px inside
    before = src.extract(small)
    one32, one224 = src.extract(_images(1, 32)), src.extract(_images(1, 224))
    for feats, n in ((before, 3), (one32, 1), (one224, 1)):
        assert feats.shape == (n, dim) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert src.extract(_images(0, 32)).shape == (0, dim)
    ident = src.identity()
    assert ident["dim"] == dim == src.dim_for(28) == src.dim_for(224)
    assert ident["weights"] == "random-init" and ident["random_init"] is True
    assert ident["model"] == name and ident["backend"] == "torch"

    _perturb(src.model, seed=11)  # so that a silently ignored file would be noticed
    after = src.extract(small)
    assert not np.allclose(after, before)
    path = tmp_path / f"{name}.pth"
    torch.save(src.model.state_dict(), path)
    loaded = create_extractor(name, weights=str(path), device="cpu", batch_size=2)
    np.testing.assert_array_equal(loaded.extract(small), after)
    ident = loaded.identity()
    assert ident["weights"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert ident["random_init"] is False and ident["dim"] == dim


def test_cnn_pipeline_matches_manual_preprocessing():
    """28 px gray -> RGB -> bicubic 32 px (PIL) -> /255 -> mean/std -> conv features -> GAP."""
    from PIL import Image

    ext = create_extractor("resnet50", random_init=True, device="cpu")
    imgs = _images(2, 28, 1)
    feats = ext.extract(imgs)
    up = np.stack([
        np.asarray(
            Image.fromarray(im[..., 0].astype(np.float32), mode="F").resize((32, 32), Image.BICUBIC)
        )
        for im in imgs
    ])
    x = np.clip(np.repeat(up[..., None], 3, axis=-1), 0, 255) / 255.0
    x = (x - np.array(ext.mean)) / np.array(ext.std)
    with torch.inference_mode():
        fmap = ext.model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    ref = fmap.mean(dim=(2, 3)).numpy()
    # float32 summation-order differences scale with the features (random-init values reach ~30)
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_cnn_safetensors_and_bad_weight_files(tmp_path):
    from safetensors.torch import save_file

    src = create_extractor("densenet121", random_init=True, device="cpu")
    _perturb(src.model, seed=5)
    st = tmp_path / "d.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(st))
    imgs = _images(2, 28, 1)
    np.testing.assert_array_equal(
        create_extractor("densenet121", weights=st).extract(imgs), src.extract(imgs)
    )
    with pytest.raises(CbmirError, match="do not fit"):
        create_extractor("resnet50", weights=st)  # densenet weights for a resnet
    with pytest.raises(CbmirError, match="not found"):
        create_extractor("resnet50", weights=tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Path("/")}, evil)  # not a pure tensor dict
    with pytest.raises(CbmirError, match="evil.pth"):
        create_extractor("resnet50", weights=evil)


def test_cnn_hub_path_loads_full_checkpoint(tmp_path, monkeypatch):
    """The hub file is a full timm checkpoint (classifier included); the head is dropped."""
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("resnet50.tv_in1k", pretrained=False).eval()
    _perturb(full, seed=23)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    asked = []
    monkeypatch.setattr(
        timm_cnn, "fetch_hub_file", lambda hub_id, model: asked.append(hub_id) or path
    )
    ext = create_extractor("resnet50", device="cpu")
    assert asked == ["timm/resnet50.tv_in1k"]
    # a file outside the HF cache's snapshots/<revision>/ layout is identified by its content
    assert ext.identity()["weights"] == f"hf-hub:timm/resnet50.tv_in1k@sha256:{weights.sha256_file(path)}"
    assert "state_dict" not in ext.model.pretrained_cfg
    imgs = _images(2, 32)
    x = (imgs / 255.0 - np.array(ext.mean)) / np.array(ext.std)
    with torch.inference_mode():
        expect = full.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    np.testing.assert_allclose(
        ext.extract(imgs), expect.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5
    )


def test_offline_hub_error_is_fast_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "hub_cache_dir", lambda: str(tmp_path))  # empty HF cache
    t0 = time.monotonic()
    with pytest.raises(CbmirError) as info:
        create_extractor("efficientnetv2m", device="cpu")
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "efficientnetv2m" in msg and "--weights" in msg and "--random-init" in msg
    assert "timm/tf_efficientnetv2_m.in1k" in msg


def test_unreachable_hub_is_detected_in_seconds(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://192.0.2.1")  # TEST-NET-1: no answer
    monkeypatch.setattr(weights, "hub_cache_dir", lambda: str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(CbmirError, match="resnet50.*--weights"):
        create_extractor("resnet50", device="cpu")
    assert time.monotonic() - t0 < 10
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hf_constants.HF_HUB_OFFLINE is True


# ----------------------------------------------------------------------------- HOG
def test_hog_on_breastmnist_equals_skimage():
    from skimage.color import rgb2gray
    from skimage.feature import hog

    path = _real("breastmnist.npz")
    with np.load(path) as npz:
        gray = npz["test_images"][:40]
    rgb = to_rgb(gray[..., None])
    ext = create_extractor("hog")
    feats = ext.extract(rgb)
    assert feats.shape == (40, 1296) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    for i in range(len(rgb)):
        v = hog(rgb2gray(rgb[i]), orientations=9, pixels_per_cell=(4, 4),
                cells_per_block=(2, 2), block_norm="L2-Hys")
        np.testing.assert_allclose(feats[i], v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ext.extract(gray[..., None]), feats, atol=1e-5)  # 1-channel input
    assert ext.identity()["dim"] == 1296 and ext.identity()["weights"] == "none"


def test_hog_on_rgb_retina_and_other_sizes():
    from skimage.feature import hog

    path = _real("retinamnist.npz")
    with np.load(path) as npz:
        rgb = npz["test_images"][:5]  # true colour: exercises the default channel-mean gray
    feats = create_extractor("hog").extract(rgb)
    for i in range(len(rgb)):
        gray = rgb[i].astype(np.float64).mean(axis=-1) / 255.0
        v = hog(gray, orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2))
        np.testing.assert_allclose(feats[i], v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)

    ext = create_extractor("hog")
    assert [ext.dim_for(s) for s in (28, 32, 64, 128, 224)] == [1296, 1764, 8100, 34596, 108900]
    assert ext.extract(_images(2, 64)).shape == (2, 8100)
    assert ext.identity()["dim"] == 8100  # the size actually seen
    assert ext.identity(size=224)["dim"] == 108900
    zero = ext.extract(np.zeros((1, 28, 28, 3), np.uint8))
    assert zero.shape == (1, 1296) and not zero.any()  # constant image -> zero vector


def _retrieval_metrics(db: np.ndarray, q: np.ndarray, ydb: np.ndarray, yq: np.ndarray) -> list:
    """DESIGN.md §2 on cosine top-5 (ties -> lower database index), in percent:
    mAP@5, mMV@5, ACC@1, ACC@3, ACC@5."""
    sims = q @ db.T  # rows are unit norm: cosine
    top = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    hit = ydb[top] == yq[:, None]
    n_hit = hit.sum(1)
    ap = np.where(n_hit > 0, (hit * np.cumsum(hit, 1) / np.arange(1, 6)).sum(1), 0) / np.maximum(
        n_hit, 1
    )
    votes = [np.bincount(r, minlength=max(yq.max(), ydb.max()) + 1) for r in ydb[top]]
    mv = [v[y] == v.max() for v, y in zip(votes, yq, strict=True)]
    acc = [hit[:, :k].any(1).mean() for k in (1, 3, 5)]
    return [round(100 * float(x), 2) for x in (ap.mean(), np.mean(mv), *acc)]


@pytest.mark.parametrize(
    "file,gray,expected",  # DESIGN.md §3 "Sanity reference (measured here)", HOG column
    [
        ("breastmnist.npz", "rgb2gray", [84.53, 73.08, 80.13, 92.95, 96.15]),
        ("retinamnist.npz", "mean", [52.21, 49.50, 40.75, 65.75, 75.50]),
    ],
)
def test_hog_reproduces_design_sanity_reference(file, gray, expected, monkeypatch):
    """Gray datasets: either conversion. RetinaMNIST (RGB): the reference row was measured with
    the channel-mean gray conversion (the registered default)."""
    from cbmir.ingest.medmnist_data import open_medmnist

    _real(file)
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))  # noqa: SLF001 - undone after the test
    spec = get_spec("hog")
    register(ExtractorSpec(**{**spec.__dict__, "name": "hog-test", "options": {"gray": gray}}))
    ext = create_extractor("hog-test")
    src = open_medmnist(file.split(".")[0], 28, DATA_DIR)

    def embed(split):
        return np.concatenate([ext.extract(to_rgb(b.images)) for b in src.iter_batches(split, 512)])

    got = _retrieval_metrics(embed("train"), embed("test"), src.labels("train"), src.labels("test"))
    assert got == pytest.approx(expected, abs=0.011)

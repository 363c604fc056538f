"""Keras / TensorFlow backend of the four ImageNet CNNs (ingest/extractors/keras_cnn.py).

The study computed its CNN features with ``tf.keras.applications`` (``include_top=False,
pooling='avg'``, each model's ``preprocess_input``, 28 px upsampled to 32). Checks: the study's
dims at 32 and 224 px (random init, offline), deterministic random init, each model's own
preprocessing, a Keras weights file round trip, the fast offline error, and the keras/torch
distinction in identities and collection names. Skipped only when TensorFlow is absent.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("CBMIR_TF_THREADS", "1")  # keep TensorFlow from taking every core in tests

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from PIL import Image  # noqa: E402

from cbmir.core.errors import CbmirError  # noqa: E402
from cbmir.ingest.extractors import create_extractor, get_spec  # noqa: E402
from cbmir.ingest.extractors import keras_cnn  # noqa: E402
from cbmir.ingest.transforms import resize_batch  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Keras-internal np.array(tensor) under NumPy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
CNN_DIMS = {"vgg19": 512, "resnet50": 2048, "densenet121": 1024, "efficientnetv2m": 1280}
_BUILT: dict = {}


def _random(name: str):
    """One random-init Keras extractor per model for the whole module (building is the slow part)."""
    if name not in _BUILT:
        _BUILT[name] = create_extractor(name, random_init=True, backend="keras", device="cpu", batch_size=8)
    return _BUILT[name]


@pytest.fixture(scope="module")
def breast(data_dir) -> np.ndarray:
    """Two real BreastMNIST test images, uint8 (2, 28, 28, 1)."""
    return np.load(data_dir / "breastmnist.npz")["test_images"][:2, ..., None]


@pytest.fixture(scope="module")
def retina(data_dir) -> np.ndarray:
    """Two real RetinaMNIST (RGB) test images, uint8 (2, 28, 28, 3)."""
    return np.load(data_dir / "retinamnist.npz")["test_images"][:2]


@pytest.mark.parametrize("name", list(CNN_DIMS))
def test_study_dims_at_32_and_224(name, breast, retina):
    ext = _random(name)
    dim = CNN_DIMS[name]
    f28 = ext.extract(breast)  # 28 px -> 32 px input
    big = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in retina])
    f224 = ext.extract(big)
    assert f28.shape == (2, dim) and f224.shape == (2, dim)
    assert f28.dtype == np.float32 and np.isfinite(f28).all() and np.isfinite(f224).all()
    assert ext.preprocess(breast).shape == (2, 32, 32, 3)
    ident = ext.identity()
    assert ident["backend"] == "keras" and ident["dim"] == dim and ident["random_init"] is True
    assert "include_top=False, pooling='avg'" in ident["architecture"]


def test_random_init_is_deterministic(breast):
    a = _random("vgg19").extract(breast)
    b = create_extractor("vgg19", random_init=True, backend="keras", device="cpu").extract(breast)
    assert np.array_equal(a, b)


def _upsampled(images: np.ndarray) -> np.ndarray:
    x = np.repeat(images, 3, axis=-1).astype(np.float32) if images.shape[-1] == 1 else images.astype(np.float32)
    return np.clip(resize_batch(x, 32, "bicubic"), 0, 255)


@pytest.mark.parametrize("name", list(CNN_DIMS))
def test_each_model_gets_its_own_preprocess_input(name, retina):
    ext = _random(name)
    x = _upsampled(retina)
    assert np.allclose(resize_batch(retina, 32, "bicubic").astype(np.float32), x, atol=0.51)
    if name in ("vgg19", "resnet50"):  # caffe: RGB -> BGR, minus the ImageNet mean pixel
        want = x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    elif name == "densenet121":  # torch: /255, ImageNet mean / std
        want = (x / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    else:  # EfficientNetV2M: raw 0..255, rescaled inside the model
        want = x
        assert any(type(layer).__name__ == "Rescaling" for layer in ext.model.layers)
    got = ext.preprocess(retina)
    assert np.allclose(got, want, atol=1e-4), float(np.abs(got - want).max())
    feats = ext.extract(retina)  # extract = model(preprocess(images))
    assert np.allclose(feats, np.asarray(ext.model(want, training=False)), atol=1e-4)


def test_weights_file_round_trip(tmp_path, breast):
    ext = _random("vgg19")
    rng = np.random.default_rng(0)
    ext.model.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in ext.model.get_weights()])
    want = ext.extract(breast)
    path = tmp_path / "vgg19.weights.h5"
    ext.model.save_weights(str(path))
    loaded = create_extractor("vgg19", weights=str(path), backend="keras", device="cpu")
    assert np.allclose(loaded.extract(breast), want, atol=1e-5)
    assert loaded.identity()["weights"].startswith("sha256:") and loaded.identity()["random_init"] is False
    _BUILT.pop("vgg19")  # perturbed: later tests rebuild it


def test_bad_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(CbmirError, match="no such file"):
        create_extractor("resnet50", weights=str(tmp_path / "nope.weights.h5"), backend="keras")
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not an h5 file")
    with pytest.raises(CbmirError, match="cannot load --weights"):
        create_extractor("resnet50", weights=str(bad), backend="keras")


def test_offline_imagenet_weights_error_is_fast_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_cnn, "http_reachable", lambda *a, **k: False)
    for name in CNN_DIMS:
        t0 = time.perf_counter()
        with pytest.raises(CbmirError) as info:
            create_extractor(name, backend="keras")
        assert time.perf_counter() - t0 < 5
        msg = str(info.value)
        app = get_spec(name).options["keras_app"]
        assert repr(name) in msg and keras_cnn.KERAS_APPS[app][2] in msg and "--weights PATH" in msg


def test_keras_and_torch_are_distinct(monkeypatch):
    from cbmir.search.schema import collection_name

    assert collection_name("breastmnist", 28, "resnet50", backend="keras") == "breastmnist_28_resnet50_keras"
    assert collection_name("breastmnist", 28, "resnet50", backend="torch") == "breastmnist_28_resnet50"
    assert _random("resnet50").identity()["backend"] == "keras"
    with pytest.raises(CbmirError, match="no backend 'keras'"):
        create_extractor("uni", backend="keras", random_init=True)


def test_missing_tensorflow_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(CbmirError, match=r"cbmir\[keras\]"):
        keras_cnn.import_tf()

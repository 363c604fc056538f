"""Random-init CNNs must give input-dependent features (issue #4: collapsed random-init ResNet50).

timm initialises the last BatchNorm of every ResNet bottleneck with weight 0 (``zero_init_last``,
a training-time trick). Untrained, every residual branch then outputs 0 and the network reduces
to its shortcuts; the strided 1x1 shortcut convs sample one position per stride, so at 32 px the
pooled feature depended only on the top-left 8x8 pixels - background in almost every MedMNIST
slice - and 1,145 of 1,188 AdrenalMNIST3D training volumes got the same vector.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbmir.ingest.volumes import VolumeEmbedder


@pytest.fixture(scope="module")
def resnet50_random():
    from cbmir.ingest.extractors import create_extractor

    return create_extractor("resnet50", random_init=True, device="cpu", batch_size=128)


def test_random_init_resnet50_gives_distinct_vectors_for_distinct_adrenal_volumes(data_dir, resnet50_random):
    from cbmir.ingest.medmnist_data import open_medmnist

    vols = next(open_medmnist("adrenalmnist3d", 28, data_dir).iter_batches("train", 8)).images
    flat = vols.reshape(len(vols), -1)
    assert len(np.unique(flat, axis=0)) == len(vols)  # the volumes themselves are distinct
    v = VolumeEmbedder(resnet50_random, size=28).embed(vols)
    assert v.shape == (8, 65_536) and np.isfinite(v).all()
    assert np.abs(v).max() < 1e4  # activations stay in range (no overflow towards inf)
    u = v.astype(np.float64) / np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True)
    cos = u @ u.T
    off = cos[~np.eye(len(v), dtype=bool)]
    # distinct volumes -> distinct directions, by far more than float32 rounding (the collapsed
    # model gave cosine 1 - 1e-7 for 7 of these 8 volumes)
    assert off.max() < 1 - 1e-4, off.max()


def test_random_init_resnet50_sees_the_whole_slice(resnet50_random):
    """Changing pixels away from the top-left corner must change the feature."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    other = img.copy()
    other[:, 16:, 16:] = 255 - other[:, 16:, 16:]
    f = resnet50_random.extract(np.concatenate([img, other]))
    assert np.abs(f[0] - f[1]).max() > 1e-3 * np.abs(f[0]).max()


def test_random_init_is_reproducible_and_labelled(resnet50_random):
    from cbmir.ingest.extractors import create_extractor

    again = create_extractor("resnet50", random_init=True, device="cpu")
    for (n1, p1), (n2, p2) in zip(resnet50_random.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    ident = resnet50_random.identity()
    assert ident["random_init"] is True and ident["weights"] == "random-init"
    assert "random init" in ident["preprocessing"]


def test_small_inputs_are_packed_into_larger_forward_passes(resnet50_random, monkeypatch):
    """Issue #4 (speed): 32 px slices go through the CNN in passes of 16 x batch_size, same features."""
    ext = resnet50_random
    monkeypatch.setattr(ext, "batch_size", 8)
    assert (ext.forward_batch(224, 224), ext.forward_batch(128, 128), ext.forward_batch(64, 64),
            ext.forward_batch(32, 32)) == (8, 8, 32, 128)
    passes = []
    orig = ext.model.forward_features
    monkeypatch.setattr(ext.model, "forward_features", lambda x: (passes.append(x.shape[0]), orig(x))[1])
    imgs = np.random.default_rng(1).integers(0, 256, (300, 28, 28, 3), dtype=np.uint8)  # upsampled to 32
    f = ext.extract(imgs)
    assert passes == [128, 128, 44]
    monkeypatch.setattr(ext, "batch_size", 1)  # passes of 16
    g = ext.extract(imgs[:20])
    np.testing.assert_allclose(f[:20], g, rtol=1e-4, atol=1e-4 * np.abs(g).max())

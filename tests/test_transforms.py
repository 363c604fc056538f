"""Preprocessing transforms, each on its own (compared with PIL and plain numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cbmir.ingest.transforms import normalize, resize_batch, to_rgb, to_unit_float

rng = np.random.default_rng(7)


def test_to_rgb_replicates_gray_and_keeps_rgb():
    gray = rng.integers(0, 256, (2, 5, 6, 1), dtype=np.uint8)
    rgb = to_rgb(gray)
    assert rgb.shape == (2, 5, 6, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray[..., 0])
    np.testing.assert_array_equal(to_rgb(gray[..., 0]), rgb)  # (B, H, W) accepted
    color = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    assert to_rgb(color) is color
    t = to_rgb(torch.from_numpy(gray))
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), rgb)
    with pytest.raises(ValueError):
        to_rgb(np.zeros((1, 4, 4, 2), np.uint8))


@pytest.mark.parametrize("src,dst", [(28, 32), (64, 28), (28, 224)])
def test_resize_float_matches_pil_bicubic(src, dst):
    imgs = rng.uniform(0, 255, (2, src, src, 3)).astype(np.float32)
    out = resize_batch(imgs, dst)
    assert out.shape == (2, dst, dst, 3) and out.dtype == np.float32
    for b in range(2):
        for c in range(3):
            pil = Image.fromarray(imgs[b, ..., c], mode="F").resize((dst, dst), Image.BICUBIC)
            np.testing.assert_allclose(out[b, ..., c], np.asarray(pil), atol=1e-3)


def test_resize_uint8_matches_pil_and_keeps_dtype():
    # smooth images: PIL clips to uint8 between its two separable passes, torch only at the end,
    # so on pixel noise with strong overshoot the two may differ by more than rounding.
    yy, xx = np.mgrid[0:28, 0:28]
    base = 127 + 120 * np.sin(xx / 4.0) * np.cos(yy / 5.0)
    imgs = np.stack([base, base[::-1], base.T]).round().astype(np.uint8)[..., None]
    out = resize_batch(imgs, 32)
    assert out.dtype == np.uint8 and out.shape == (3, 32, 32, 1)
    for b in range(3):
        pil = np.asarray(Image.fromarray(imgs[b, ..., 0]).resize((32, 32), Image.BICUBIC))
        assert np.abs(out[b, ..., 0].astype(int) - pil.astype(int)).max() <= 1


def test_resize_same_size_torch_and_errors():
    imgs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert resize_batch(imgs, 32) is imgs
    assert resize_batch(imgs.astype(np.float64), 32).dtype == np.float32
    t = resize_batch(torch.from_numpy(imgs).float(), (16, 8))
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == (2, 16, 8, 3)
    np.testing.assert_allclose(t.numpy(), resize_batch(imgs.astype(np.float32), (16, 8)), atol=1e-4)
    near = resize_batch(imgs, 64, "nearest")
    np.testing.assert_array_equal(near[:, ::2, ::2], imgs)
    with pytest.raises(ValueError):
        resize_batch(imgs, 32, "lanczos9")
    with pytest.raises(ValueError):
        resize_batch(imgs[0], 32)


def test_unit_float_and_normalize():
    imgs = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    x = to_unit_float(imgs)
    assert x.dtype == np.float32 and x.max() <= 1.0
    np.testing.assert_allclose(x, imgs / 255.0, rtol=1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = normalize(x, mean, std)
    expect = (imgs / 255.0 - np.array(mean)) / np.array(std)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
    yt = normalize(torch.from_numpy(x), mean, std)
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        normalize(x, (0.5,), (0.5,))
    with pytest.raises(ValueError):
        normalize(x, mean, (1.0, 0.0, 1.0))

"""cbmir.search.diagnostics: all-zero rows, the sampled median pairwise cosine and its threshold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cbmir.search.diagnostics import (COLLAPSE_THRESHOLD, median_pairwise_cosine, rows_text, sample_rows,
                                      zero_query_warning, zero_rows)


def test_zero_rows_are_exactly_the_all_zero_rows():
    x = np.ones((6, 4), np.float32)
    x[[1, 4]] = 0.0
    x[2, 1:] = 0.0                                             # one non-zero entry left: not a zero row
    x[5] = 1e-30
    assert zero_rows(x).tolist() == [1, 4] and zero_rows(x).dtype == np.int64
    assert zero_rows(np.zeros(3)).tolist() == [0] and zero_rows(np.ones((0, 3))).tolist() == []


def test_median_pairwise_cosine_equals_a_plain_loop_and_skips_zero_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 5))
    x[4] = 0.0
    nz = [i for i in range(9) if i != 4]
    plain = [float(x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])) for i, j in itertools.combinations(nz, 2)]
    med, used = median_pairwise_cosine(x)
    assert used == 8 and med == pytest.approx(float(np.median(plain)), abs=1e-12)


def test_sample_is_seeded_sorted_and_without_replacement():
    idx = np.arange(1000, 2000)
    a, b = sample_rows(idx, 50), sample_rows(idx, 50)
    assert a.tolist() == b.tolist() == sorted(set(a.tolist())) and len(a) == 50
    assert sample_rows(idx[:30], 50).tolist() == idx[:30].tolist()


def test_messages_are_one_line_with_counts_and_rows():
    assert zero_query_warning([], 10) is None
    w = zero_query_warning(list(range(12)), 40, "val")
    assert w.startswith("12 of 40 query vector(s) are all zeros (val rows [0, 1, 2") and "(+2 more)" in w
    assert "\n" not in w and rows_text([5]) == "[5]"


def test_threshold_separates_useful_from_random_init_features_on_real_images(data_dir):
    """The documented threshold on BreastMNIST 28 px train images: HOG far below, random-init ResNet50 above."""
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.medmnist_data import open_medmnist

    images = next(open_medmnist("breastmnist", 28, data_dir).iter_batches("train", 128)).images
    hog = make_embedder(create_extractor("hog"), size=28, is_3d=False).embed(images)
    cnn = make_embedder(create_extractor("resnet50", random_init=True, device="cpu"), size=28,
                        is_3d=False).embed(images)
    assert median_pairwise_cosine(hog)[0] < 0.7 < COLLAPSE_THRESHOLD < median_pairwise_cosine(cnn)[0]

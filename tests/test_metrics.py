"""The study's metrics (DESIGN.md §2) on the worked examples and against a plain-Python recomputation."""

import numpy as np
import pytest

from cbmir.evaluation.metrics import (average_precision_at_k, hit_at_k, majority_vote_at_k,
                                retrieval_metrics)

# DESIGN.md §2 worked examples, k = 5
Y = np.array([1, 2, 1])
R = np.array([[1, 1, 0, 1, 0],
              [0, 2, 1, 2, 0],
              [0, 0, 0, 2, 2]])


def test_worked_examples_per_query():
    np.testing.assert_allclose(average_precision_at_k(Y, R, 5), [(1 + 1 + 3 / 4) / 3, (1 / 2 + 2 / 4) / 2, 0.0])
    np.testing.assert_array_equal(majority_vote_at_k(Y, R, 5), [1, 1, 0])
    np.testing.assert_array_equal(hit_at_k(Y, R, 1), [1, 0, 0])
    np.testing.assert_array_equal(hit_at_k(Y, R, 3), [1, 1, 0])
    np.testing.assert_array_equal(hit_at_k(Y, R, 5), [1, 1, 0])


def test_worked_examples_means():
    m = retrieval_metrics(Y, R, 5)
    assert m["mAP@5"] == pytest.approx(0.472222, abs=1e-6)
    assert m["mMV@5"] == pytest.approx(0.666667, abs=1e-6)
    assert m["ACC@1"] == pytest.approx(0.333333, abs=1e-6)
    assert m["ACC@3"] == pytest.approx(0.666667, abs=1e-6)
    assert m["ACC@5"] == pytest.approx(0.666667, abs=1e-6)
    assert set(m) == {"mAP@5", "mMV@5", "ACC@1", "ACC@3", "ACC@5"}


def _plain(y, r, k):
    """Literal transcription of the definitions, one query at a time."""
    hits, s = 0, 0.0
    for i, lab in enumerate(r[:k], 1):
        if lab == y:
            hits += 1
            s += hits / i
    ap = s / hits if hits else 0.0
    votes = {}
    for lab in r[:k]:
        votes[lab] = votes.get(lab, 0) + 1
    mv = 1.0 if votes.get(y, 0) == max(votes.values()) else 0.0
    return ap, mv


def test_random_against_plain_python():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    r = rng.integers(0, 4, (500, 5))
    ap = average_precision_at_k(y, r, 5)
    mv = majority_vote_at_k(y, r, 5)
    for i in range(500):
        a, m = _plain(y[i], r[i], 5)
        assert ap[i] == pytest.approx(a)
        assert mv[i] == m
    np.testing.assert_array_equal(hit_at_k(y, r, 3), [float(y[i] in r[i, :3]) for i in range(500)])


def test_shape_mismatch_is_clear():
    from cbmir.core.errors import CbmirError
    with pytest.raises(CbmirError, match="n_queries=3"):
        retrieval_metrics(Y, R[:2], 5)

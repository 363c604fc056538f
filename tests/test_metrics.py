"""The study's metrics (DESIGN.md §2) on the worked examples and against a plain-Python recomputation."""

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
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
    with pytest.raises(CbmirError, match="n_queries=3"):
        retrieval_metrics(Y, R[:2], 5)


def test_unlabelled_hits_are_never_relevant_and_cast_no_vote():
    y = np.array([1, 1, 0])
    r = np.array([[-1, -1, -1, 1, 0],     # majority among labelled hits: 1 and 0 tie -> MV 1
                  [-1, -1, -1, -1, -1],   # nothing labelled: no hit, no vote
                  [-1, 0, 0, -1, 1]])
    np.testing.assert_allclose(average_precision_at_k(y, r, 5), [1 / 4, 0.0, (1 / 2 + 2 / 3) / 2])
    np.testing.assert_array_equal(majority_vote_at_k(y, r, 5), [1, 0, 1])
    np.testing.assert_array_equal(hit_at_k(y, r, 1), [0, 0, 0])
    np.testing.assert_array_equal(hit_at_k(y, r, 3), [0, 0, 1])
    # against the plain transcription with every -1 read as a class no query has (AP/ACC agree;
    # MV differs only where -1 would outvote: row 0 -> 0 there, 1 here)
    r_foreign = np.where(r < 0, 99, r)
    np.testing.assert_allclose(average_precision_at_k(y, r, 5), average_precision_at_k(y, r_foreign, 5))
    assert [_plain(y[i], r_foreign[i], 5)[1] for i in range(3)] == [0.0, 0.0, 1.0]


def test_unlabelled_queries_are_refused():
    with pytest.raises(CbmirError, match=r"1 query label\(s\) are negative .* positions \[1\]"):
        retrieval_metrics(np.array([0, -1]), np.array([[0], [0]]), 1)


def test_ordinal_grades_match_exactly():
    """RetinaMNIST-style grades: a hit one grade away is not relevant (the study's exact-grade rule)."""
    y = np.array([2])
    r = np.array([[1, 3, 2, 2, 4]])
    m = retrieval_metrics(y, r, 5)
    assert m["ACC@1"] == 0.0 and m["ACC@3"] == 1.0 and m["mMV@5"] == 1.0
    assert m["mAP@5"] == pytest.approx((1 / 3 + 2 / 4) / 2)

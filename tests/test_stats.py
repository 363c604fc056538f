"""Tests of cbmir.evaluation.stats: bootstrap intervals, paired bootstrap, McNemar."""

import math

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from cbmir.evaluation.stats import MCNEMAR_EXACT_BELOW, bootstrap_ci, mcnemar, paired_bootstrap


# --------------------------------------------------------------------------- #
# bootstrap_ci
# --------------------------------------------------------------------------- #
def test_constant_values_give_zero_width_interval_at_the_value():
    mean, lo, hi = bootstrap_ci(np.full(50, 0.7), n_boot=500)
    assert mean == pytest.approx(0.7)
    assert lo == pytest.approx(0.7)
    assert hi == pytest.approx(0.7)


def test_hand_checked_two_point_case():
    # values (0, 1): every resample of size 2 is (0,0), (0,1), (1,0) or (1,1),
    # so the resample means are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    # The 2.5% and 97.5% quantiles of 20,000 such means are 0 and 1, and the
    # fraction of 0.5's is about 1/2 - checked through the interval at
    # alpha = 0.6 (quantiles 0.3 and 0.7 both fall on 0.5).
    mean, lo, hi = bootstrap_ci([0.0, 1.0], n_boot=20_000, alpha=0.05)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    _, lo, hi = bootstrap_ci([0.0, 1.0], n_boot=20_000, alpha=0.6)
    assert (lo, hi) == (0.5, 0.5)


def test_binary_interval_matches_normal_approximation():
    # 1000 queries with exactly 300 hits: p = 0.3. The normal-approximation
    # 95% width is 2 * 1.96 * sqrt(p(1-p)/n) = 0.05680. The percentile
    # bootstrap with 4000 resamples has Monte-Carlo error of a few percent on
    # its width; we accept 10% relative deviation.
    n, hits = 1000, 300
    values = np.zeros(n)
    values[np.random.default_rng(123).permutation(n)[:hits]] = 1.0
    p = hits / n
    mean, lo, hi = bootstrap_ci(values, n_boot=4000, alpha=0.05, seed=7)
    assert mean == pytest.approx(p)
    assert lo < p < hi
    normal_width = 2 * 1.959964 * math.sqrt(p * (1 - p) / n)
    assert normal_width == pytest.approx(0.05680, abs=1e-5)
    assert (hi - lo) == pytest.approx(normal_width, rel=0.10)
    # and roughly centred on the mean
    assert abs((lo + hi) / 2 - p) < 0.1 * normal_width


def test_same_seed_same_interval_other_seed_differs():
    values = np.random.default_rng(0).random(300)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)


def test_smaller_alpha_gives_wider_interval():
    values = (np.random.default_rng(3).random(400) < 0.6).astype(float)
    _, lo95, hi95 = bootstrap_ci(values, alpha=0.05)
    _, lo80, hi80 = bootstrap_ci(values, alpha=0.20)
    assert lo95 < lo80 < hi80 < hi95


def test_blocked_resampling_path(monkeypatch):
    # Force many small blocks: the blocked code path must still give a proper
    # interval (the mean of all resamples is close to the sample mean).
    import cbmir.evaluation.stats as st

    monkeypatch.setattr(st, "_MAX_BLOCK_ELEMENTS", 1000)
    values = (np.random.default_rng(11).random(600) < 0.4).astype(float)
    mean, lo, hi = st.bootstrap_ci(values, n_boot=999)
    assert lo < mean < hi
    boot = st._bootstrap_means(values, 999, np.random.default_rng(0))  # noqa: SLF001 - the resampling itself
    assert boot.shape == (999,)
    assert abs(boot.mean() - values.mean()) < 0.01


def test_bool_input_accepted():
    values = np.array([True, False, True, True])
    mean, lo, hi = bootstrap_ci(values, n_boot=200)
    assert mean == 0.75
    assert 0.0 <= lo <= mean <= hi <= 1.0


@pytest.mark.parametrize(
    "values, exc",
    [
        ([], ValueError),
        (np.zeros((3, 2)), ValueError),
        ([0.1, float("nan")], ValueError),
        (["a", "b"], TypeError),
    ],
)
def test_bootstrap_rejects_bad_input(values, exc):
    with pytest.raises(exc):
        bootstrap_ci(values)


@pytest.mark.parametrize("kwargs", [{"n_boot": 0}, {"n_boot": 2.5}, {"alpha": 0.0}, {"alpha": 1.0}])
def test_bootstrap_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci([0.0, 1.0], **kwargs)


# --------------------------------------------------------------------------- #
# paired_bootstrap
# --------------------------------------------------------------------------- #
def test_identical_inputs_give_zero_difference_and_p_one():
    a = np.random.default_rng(1).random(200)
    res = paired_bootstrap(a, a.copy())
    assert res["diff"] == 0.0
    assert res["lo"] == 0.0 and res["hi"] == 0.0
    assert res["p_value"] == 1.0


def test_clear_difference_is_significant_at_smallest_attainable_p():
    a = np.ones(100)
    b = np.zeros(100)
    res = paired_bootstrap(a, b, n_boot=999)
    assert res["diff"] == 1.0
    assert res["lo"] == 1.0 and res["hi"] == 1.0
    # no bootstrap difference is <= 0: p = 2 * (0 + 1) / (999 + 1)
    assert res["p_value"] == pytest.approx(2 / 1000)


def test_pairing_matters():
    # B is A with 10 of 500 successes turned into failures. Unpaired, the
    # two rates 0.5 vs 0.48 are not distinguishable; paired, every query
    # either agrees or favours A, so the difference is clearly > 0.
    rng = np.random.default_rng(2)
    a = (rng.random(500) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:10]] = 0.0
    res = paired_bootstrap(a, b, n_boot=2000)
    assert res["diff"] == pytest.approx(10 / 500)
    assert res["lo"] > 0.0
    assert res["p_value"] < 0.01


def test_swapping_models_negates_difference_keeps_p():
    rng = np.random.default_rng(4)
    a = (rng.random(300) < 0.7).astype(float)
    b = (rng.random(300) < 0.6).astype(float)
    r_ab = paired_bootstrap(a, b, seed=9)
    r_ba = paired_bootstrap(b, a, seed=9)
    assert r_ab["diff"] == pytest.approx(-r_ba["diff"])
    assert r_ab["lo"] == pytest.approx(-r_ba["hi"])
    assert r_ab["hi"] == pytest.approx(-r_ba["lo"])
    assert r_ab["p_value"] == pytest.approx(r_ba["p_value"])
    assert r_ab["lo"] <= r_ab["diff"] <= r_ab["hi"]


def test_paired_bootstrap_shape_mismatch():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0, 0.0, 1.0])


# --------------------------------------------------------------------------- #
# mcnemar
# --------------------------------------------------------------------------- #
def _arrays_from_table(n11, n10, n01, n00):
    """Per-query arrays with n11 both right, n10 only A right, n01 only B right."""
    a = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00, dtype=bool)
    b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00, dtype=bool)
    perm = np.random.default_rng(n11 + n10 + n01 + n00).permutation(a.size)
    return a[perm], b[perm]


@pytest.mark.parametrize(
    "table",
    [(50, 7, 2, 41), (30, 1, 9, 10), (80, 12, 11, 5), (5, 0, 6, 3), (60, 20, 4, 16)],
)
def test_mcnemar_exact_matches_statsmodels(table):
    n11, n10, n01, n00 = table
    a, b = _arrays_from_table(*table)
    ours = mcnemar(a, b, exact=True)
    ref = sm_mcnemar(np.array([[n11, n10], [n01, n00]]), exact=True)
    assert (ours["b10"], ours["b01"]) == (n10, n01)
    assert ours["method"] == "exact"
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)


@pytest.mark.parametrize(
    "table",
    [(100, 30, 15, 55), (200, 40, 60, 100), (10, 3, 25, 7), (10, 13, 12, 5)],
)
@pytest.mark.parametrize("correction", [True, False])
def test_mcnemar_chi2_matches_statsmodels(table, correction):
    n11, n10, n01, n00 = table
    a, b = _arrays_from_table(*table)
    ours = mcnemar(a, b, exact=False, correction=correction)
    ref = sm_mcnemar(np.array([[n11, n10], [n01, n00]]), exact=False, correction=correction)
    assert ours["method"] == "chi2"
    assert ours["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_mcnemar_hand_worked_values():
    # b10 = 30, b01 = 15: chi2 = (|30 - 15| - 1)^2 / 45 = 196 / 45
    a, b = _arrays_from_table(100, 30, 15, 55)
    res = mcnemar(a, b)
    assert res["method"] == "chi2"
    assert res["statistic"] == pytest.approx(196 / 45)
    # b10 = 1, b01 = 9: exact two-sided p = 2 * (1 + 10) / 2**10 = 22/1024
    a, b = _arrays_from_table(30, 1, 9, 10)
    res = mcnemar(a, b)
    assert res["method"] == "exact"
    assert (res["b01"], res["b10"], res["statistic"]) == (9, 1, 1.0)
    assert res["p_value"] == pytest.approx(22 / 1024)


def test_mcnemar_rule_switches_at_25_discordant_pairs():
    assert MCNEMAR_EXACT_BELOW == 25
    a, b = _arrays_from_table(20, 14, 10, 5)  # 24 discordant
    assert mcnemar(a, b)["method"] == "exact"
    a, b = _arrays_from_table(20, 15, 10, 5)  # 25 discordant
    assert mcnemar(a, b)["method"] == "chi2"
    # overrides
    assert mcnemar(a, b, exact=True)["method"] == "exact"
    a, b = _arrays_from_table(20, 14, 10, 5)
    assert mcnemar(a, b, exact=False)["method"] == "chi2"


def test_mcnemar_no_or_balanced_discordance_gives_p_one():
    a = np.array([1, 1, 0, 0])
    for exact in (None, True, False):
        res = mcnemar(a, a, exact=exact)
        assert (res["b01"], res["b10"], res["statistic"], res["p_value"]) == (0, 0, 0.0, 1.0)
    a, b = _arrays_from_table(10, 20, 20, 10)
    res = mcnemar(a, b)
    assert res["method"] == "chi2"
    assert (res["statistic"], res["p_value"]) == (0.0, 1.0)


def test_mcnemar_accepts_int_and_float_01_and_rejects_other_values():
    res = mcnemar([1, 0, 1, 1], [0.0, 0.0, 1.0, 0.0])
    assert (res["b01"], res["b10"]) == (0, 2)
    with pytest.raises(ValueError):
        mcnemar([1, 2, 0], [1, 0, 0])
    with pytest.raises(ValueError):
        mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(ValueError):
        mcnemar([0.5, 1.0], [1.0, 0.0])

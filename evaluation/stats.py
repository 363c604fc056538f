"""Uncertainty and significance for retrieval metrics (beyond the study).

The study reports point estimates only. These functions work on **per-query
outcome arrays**: 1D float (or bool/int) arrays of length ``n_queries`` with
one value per test image, e.g. AP@5 per query (in [0, 1]), MV@5 per query
(0/1) or ACC@k per query (0/1). The metric the study prints is the mean of
such an array (times 100 for percent); the functions below return results in
the units of the input (fractions for per-query 0/1 or AP values).

Two arrays compared by :func:`paired_bootstrap` or :func:`mcnemar` must be
aligned: element ``i`` of both belongs to the same query (same test image,
same database), e.g. two models on the same dataset and size.

Sources
-------
- Bootstrap: B. Efron and R. J. Tibshirani, *An Introduction to the
  Bootstrap*, Chapman & Hall, 1993 (percentile interval, ch. 13); the query
  set is the resampling unit, one index set for both models when paired.
  The ``+1`` p-value rule follows
  A. C. Davison and D. V. Hinkley, *Bootstrap Methods and their Application*,
  Cambridge University Press, 1997, §4.
- McNemar: Q. McNemar, "Note on the sampling error of the difference between
  correlated proportions or percentages", Psychometrika 12(2):153-157, 1947;
  continuity correction after A. L. Edwards, Psychometrika 13:185-187, 1948.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as _sps

__all__ = ["bootstrap_ci", "paired_bootstrap", "mcnemar", "MCNEMAR_EXACT_BELOW"]

#: :func:`mcnemar` uses the exact binomial test when the number of discordant
#: pairs ``b01 + b10`` is below this, else the chi-square approximation.
MCNEMAR_EXACT_BELOW = 25

# Upper bound on the number of int64 indices drawn at once (32 MiB). The
# resampling is done in blocks of rows of the (n_boot, n) index matrix.
_MAX_BLOCK_ELEMENTS = 1 << 22


def _as_outcomes(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1D (n_queries,), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        raise TypeError(f"{name} must be numeric or bool, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, not {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), not {alpha!r}")


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values``.

    The (n_boot, n) index matrix is drawn in blocks of rows so that at most
    ``_MAX_BLOCK_ELEMENTS`` indices exist at once. Returns float64 (n_boot,).
    """
    n = values.shape[0]
    rows_per_block = max(1, _MAX_BLOCK_ELEMENTS // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows_per_block):
        stop = min(n_boot, start + rows_per_block)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int | None = 0):
    """Percentile-bootstrap confidence interval for the mean of per-query values.

    Resamples the queries with replacement ``n_boot`` times, takes the mean of
    each resample and returns the ``alpha/2`` and ``1 - alpha/2`` quantiles
    of those means (numpy's default linear interpolation) - the percentile
    interval of Efron & Tibshirani (1993, ch. 13).

    Parameters
    ----------
    values : array_like, shape (n_queries,)
        Per-query outcomes, float/int/bool (e.g. AP@5 in [0, 1], or ACC@k 0/1).
        Must be finite.
    n_boot : int
        Number of bootstrap resamples (default 2000).
    alpha : float
        1 - confidence level (default 0.05, a 95% interval).
    seed : int or None
        Seed of ``numpy.random.default_rng``. The same (values, n_boot,
        seed) always gives the same interval. ``None`` draws fresh entropy.

    Returns
    -------
    (mean, lo, hi) : tuple of float
        ``mean`` is the sample mean of ``values`` (not the bootstrap mean);
        ``lo <= hi`` bound the interval, in the units of ``values``.

    Raises
    ------
    ValueError
        If ``values`` is not 1D, is empty or contains NaN/inf, or ``n_boot`` /
        ``alpha`` are out of range.
    TypeError
        If ``values`` is not numeric or bool.

    Notes
    -----
    Memory is bounded: indices are drawn in blocks of at most 2**22 int64.
    Cost is O(n_boot * n_queries); 2000 resamples of PathMNIST's 7,180
    queries take well under a second.
    """
    x = _as_outcomes(values, "values")
    _check_boot_args(n_boot, alpha)
    rng = np.random.default_rng(seed)
    means = _bootstrap_means(x, int(n_boot), rng)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(x.mean()), float(lo), float(hi)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int | None = 0, alpha: float = 0.05) -> dict:
    """Paired bootstrap comparison of two models on the same queries.

    Each resample draws one set of query indices (with replacement) and
    applies it to both arrays, so the correlation between the two models on
    the same query is kept. Equivalently the per-query differences
    ``d = a - b`` are bootstrapped.

    Parameters
    ----------
    a, b : array_like, shape (n_queries,)
        Per-query outcomes of model A and model B, aligned by query; float,
        int or bool; finite.
    n_boot : int
        Number of resamples (default 2000).
    seed : int or None
        Seed of ``numpy.random.default_rng`` (same seed, same result).
    alpha : float
        1 - confidence level of the interval (default 0.05).

    Returns
    -------
    dict
        ``diff`` : float, ``mean(a) - mean(b)`` (units of the inputs).
        ``lo``, ``hi`` : float, percentile-bootstrap interval of the
        difference at level ``1 - alpha``.
        ``p_value`` : float in (0, 1], two-sided, by the rule

            p = min(1, 2 * min((#{d* <= 0} + 1) / (B + 1),
                               (#{d* >= 0} + 1) / (B + 1)))

        where d* are the ``B = n_boot`` bootstrap mean differences. This is
        the percentile-interval inversion (the smallest alpha at which the
        interval would exclude 0), with the ``+1`` correction of Davison &
        Hinkley (1997) so that p is never exactly 0; the smallest possible
        value is ``2 / (B + 1)``. Identical inputs give diff 0 and p = 1.

    Raises
    ------
    ValueError
        If the arrays differ in shape, are not 1D, are empty, contain
        NaN/inf, or ``n_boot``/``alpha`` are out of range.
    TypeError
        If an input is not numeric or bool.
    """
    x = _as_outcomes(a, "a")
    y = _as_outcomes(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {x.shape} and {y.shape}")
    _check_boot_args(n_boot, alpha)
    d = x - y
    rng = np.random.default_rng(seed)
    boot = _bootstrap_means(d, int(n_boot), rng)
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    # Exact zero comparison is meant: with identical inputs every d* is 0.0.
    n_le = int(np.count_nonzero(boot <= 0.0))
    n_ge = int(np.count_nonzero(boot >= 0.0))
    denom = n_boot + 1
    p = min(1.0, 2.0 * min((n_le + 1) / denom, (n_ge + 1) / denom))
    return {
        "diff": float(x.mean() - y.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "p_value": float(p),
    }


def _as_binary(values, name: str) -> np.ndarray:
    arr = _as_outcomes(values, name)
    if not np.all((arr == 0.0) | (arr == 1.0)):
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return arr.astype(bool)


def mcnemar(a_correct, b_correct, exact: bool | None = None, correction: bool = True) -> dict:
    """McNemar's test for two models' paired binary outcomes (e.g. ACC@1).

    Counts the discordant queries ``b01`` (A wrong, B right) and ``b10``
    (A right, B wrong); under H0 (equal success rates) each discordant query
    is equally likely to fall either way (McNemar 1947).

    Rule (``exact=None``): the exact test is used when
    ``b01 + b10 < 25`` (:data:`MCNEMAR_EXACT_BELOW`, a common rule of
    thumb), else the chi-square approximation. ``exact=True``/``False``
    forces one.

    - exact: statistic = ``min(b01, b10)``; p = ``min(1, 2 * P[X <= min])``
      for ``X ~ Binomial(b01 + b10, 1/2)`` (two-sided, doubling the smaller
      tail; as ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``).
    - chi-square: statistic = ``max(0, |b01 - b10| - 1)**2 / (b01 + b10)``
      with Edwards' continuity correction (``correction=True``), or
      ``(b01 - b10)**2 / (b01 + b10)`` without; p from chi-square with 1 df.
      Equals statsmodels' ``mcnemar(exact=False)`` except when
      ``b01 == b10``, where statsmodels does not clamp at 0 (its statistic
      is then ``1 / (b01 + b10)``) and this function returns 0 and p = 1.

    With no discordant pairs both tests return statistic 0.0 and p = 1.0.

    Parameters
    ----------
    a_correct, b_correct : array_like of bool or 0/1, shape (n_queries,)
        Per-query success of model A and model B, aligned by query.
    exact : bool or None
        Force the exact (True) or chi-square (False) test; None applies the
        rule above.
    correction : bool
        Continuity correction for the chi-square test (default True).

    Returns
    -------
    dict
        ``b01``, ``b10`` : int; ``statistic`` : float; ``p_value`` : float in
        [0, 1]; ``method`` : ``"exact"`` or ``"chi2"``.

    Raises
    ------
    ValueError
        If the arrays differ in shape, are not 1D, are empty, or contain values
        other than 0/1.
    TypeError
        If an input is not numeric or bool.
    """
    a = _as_binary(a_correct, "a_correct")
    b = _as_binary(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(
            f"a_correct and b_correct must have the same shape, got {a.shape} and {b.shape}"
        )
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    n_disc = b01 + b10
    use_exact = n_disc < MCNEMAR_EXACT_BELOW if exact is None else bool(exact)
    if use_exact:
        k = min(b01, b10)
        statistic = float(k)
        p = 1.0 if n_disc == 0 else min(1.0, 2.0 * float(_sps.binom.cdf(k, n_disc, 0.5)))
        method = "exact"
    else:
        if n_disc == 0:
            statistic, p = 0.0, 1.0
        else:
            diff = abs(b01 - b10) - (1.0 if correction else 0.0)
            statistic = max(0.0, diff) ** 2 / n_disc
            p = float(_sps.chi2.sf(statistic, df=1))
        method = "chi2"
    return {
        "b01": b01,
        "b10": b10,
        "statistic": float(statistic),
        "p_value": float(p),
        "method": method,
    }

"""Degenerate features: all-zero vectors and collapsed collections, as one-line warnings.

Neither makes a search wrong (rankings stay exact), but both make its answers hard to trust, so
``evaluate`` (and ``search``) say so instead of printing plausible-looking numbers:

* **All-zero vectors** (a blank image through HOG or a CNN whose activations died): such a vector
  has no direction; under cosine its similarity to everything is 0 (the store's zero-vector rule,
  :meth:`cbmir.search.store.VectorStore._prepare`), so as a query its top-k is just the lowest
  database rows (ties), whatever the image showed.
* **A collapsed collection**: every vector points almost the same way (random-init CNN features:
  median pairwise cosine 0.984-0.994 measured here on BreastMNIST, PneumoniaMNIST and RetinaMNIST
  28 px with ResNet50 and DenseNet121), so rankings are decided by small differences between nearly
  parallel vectors. Detected on a sample: the median cosine similarity over all pairs of
  :data:`COLLAPSE_SAMPLE` points of a split, above :data:`COLLAPSE_THRESHOLD`.

**Threshold.** 0.975 lies between the highest value measured for useful features and the lowest for
collapsed ones (train split, 28 px, 256-point samples): HOG 0.60 / 0.65 / 0.69 and raw pixels
0.88 / 0.97 / 0.93 (Breast / Pneumonia / Retina; raw pixels still reach ACC@1 79-83 %) against
0.984-0.994 for random-init CNNs. It is a warning, never a refusal. Cosine is taken on the stored
vectors whatever the collection's distance (for Euclidean collections the warning is about
directions only). Zero vectors are left out of the sample's pairs (ingest and the zero-query
warning report them).
"""

from __future__ import annotations

import numpy as np

from cbmir.search.store import VectorStore

#: Median pairwise cosine similarity above which a collection is reported as collapsed.
COLLAPSE_THRESHOLD = 0.975
#: Points sampled (seeded, without replacement) for the median: 256 points = 32,640 pairs.
COLLAPSE_SAMPLE = 256
#: Most vector values read for the sample (128 MiB as float32): fewer points for very long vectors
#: (3D collections: 256 points at 131,072 dims, 64 at 518,400), but never fewer than 16.
COLLAPSE_MAX_VALUES = 1 << 25
#: Rows listed in a warning before ``...``.
ROWS_SHOWN = 10


def zero_rows(vectors: np.ndarray) -> np.ndarray:
    """Positions of the rows of ``vectors`` whose entries are all exactly 0.

    Args:
        vectors: ``(N, dim)`` (or ``(dim,)``) numeric array.

    Returns:
        int64 ``(Z,)`` ascending row positions (empty when there is none).
    """
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x[None, :]
    return np.flatnonzero(~x.any(axis=1)).astype(np.int64)


def rows_text(rows, limit: int = ROWS_SHOWN) -> str:
    """``[3, 17, 40]`` or ``[3, 17, ... (+n more)]`` for one-line messages."""
    rows = [int(r) for r in rows]
    more = f", ... (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return "[" + ", ".join(map(str, rows[:limit])) + more + "]"


def zero_query_warning(rows, n_queries: int, split: str = "test") -> str | None:
    """One-line warning for all-zero query vectors, or None when ``rows`` is empty.

    Args:
        rows: row indices (in ``split``) of the all-zero queries; n_queries: queries searched.
    """
    rows = list(rows)
    if not rows:
        return None
    return (f"{len(rows)} of {n_queries} query vector(s) are all zeros ({split} rows {rows_text(rows)}): they have "
            "no direction, every cosine score is 0 and their top-k is the lowest database rows; check those "
            "images (blank?) and the extractor")


def median_pairwise_cosine(vectors: np.ndarray) -> tuple[float, int]:
    """Median cosine similarity over all pairs of the non-zero rows of ``vectors`` (float64).

    Args:
        vectors: float ``(N, dim)``.

    Returns:
        ``(median, n_used)``: NaN and the count when fewer than 2 non-zero rows remain.
    """
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    x = x[norms > 0] / norms[norms > 0, None]
    n = len(x)
    if n < 2:
        return float("nan"), n
    sims = x @ x.T
    return float(np.median(sims[np.triu_indices(n, 1)])), n


def sample_rows(indices: np.ndarray, sample: int, seed: int = 0) -> np.ndarray:
    """``sample`` of ``indices`` drawn without replacement by a seeded generator, ascending
    (all of them when there are not more)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) <= sample:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=int(sample), replace=False))


def collapse_warning(store: VectorStore, name: str, split: str = "train", *, sample: int = COLLAPSE_SAMPLE,
                     threshold: float = COLLAPSE_THRESHOLD, seed: int = 0,
                     indices: np.ndarray | None = None) -> str | None:
    """One-line warning when the ``split`` points of collection ``name`` look collapsed, else None.

    Reads the row indices of ``split`` (payloads only; skipped when the caller gives them as
    ``indices``, int ``(N,)``), then the stored vectors of a seeded sample of at most ``sample`` of them
    (fewer for very long vectors: :data:`COLLAPSE_MAX_VALUES`), and compares their
    :func:`median_pairwise_cosine` with ``threshold``. Costs one retrieve of the sample (and one
    scroll without vectors when ``indices`` is None).

    Raises:
        CbmirError: the collection does not exist.
    """
    meta = store.meta(name)
    idx = store.fetch(name, split, with_vectors=False)[0] if indices is None else np.asarray(indices)
    n_sample = max(16, min(int(sample), COLLAPSE_MAX_VALUES // max(1, meta.dim)))
    rows = sample_rows(idx, n_sample, seed)
    if len(rows) < 2:
        return None
    vecs, _ = store.get_points(name, split, rows.tolist(), with_vectors=True)
    med, used = median_pairwise_cosine(vecs)
    if not np.isfinite(med) or med <= threshold:
        return None
    return (f"collection {name!r} looks collapsed: median pairwise cosine similarity {med:.3f} over {used} "
            f"sampled {split} points (of {len(idx)}; warning above {threshold:g}): its vectors barely differ in "
            "direction (random-init weights? constant images?), so rankings hang on small differences; "
            "compare its metrics with the majority-class rate and a pretrained model before trusting them")

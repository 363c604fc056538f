"""Independent check of a run: numpy float64 brute-force top-k and metrics vs what cbmir reported.

Inputs: the vectors read back from the store (``cbmir export ... -o vectors.npz``: ``train_vectors``,
``train_labels``, ``train_indices``, ``test_*``) and the result JSON of ``cbmir run/evaluate -o``
(``per_query``: test rows, top-k database rows in rank order; ``metrics``)::

    python -m cbmir.benchmarks.check_bruteforce vectors.npz result.json [--distance cosine|euclidean]

The brute force shares no code with cbmir: cosine = float64 L2-normalised dot products (zero
vectors score 0), Euclidean = float64 ``sqrt(sum((q - x)^2))``; ranking by score, ties by lower
database row (stable sort over rows in ascending order); metrics as DESIGN.md §2 (AP@k, MV@k with
ties of the vote counting as a hit, ACC@1/3/k; a database label -1 (unlabelled) is never a match and
casts no vote). The splits are the result's ``query_split`` / ``database_split`` (default ``test`` /
``train``); when they are the same split (leave-one-out) each query's own row is left out. Prints the vector
dims, ``top-k identical for N/N
queries`` (and, for any query that differs, the float64 scores at the first differing rank), and
each metric beside the reported one. Exit status 0 when every top-k and every metric agree.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def brute_force_topk(q: np.ndarray, db: np.ndarray, k: int, distance: str = "cosine",
                     exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``db`` for each row of ``q``: ``(rows int64 (Q, k), scores float64 (Q, k))``.

    ``q`` ``(Q, D)``, ``db`` ``(N, D)``, any float dtype (computed in float64). Cosine: higher is closer;
    Euclidean: lower is closer. Ties: lower row first. ``exclude``: int ``(Q,)`` row of ``db`` left out
    for each query (leave-one-out), or None.
    """
    q = np.asarray(q, dtype=np.float64)
    db = np.asarray(db, dtype=np.float64)
    rows = np.empty((len(q), k), dtype=np.int64)
    scores = np.empty((len(q), k))
    if distance == "cosine":
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        dn = np.linalg.norm(db, axis=1, keepdims=True)
        q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
        db = np.divide(db, dn, out=np.zeros_like(db), where=dn > 0)
    for lo in range(0, len(q), 64):
        qb = q[lo:lo + 64]
        if distance == "cosine":
            s = qb @ db.T
            key = -s
        else:
            s = np.sqrt(np.stack([((db - x) ** 2).sum(axis=1) for x in qb]))
            key = s
        if exclude is not None:
            key = key.copy()
            key[np.arange(len(qb)), exclude[lo:lo + 64]] = np.inf
        order = np.argsort(key, axis=1, kind="stable")[:, :k]  # stable: equal scores keep row order
        rows[lo:lo + len(qb)] = order
        scores[lo:lo + len(qb)] = np.take_along_axis(s, order, axis=1)
    return rows, scores


def metrics(y: np.ndarray, r: np.ndarray, k: int) -> dict[str, float]:
    """Mean AP@k, MV@k, ACC@1, ACC@3, ACC@k of query labels ``y (Q,)`` and top-k labels ``r (Q, k)``."""
    ap, mv, acc = [], [], {n: [] for n in sorted({1, 3, k}) if n <= k}  # as cbmir: no ACC@3 when k < 3
    for yi, ri in zip(y, r[:, :k]):
        hit = ri == yi
        h = hit.sum()
        ap.append(sum(hit[:i + 1].sum() / (i + 1) for i in range(k) if hit[i]) / h if h else 0.0)
        labels, counts = np.unique(ri[ri >= 0], return_counts=True)  # unlabelled hits: no vote
        mv.append(float(yi in labels[counts == counts.max()]) if len(labels) else 0.0)
        for n in acc:
            acc[n].append(float(hit[:n].any()))
    out = {f"mAP@{k}": float(np.mean(ap)), f"mMV@{k}": float(np.mean(mv))}
    out.update({f"ACC@{n}": float(np.mean(v)) for n, v in acc.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (0: everything agrees)."""
    p = argparse.ArgumentParser(prog="python -m cbmir.benchmarks.check_bruteforce", description=__doc__.split("\n")[0])
    p.add_argument("vectors", help="npz written by `cbmir export`")
    p.add_argument("result", help="JSON written by `cbmir run -o` / `cbmir evaluate -o` (with per_query)")
    p.add_argument("--distance", choices=("cosine", "euclidean"), default=None,
                   help="default: the result's distance")
    args = p.parse_args(argv)

    z = np.load(args.vectors)
    with open(args.result) as fh:
        res = json.load(fh)
    if "per_query" not in res:
        print(f"{args.result} has no per_query section (written by an older cbmir)", file=sys.stderr)
        return 2
    distance = args.distance or res.get("distance", "cosine")
    pq = res["per_query"]
    k = int(res.get("k", len(pq["topk_indices"][0])))
    qs, ds = res.get("query_split", "test"), res.get("database_split", "train")
    if f"{qs}_vectors" not in z.files or f"{ds}_vectors" not in z.files:
        print(f"{args.vectors} lacks the {qs} / {ds} vectors of this result", file=sys.stderr)
        return 2
    tr_v, te_v = z[f"{ds}_vectors"], z[f"{qs}_vectors"]
    tr_i, te_i = z[f"{ds}_indices"], z[f"{qs}_indices"]
    print(f"vectors: {ds} (database) {tr_v.shape} {tr_v.dtype}, {qs} (queries) {te_v.shape} {te_v.dtype}; "
          f"dim {tr_v.shape[1]}" + ("; leave-one-out" if qs == ds else ""))
    if not (np.all(np.diff(tr_i) > 0) and np.all(np.diff(te_i) > 0)):
        print("export rows are not in ascending row order", file=sys.stderr)
        return 2
    # the queries the run reported, by test row
    q_rows = np.searchsorted(te_i, np.asarray(pq["query_indices"]))
    rows, scores = brute_force_topk(te_v[q_rows], tr_v, k, distance, exclude=q_rows if qs == ds else None)
    ours = tr_i[rows]  # database row index of each hit
    theirs = np.asarray(pq["topk_indices"], dtype=np.int64)
    same = (ours == theirs).all(axis=1)
    print(f"top-{k} identical for {int(same.sum())}/{len(same)} queries ({distance}, float64 brute force, "
          f"ties: lower database index)")
    for qi in np.flatnonzero(~same)[:10]:
        j = int(np.flatnonzero(ours[qi] != theirs[qi])[0])
        print(f"  query row {pq['query_indices'][qi]}: rank {j + 1}: brute force row {ours[qi, j]} "
              f"(score {scores[qi, j]:.17g}) vs reported row {theirs[qi, j]} "
              f"(reported score {pq['topk_scores'][qi][j]:.9g})")
    y = z[f"{qs}_labels"][q_rows]
    if "query_labels" in pq and not np.array_equal(np.asarray(pq["query_labels"]), y):
        print(f"the reported query labels differ from the exported {qs} labels", file=sys.stderr)
        return 2
    mine = metrics(y, np.asarray(z[f"{ds}_labels"])[rows], k)  # labels of the hits (rows of the export)
    ok = bool(same.all())
    print(f"  {'metric':<8} {'brute force':>12} {'reported':>12}")
    for name, v in mine.items():
        rep = res["metrics"].get(name)
        agree = rep is not None and abs(rep - v) < 1e-12
        ok &= agree
        print(f"  {name:<8} {100 * v:11.4f}% {100 * rep if rep is not None else float('nan'):11.4f}%  "
              f"{'ok' if agree else 'DIFFERENT'}")
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

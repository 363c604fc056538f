"""Figure 11: t-SNE of the database features of one collection, coloured by class.

scikit-learn and matplotlib are imported when the figure is drawn, not with this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cbmir.core.errors import CbmirError
from cbmir.evaluation.report.figures import VECTOR_SUFFIX, pyplot, save_figure
from cbmir.evaluation.report.labels import class_legend_names, dataset_class_names, dataset_display_name, dataset_task
from cbmir.evaluation.report.markdown import ReportOutput
from cbmir.evaluation.report.rows import ok_rows

__all__ = ["tsne_figure", "tsne_section"]


def tsne_figure(vectors: np.ndarray, labels: np.ndarray, path: Path, title: str, *,
                class_names: Sequence[str] | None = None, task: str = "", max_points: int = 2000, seed: int = 0,
                max_iter: int = 500) -> Path:
    """Figure 11: t-SNE of feature vectors coloured by class.

    Args:
        vectors: float32 ``(N, D)`` features (e.g. the database split of one collection).
        labels: int ``(N,)`` class labels.
        path: PNG file to write (300 dpi; its vector PDF beside it:
            :func:`~cbmir.evaluation.report.figures.save_figure`).
        max_points: at most this many points, a uniform random subsample (seeded) when N is larger.
        class_names: class names by label index; task: the label task. The legend names every class
            (:func:`~cbmir.evaluation.report.labels.class_legend_names`: ``grade N`` for ordinal labels
            named by their number).
        max_iter: t-SNE optimisation iterations (scikit-learn's minimum is 250).

    Steps: subsample; PCA to 50 dims when D > 50 (scikit-learn); ``TSNE(n_components=2,
    perplexity=min(30, (n - 1) / 3), init="pca", max_iter=max_iter, random_state=seed)`` on one
    OpenMP thread.

    Raises:
        CbmirError: fewer than 5 points.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(vectors, dtype=np.float32)
    y = np.asarray(labels)
    if len(x) < 5:
        raise CbmirError(f"t-SNE needs at least 5 points, got {len(x)}")
    rng = np.random.default_rng(seed)
    if len(x) > max_points:
        idx = np.sort(rng.choice(len(x), size=max_points, replace=False))
        x, y = x[idx], y[idx]
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, len(x) - 1), random_state=seed).fit_transform(x)
    # One OpenMP thread: on a shared, oversubscribed CPU the gradient's OpenMP threads spin-wait
    # (measured here: 49 s with the default threads vs 4 s with one, 150 points).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        emb = TSNE(n_components=2, perplexity=float(min(30.0, (len(x) - 1) / 3.0)), init="pca",
                   learning_rate="auto", max_iter=int(max_iter), random_state=seed).fit_transform(x)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 5.0))
    cmap = plt.get_cmap("tab10")
    present = np.unique(y)
    for i, (lab, name) in enumerate(zip(present, class_legend_names(present, class_names, task))):
        m = y == lab
        ax.scatter(emb[m, 0], emb[m, 1], s=6, alpha=0.7, color=cmap(i % 10), label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="class")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _classes_of(meta, dataset: str) -> dict:
    """``class_names`` and ``task`` for the legend: the collection metadata's (``extra["class_names"]``,
    ``extra["task"]``), else MedMNIST INFO's for ``dataset``."""
    extra = (getattr(meta, "extra", None) or {}) if meta is not None else {}
    return {"class_names": extra.get("class_names") or dataset_class_names(dataset),
            "task": extra.get("task") or dataset_task(dataset)}


def _open_store_for(row: dict, store_path, qdrant_url):
    """The store of the t-SNE collection: ``qdrant_url`` or ``store_path`` when given, else the row's ``store``."""
    from cbmir.search.store import open_store

    if qdrant_url:
        return open_store(qdrant_url=qdrant_url)
    if store_path:
        return open_store(store_path=store_path)
    loc = row.get("store")
    if isinstance(loc, str) and loc.startswith(("http://", "https://")):
        return open_store(qdrant_url=loc)
    if isinstance(loc, str) and loc and Path(loc).exists():
        return open_store(store_path=loc)
    raise CbmirError("no store for the t-SNE figure: pass --store-path (or --qdrant-url)")


def _tsne_row(df: pd.DataFrame, out: ReportOutput, collection: str | None) -> dict | None:
    """The results row of the t-SNE collection: ``collection``, else the 2D row with the best ACC@1
    (pretrained rows first); None (with a note when ``collection`` is not in the table) when none."""
    ok = ok_rows(df)
    if collection:
        cand = ok[ok["collection"] == collection]
        if cand.empty:
            out.notes.append(f"t-SNE: collection {collection!r} is not in the results table; figure skipped")
            return None
    else:
        cand = ok[ok["kind"] == "2d"] if (ok["kind"] == "2d").any() else ok
        cand = cand.sort_values(["random_init", "ACC@1"], ascending=[True, False])
    if cand.empty:
        return None
    return cand.iloc[0].to_dict()


def tsne_section(lines: list[str], df: pd.DataFrame, fig_dir: Path, out: ReportOutput, *, store_path, qdrant_url,
                 collection: str | None, max_points: int = 2000) -> None:
    """Figure 11: draw the t-SNE of the database (train) features of one collection of ``df`` into
    ``fig_dir`` and append it to ``lines``; a store that cannot be read skips the figure with a note
    in ``out.notes`` (a figure must not stop the report)."""
    row = _tsne_row(df, out, collection)
    if row is None:
        return
    name = str(row["collection"])
    try:
        store = _open_store_for(row, store_path, qdrant_url)
        try:
            _, vecs, pays = store.fetch(name, "train", with_vectors=True)
            meta = store.read_meta(name)
        finally:
            store.close()
    except Exception as e:  # noqa: BLE001 - a figure must not stop the report
        out.notes.append(f"t-SNE of {name}: store not readable ({e}); figure skipped")
        return
    labels = np.asarray([p["label"] for p in pays], dtype=np.int64)
    path = fig_dir / f"tsne_{name}.png"
    n = min(len(vecs), int(max_points))
    tsne_figure(vecs, labels, path,
                f"t-SNE of database features: {row['label']}\n{dataset_display_name(row['dataset'])} "
                f"{row['size']} px, {row['distance']}, {n} of {len(vecs)} points",
                max_points=max_points, **_classes_of(meta, row["dataset"]))
    out.figures.append(path)
    out.vector_figures.append(path.with_suffix(VECTOR_SUFFIX))
    caption = f"t-SNE of the database (train) features of `{name}` ({row['label']}; the paper's Figure 11)"
    lines.append(f"**{caption}.** Up to {max_points:,} database points (random subsample), PCA to "
                 f"50 dims, then t-SNE (scikit-learn, perplexity 30, 500 iterations, seed 0).\n\n"
                 f"Legend: the class names of the collection's metadata (else MedMNIST's). Vector: "
                 f"[`{path.with_suffix(VECTOR_SUFFIX).name}`](figures/{path.with_suffix(VECTOR_SUFFIX).name}).\n\n"
                 f"![t-SNE](figures/{path.name})\n")

"""The report's query galleries: per collection, its best and worst queries, each with its top-k.

For every ok row with a per-query file (:func:`cbmir.evaluation.results.load_per_query`) the ``n`` best and
``n`` worst queries are picked by :func:`pick_queries` and drawn, one row each (the query, then its top-k
with class names, scores and ✓/✗), into ``figures/gallery_<collection>.png`` by the one gallery renderer,
:func:`cbmir.evaluation.pictures.draw_gallery`.

Images come from an **image source**, a callable ``images(row, split, indices) -> {index: pixels}``
(:data:`ImageSource`: pixels as :func:`cbmir.app.images.point_pixels` returns them; ``cbmir report`` passes
:class:`cbmir.app.report_images.ReportImages`, which reads the MedMNIST file of ``data_dir`` or the
collection's recorded archive). Rows of one dataset and size share one call per split, with every row index
their galleries need, so each source file is read once, forward. A source that cannot be read (missing
file, moved archive: a :class:`~cbmir.core.errors.CbmirError` or ``OSError``) leaves its galleries out and
the section says why; the report still builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from cbmir.core.errors import CbmirError
from cbmir.evaluation.report.labels import dataset_class_names, dataset_display_name
from cbmir.evaluation.report.markdown import ReportOutput
from cbmir.evaluation.report.rows import ok_rows, results_path, sort_rows
from cbmir.evaluation.results import load_per_query, per_query_outcomes

__all__ = ["ImageSource", "DEFAULT_GALLERY_N", "QUERY_SPLIT", "DATABASE_SPLIT", "PICK_RULE", "pick_queries",
           "gallery_rows", "galleries_section"]

#: ``images(row, split, indices) -> {index: uint8 pixels}``: ``row`` a results row (dict), ``split`` ``test`` or
#: ``train``, ``indices`` the split's rows; pixels ``(H, W, 3)`` (2D) or ``(D, H, W)`` (3D). Raises CbmirError /
#: OSError when the source cannot be read. An optional method ``images.class_names(row) -> {label: name} | None``
#: gives a collection's own class names (a user archive's).
ImageSource = Callable[[Mapping, str, Sequence[int]], Mapping[int, np.ndarray]]

#: best and worst queries shown per collection, by default
DEFAULT_GALLERY_N = 3
#: the grid's protocol: test split = queries, train split = database (the per-query files record rows of these)
QUERY_SPLIT, DATABASE_SPLIT = "test", "train"
#: side of each picture of a gallery, pixels
GALLERY_TILE = 128
#: the rule of :func:`pick_queries`, as the report states it
PICK_RULE = ("**best** = highest AP@k of the query, then the most relevant images in its top k, then the lower "
             "test row; **worst** = lowest AP@k, then the fewest relevant images, then the lower test row (a query "
             "is never both)")


def pick_queries(per_query: Mapping, n: int = DEFAULT_GALLERY_N) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best and ``n`` worst queries of a per-query record (:func:`load_per_query`), by :data:`PICK_RULE`.

    Returns:
        ``(best, worst)``: int64 positions into the record's arrays (not test rows), best first / worst first;
        ``worst`` excludes the ``best`` positions, so it is shorter when there are fewer than ``2 n`` queries.

    Raises:
        CbmirError: ``n`` below 1.
    """
    if n < 1:
        raise CbmirError(f"gallery size {n}: give at least 1 best / worst query per collection (--gallery-n)")
    ap = per_query_outcomes(per_query)[f"mAP@{int(per_query['k'])}"]
    rows = np.asarray(per_query["query_indices"], dtype=np.int64)
    labels = np.asarray(per_query["query_labels"])
    hits = (np.asarray(per_query["topk_labels"]) == labels[:, None]).sum(axis=1)
    best = np.lexsort((rows, -hits, -ap))[:n]  # the last key sorts first
    taken = set(best.tolist())
    worst = [i for i in np.lexsort((rows, hits, ap)) if i not in taken][:n]
    return best.astype(np.int64), np.asarray(worst, dtype=np.int64)


@dataclass
class _Cell:
    """One collection's gallery to draw: its results row, per-query record and picks."""

    row: dict
    pq: dict
    best: np.ndarray
    worst: np.ndarray

    def needed(self) -> dict[str, set[int]]:
        """Rows of each split its gallery shows."""
        picks = np.concatenate([self.best, self.worst])
        return {QUERY_SPLIT: {int(i) for i in self.pq["query_indices"][picks]},
                DATABASE_SPLIT: {int(i) for i in np.asarray(self.pq["topk_indices"])[picks].ravel()}}


def gallery_rows(cell_row: Mapping, pq: Mapping, best: np.ndarray, worst: np.ndarray,
                 pixels: Mapping[str, Mapping[int, np.ndarray]],
                 class_names: Mapping[int, str] | None = None) -> list[list]:
    """The gallery rows of one collection: per picked query (best first, then worst) its query tile and its
    top-k hit tiles (:func:`cbmir.evaluation.pictures.query_tile` / ``hit_tile``; volumes as their middle slice).

    Args:
        cell_row: the results row (``dataset``, ``kind``).
        pq: its per-query record; best / worst: :func:`pick_queries`.
        pixels: ``{split: {row: pixels}}`` holding every row shown.
        class_names: ``{label: name}`` of the collection (a user archive's, from its metadata); None: the MedMNIST
            names of ``cell_row["dataset"]``; a label without a name shows as ``class N``.
    """
    from cbmir.evaluation.pictures import display_image, hit_tile, query_tile

    names = dict(class_names) if class_names else dict(enumerate(dataset_class_names(str(cell_row["dataset"])) or []))
    is_3d = cell_row.get("kind") == "3d"
    k = int(pq["k"])
    ap = per_query_outcomes(pq)[f"mAP@{k}"]
    relevant = (np.asarray(pq["topk_labels"]) == np.asarray(pq["query_labels"])[:, None]).sum(axis=1)

    def name(label: int) -> str | None:
        return None if label < 0 else names.get(label, f"class {label}")

    rows = []
    for which, picks in (("best", best), ("worst", worst)):
        for j, p in enumerate(picks):
            q_row, q_label = int(pq["query_indices"][p]), int(pq["query_labels"][p])
            tiles = [query_tile(display_image(pixels[QUERY_SPLIT][q_row], is_3d), what=f"{QUERY_SPLIT} row {q_row}",
                                label=q_label, class_name=name(q_label),
                                heading=f"{which} {j + 1}: AP@{k} {100 * ap[p]:.0f}%, {relevant[p]}/{k}")]
            for r in range(k):
                d_row, d_label = int(pq["topk_indices"][p, r]), int(pq["topk_labels"][p, r])
                tiles.append(hit_tile(display_image(pixels[DATABASE_SPLIT][d_row], is_3d), rank=r + 1,
                                      split=DATABASE_SPLIT, index=d_row, label=d_label, class_name=name(d_label),
                                      score=float(pq["topk_scores"][p, r]), query_label=q_label))
            rows.append(tiles)
    return rows


def _cells(ok: pd.DataFrame, results_dir: Path, n: int, skipped: list[str]) -> list[_Cell]:
    """The ok rows with a readable per-query file, with their picks (the others named in ``skipped``)."""
    cells = []
    for r in sort_rows(ok).to_dict("records"):
        f = r.get("per_query_file")
        if not isinstance(f, str) or not f or not results_path(f, results_dir).is_file():
            skipped.append(f"`{r['collection']}`: no per-query file (run the grid with --save-per-query)")
            continue
        if bool(r.get("leave_one_out")):
            skipped.append(f"`{r['collection']}`: leave-one-out run (its query split is not the test split)")
            continue
        pq = load_per_query(results_path(f, results_dir))
        cells.append(_Cell(r, pq, *pick_queries(pq, n)))
    return cells


def _read_pixels(cells: list[_Cell], images: ImageSource, missing: list[str]) -> dict[tuple, dict]:
    """``{(dataset, size): {split: {row: pixels}}}`` for the cells, one ``images`` call per (dataset, size,
    split) with the union of the rows; a source that fails is named in ``missing`` and left out."""
    groups: dict[tuple, list[_Cell]] = {}
    for c in cells:
        groups.setdefault((str(c.row["dataset"]), int(c.row["size"])), []).append(c)
    out = {}
    for key, group in groups.items():
        needed = [c.needed() for c in group]
        try:
            out[key] = {split: dict(images(group[0].row, split, sorted(set().union(*(nd[split] for nd in needed)))))
                        for split in (QUERY_SPLIT, DATABASE_SPLIT)}
        except (CbmirError, OSError) as exc:
            missing.append(f"{dataset_display_name(key[0])} {key[1]} px ({len(group)} collection"
                           f"{'s' if len(group) > 1 else ''}): images not readable — {exc}")
    return out


def _class_names(images, row: Mapping) -> Mapping[int, str] | None:
    """The collection's own class names when the image source knows them (``images.class_names(row)``, e.g. a
    user archive's), else None (MedMNIST's are used)."""
    fn = getattr(images, "class_names", None)
    if fn is None:
        return None
    try:
        return fn(row)
    except (CbmirError, OSError):
        return None


def galleries_section(lines: list[str], out: ReportOutput, df: pd.DataFrame, results_dir: Path, fig_dir: Path, *,
                      images: ImageSource | None, n: int = DEFAULT_GALLERY_N) -> None:
    """"Query galleries": for each ok row with a per-query file, ``figures/gallery_<collection>.png`` (its ``n``
    best and ``n`` worst queries, :func:`pick_queries`), linked from the section; with no ``images`` source, or
    a source that cannot be read, the section says which galleries are missing and why."""
    from cbmir.evaluation.pictures import draw_gallery

    lines.append("## Query galleries: best and worst queries per collection\n")
    lines.append(f"Per collection, its {n} best and {n} worst queries ({PICK_RULE}; AP@k as defined above, k of "
                 "the run), one row each: the query (test split), then its top-k from the database (train split) "
                 "with class name, score (cosine similarity, higher is closer; Euclidean distance, lower is "
                 "closer) and ✓ (same class as the query) / ✗. 3D volumes show their middle axial slice.\n")
    skipped: list[str] = []
    cells = _cells(ok_rows(df), results_dir, n, skipped)
    missing: list[str] = []
    if images is None:
        if cells:
            missing.append("no image source was given (`build_report(..., images=...)`; `cbmir report` reads "
                           "the MedMNIST files of `CBMIR_DATA_DIR` or the collections' archives)")
        pixels = {}
    else:
        pixels = _read_pixels(cells, images, missing)
    drawn = 0
    for c in cells:
        px = pixels.get((str(c.row["dataset"]), int(c.row["size"])))
        if px is None:
            continue
        name = str(c.row["collection"])
        path = fig_dir / f"gallery_{name}.png"
        title = (f"{name} — {c.row['label']}, {c.row['distance']}: {len(c.best)} best and {len(c.worst)} worst "
                 f"of {len(c.pq['query_indices'])} queries by AP@{int(c.pq['k'])}")
        draw_gallery(gallery_rows(c.row, c.pq, c.best, c.worst, px, _class_names(images, c.row)), title,
                     tile=GALLERY_TILE).save(path)
        out.galleries.append(path)
        lines.append(f"### {dataset_display_name(c.row['dataset'])} {int(c.row['size'])} px, {c.row['label']}, "
                     f"{c.row['distance']}\n\n![gallery of {name}](figures/{path.name})\n")
        drawn += 1
    if not cells:
        lines.append("No gallery: no ok row has a per-query file.\n")
    if missing:
        out.notes.append(f"query galleries: {len(cells) - drawn} of {len(cells)} missing (their section says why)")
        lines.append(f"**Galleries missing** ({len(cells) - drawn} of {len(cells)}):\n")
        lines.extend(f"- {m}" for m in missing)
        lines.append("")
    if skipped:
        lines.append("Rows without a gallery:\n")
        lines.extend(f"- {s}" for s in skipped)
        lines.append("")

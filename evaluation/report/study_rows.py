"""Our rows beside the study's, cell by cell: one wide table per metric for the report (and the README).

For every (dataset, size) cell of a results table: the majority-class rate, each of our models, and the
study's published value of each of its nine models at the same dataset and size
(:func:`cbmir.evaluation.reference.load_published`; ``—`` where the study has no such cell, e.g.
VesselMNIST3D). The study's models ran at its own input policy (``native``: 28 -> 32 px for its CNNs, 224 px
for its foundation models), so a row of ours at another input size is compared with them as a different
configuration, not as the same model.
"""

from __future__ import annotations

import pandas as pd

from cbmir.evaluation.reference import load_published

MAJORITY = "majority class (constant answer)"
STUDY_PREFIX = "study: "


def side_by_side(df: pd.DataFrame, distance: str = "cosine", metric: str = "ACC@1") -> pd.DataFrame:
    """Rows: the majority-class rate, our models (report order), then ``study: <model>``; columns: ``Model``
    and one ``<Dataset> <size>`` column per cell of ours (percent; NaN where a row has no value).

    Args:
        df: :func:`cbmir.evaluation.report.prepare_results` output (``label``, ``dataset``, ``size``, ``status``,
            ``distance``, ``majority_class_rate`` and the metric, percent).
        distance: our rows of this distance only (the study's are cosine).
        metric: one of the study's metrics (``mAP@5`` ... ``ACC@5``).

    Returns:
        The wide table (empty when no ok row has ``distance``).
    """
    from cbmir.evaluation.report.labels import PAPER_MODEL_ORDER as _PAPER_MODEL_ORDER
    from cbmir.evaluation.report.labels import dataset_display_name
    from cbmir.evaluation.report.labels import dataset_order as _dataset_order
    from cbmir.evaluation.report.labels import model_order as _model_order

    ok = df[(df["status"].astype(str) == "ok") & (df["distance"] == distance)]
    if ok.empty:
        return pd.DataFrame(columns=["Model"])
    cells = sorted({(str(d).lower(), int(s)) for d, s in zip(ok["dataset"], ok["size"])},
                   key=lambda c: (_dataset_order(c[0]), c[1]))
    col = {c: f"{dataset_display_name(c[0])} {c[1]}" for c in cells}
    rows: dict[str, dict[str, float]] = {MAJORITY: {}}
    for r in ok.to_dict("records"):
        c = (str(r["dataset"]).lower(), int(r["size"]))
        rows[MAJORITY].setdefault(col[c], float(r["majority_class_rate"]))
        rows.setdefault(str(r["label"]), {})[col[c]] = float(r[metric])
    pub = load_published()
    for model in _PAPER_MODEL_ORDER:
        got = pub[pub["model"] == model]
        vals = {col[c]: float(v) for d, s, v in zip(got["dataset"], got["size"], got[metric])
                if (c := (str(d).lower(), int(s))) in col}
        if vals:
            rows[STUDY_PREFIX + model] = vals
    ours = sorted((k for k in rows if k != MAJORITY and not k.startswith(STUDY_PREFIX)), key=_model_order)
    order = [MAJORITY, *ours, *(k for k in rows if k.startswith(STUDY_PREFIX))]
    table = pd.DataFrame([{"Model": k, **rows[k]} for k in order], columns=["Model", *col.values()])
    return table


def side_by_side_section(df: pd.DataFrame, distances, markdown_table) -> list[str]:
    """Report lines: the :func:`side_by_side` ACC@1 and mAP@5 tables for each distance in ``distances``."""
    lines = ["## Our rows beside the study's (same datasets and sizes)\n",
             "Each column is one dataset and size we ran; the study's rows are its published values for the same "
             "cell (`—`: the study has no such cell). The study ran its CNNs at the native input policy "
             "(28 px upsampled to 32 px) and its foundation models at 224 px; `[input N]` rows of ours resize "
             "every image (3D: every slice) to N x N instead.\n"]
    for dist in distances:
        for metric in ("ACC@1", "mAP@5"):
            t = side_by_side(df, dist, metric)
            if len(t) > 1:
                lines.append(f"### {metric}, {dist} (percent)\n")
                lines.append(markdown_table(t))
    return lines

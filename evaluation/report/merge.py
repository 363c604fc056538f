"""One results table from several (grids run in parallel or on different machines)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cbmir.core.errors import CbmirError
from cbmir.evaluation.report.rows import results_path
from cbmir.evaluation.results import KEY, read_results

__all__ = ["read_results_tables"]


def read_results_tables(paths: Sequence[str | os.PathLike]) -> tuple[pd.DataFrame, list[str]]:
    """One results table from several (e.g. grids run in parallel or on different machines).

    Each table is read with :func:`cbmir.evaluation.results.read_results`; relative ``per_query_file`` paths are
    made absolute against their own table's folder; a table given twice (same resolved path) is read
    once. Where two tables hold the same cell (:data:`cbmir.evaluation.results.KEY`), an ``ok`` row wins over
    one of another status (``failed``); among rows of the same status the later table's row wins.

    Returns:
        (table, notes): ``notes`` names each cell found in more than one table and whose row is used.

    Raises:
        CbmirError: a path is missing or not a results table (names the path).
    """
    frames, seen = [], set()
    for p in paths:
        rp = Path(p)
        if rp.is_dir():
            raise CbmirError(f"--results {rp} is a directory; give the results CSV/Parquet file of `cbmir "
                             f"benchmark` (e.g. {rp / 'results.csv'})")
        if not rp.is_file():
            raise CbmirError(f"results table {rp} does not exist; run `cbmir benchmark --results {rp}` first, "
                             "or omit --results for the published tables only")
        if rp.resolve() in seen:
            continue
        seen.add(rp.resolve())
        t = read_results(rp)
        t["per_query_file"] = [results_path(f, rp.parent).resolve().as_posix() if isinstance(f, str) and f else f
                               for f in t["per_query_file"]]
        t["_table"] = str(rp)
        frames.append(t)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["_pos"] = np.arange(len(df))
    df["_last"] = df.groupby(list(KEY), sort=False)["_pos"].transform("max")
    multi = df.duplicated(list(KEY), keep=False)
    # the row kept for a cell: the last of its ok rows, else the last row
    ranked = df.assign(_is_ok=df["status"] == "ok").sort_values(["_is_ok", "_pos"], kind="stable")
    kept = ranked.index[~ranked.duplicated(list(KEY), keep="last")]
    df = df.loc[sorted(kept, key=lambda i: df.at[i, "_pos"])]
    notes = []
    for r in df[multi.loc[df.index]].to_dict("records"):
        which = ("the row of the later table is used" if r["_pos"] == r["_last"]
                 else f"the ok row of {r['_table']} is used, not a later table's non-ok row")
        notes.append(f"cell {r['dataset']}@{r['size']} {r['model']}/{r['backend']} {r['distance']}"
                     f"{' random-init' if r['random_init'] else ''} is in more than one table; {which}")
    df = df.drop(columns=["_table", "_pos", "_last"]).reset_index(drop=True)
    return df, notes

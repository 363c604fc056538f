"""Writing the report's Markdown: pipe tables, number formats, and what the report wrote."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

__all__ = ["ReportOutput", "markdown_table", "emit", "fmt", "fmt_p"]


@dataclass
class ReportOutput:
    """What :func:`build_report` wrote: the Markdown file, the PNG figures (300 dpi) and their vector copies
    (PDF, same names), the query galleries (PNG only: pictures of images), notes (skipped parts), and the
    tables as DataFrames (keyed by section)."""

    markdown: Path
    figures: list[Path] = field(default_factory=list)
    vector_figures: list[Path] = field(default_factory=list)
    galleries: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def fmt(v, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, NaN / None as ``—``, booleans as yes / no, text
    with ``|`` escaped and newlines as spaces."""
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}f}"
    s = str(v)
    return "—" if s in ("nan", "None") else s.replace("|", "\\|").replace("\n", " ")


def fmt_p(v) -> str:
    """A p-value: 3 decimals, 2 significant digits below 0.001, ``—`` for NaN / None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def markdown_table(df: pd.DataFrame, digits: int = 2, formats: dict[str, Any] | None = None,
                   signed: Iterable[str] = ()) -> str:
    """A pipe table of ``df``: floats with ``digits`` decimals, NaN as ``—``; ``formats`` maps a
    column to a function value -> str; columns in ``signed`` get an explicit sign (differences)."""
    formats = dict(formats or {})
    signed = set(signed)
    if df is None or df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
                            else "---" for c in cols) + "|"]
    for rec in df.to_dict("records"):
        cells = []
        for c in cols:
            v = rec[c]
            if c in formats:
                cells.append(formats[c](v))
            elif c in signed and isinstance(v, (float, np.floating)) and not math.isnan(v):
                cells.append(f"{v:+.{digits}f}")
            else:
                cells.append(fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def emit(lines: list[str], out: ReportOutput, key: str, table: pd.DataFrame, heading: str, **table_format) -> bool:
    """Append ``heading`` and ``table`` (Markdown, :func:`markdown_table` with ``table_format``) to
    ``lines`` and keep it as ``out.tables[key]``; nothing when the table is empty. Returns whether it
    was emitted."""
    if table.empty:
        return False
    out.tables[key] = table
    lines.append(heading)
    lines.append(markdown_table(table, **table_format))
    return True

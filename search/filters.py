"""Payload filters: which database points a search may return.

A filter is a mapping ``{field: value}`` or ``{field: [value, ...]}`` over payload fields
(``label``, ``image_id``, an archive's manifest columns ...): a point matches when, for every field,
its payload value equals the value (or one of the values). ``{"label": [0, 2]}`` keeps the points of
classes 0 and 2. The split is always part of the selection (:class:`Selection`); the engines turn a
selection into their own filter (Qdrant ``must`` of ``match`` / ``match any`` conditions), so filtered
search stays exact: only matching points are scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from cbmir.core.errors import CbmirError
from cbmir.core.splits import SPLITS

#: payload fields that a filter may not name: they are fixed by the search itself
RESERVED_FIELDS = ("split",)
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
Scalar = int | str | bool


@dataclass(frozen=True)
class Selection:
    """The points of one split that match a payload filter.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        match: ``((field, (value, ...)), ...)`` sorted by field; a point matches when each field's
            payload value is one of its values. Empty: every point of the split.
    """

    split: str
    match: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    def __str__(self) -> str:
        if not self.match:
            return self.split
        cond = ", ".join(f"{f} in {list(v)}" if len(v) > 1 else f"{f} = {v[0]!r}" for f, v in self.match)
        return f"{self.split} [{cond}]"


def _scalar(field: str, v: Any) -> Scalar:
    if isinstance(v, bool) or isinstance(v, (int, str)):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise CbmirError(f"filter field {field!r}: value {v!r} is not an integer, string or boolean; give e.g. "
                     '{"label": [0, 2]} or {"label": 1}')


def parse_filter(flt: Mapping[str, Any] | None) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    """Validate a filter mapping and return its canonical, hashable form (see :class:`Selection`).

    Raises:
        CbmirError: not a mapping, a reserved or malformed field name, an empty list, or a value that is
            not an integer, string or boolean.
    """
    if flt is None:
        return ()
    if not isinstance(flt, Mapping):
        raise CbmirError(f"a filter must be a JSON object such as {{\"label\": [0, 2]}}; got {type(flt).__name__}")
    out = []
    for field, val in flt.items():
        if not isinstance(field, str) or not _FIELD.fullmatch(field):
            raise CbmirError(f"filter field {field!r} is not a payload field name (letters, digits, '_', '.', '-')")
        if field in RESERVED_FIELDS:
            raise CbmirError(f"filter field {field!r} is set by the search itself: use database_split instead")
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        if not vals:
            raise CbmirError(f"filter field {field!r}: empty list of values (nothing could match)")
        out.append((field, tuple(dict.fromkeys(_scalar(field, v) for v in vals))))
    return tuple(sorted(out))


def selection(split: str, flt: Mapping[str, Any] | tuple | None = None) -> Selection:
    """:class:`Selection` of ``split`` and filter ``flt`` (a mapping, or the canonical tuple).

    Raises:
        CbmirError: unknown split; invalid filter (:func:`parse_filter`).
    """
    if split not in SPLITS:
        raise CbmirError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    match = flt if isinstance(flt, tuple) else parse_filter(flt)
    return Selection(split, match)


def as_selection(where: str | Selection | None) -> Selection | None:
    """A store method's ``split`` argument (a split name, a :class:`Selection` or None) as a selection."""
    if where is None or isinstance(where, Selection):
        return where
    return Selection(where)


def matches(payload: Mapping[str, Any], sel: Selection) -> bool:
    """True when ``payload`` is in ``sel`` (the rule the engines apply, for checks and brute force)."""
    if payload.get("split") != sel.split:
        return False
    return all(payload.get(f) in vals for f, vals in sel.match)

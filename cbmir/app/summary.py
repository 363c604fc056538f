"""The vote of a query's top-k: which class the retrieved images point to (DESIGN.md §2, MV@k).

One function for every entry point (the HTTP service's ``summary``, ``cbmir search``, the gallery and the
web page), so the vote shown is the one the study's mMV@k counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence


@dataclass
class VoteSummary:
    """The class vote of one top-k.

    Attributes:
        majority_label: the label with the most votes among labelled hits; a tie goes to the tied label
            of the best-ranked hit. None when no hit is labelled.
        majority_class_name: its class name.
        votes: ``{class name: hits}`` over labelled hits, most votes first (ties: lower label first).
        query_label_in_majority: whether the query's label is among the labels tied for the most votes
            (the study's MV@k = 1); None when the query has no known label (a file, a vector, label -1).
        tied_labels: every label with the most votes, ascending.
    """

    majority_label: int | None
    majority_class_name: str | None
    votes: dict[str, int] = field(default_factory=dict)
    query_label_in_majority: bool | None = None
    tied_labels: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def vote_summary(hits: Sequence, query_label: int | None = None) -> VoteSummary:
    """Count the labels of ``hits`` (:class:`cbmir.app.searching.Hit`, rank order).

    Unlabelled hits (label -1) do not vote. ``query_label_in_majority`` follows MV@k exactly: 1 when the
    query label is among the labels that tie for the most votes.
    """
    counts: dict[int, int] = {}
    names: dict[int, str] = {}
    for h in hits:
        if h.label is None or int(h.label) < 0:
            continue
        lab = int(h.label)
        counts[lab] = counts.get(lab, 0) + 1
        names.setdefault(lab, h.class_name if h.class_name is not None else str(lab))
    if not counts:
        return VoteSummary(None, None, {}, None, [])
    top = max(counts.values())
    tied = sorted(lab for lab, n in counts.items() if n == top)
    majority = next(int(h.label) for h in hits if h.label is not None and int(h.label) in tied)
    order = sorted(counts, key=lambda lab: (-counts[lab], lab))
    known = query_label is not None and int(query_label) >= 0
    return VoteSummary(majority_label=majority, majority_class_name=names[majority],
                       votes={names[lab]: counts[lab] for lab in order},
                       query_label_in_majority=(int(query_label) in tied) if known else None,
                       tied_labels=tied)

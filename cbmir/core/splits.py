"""Split names and their codes (the high bits of a point id, :func:`cbmir.search.schema.point_id`)."""

from __future__ import annotations

#: MedMNIST's official splits; in the study's protocol ``train`` is the database and ``test`` the queries.
SPLITS = ("train", "val", "test")
#: split -> code stored in the high bits of every point id (id order within a split is row order)
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
#: code -> split
CODE_SPLITS = {v: k for k, v in SPLIT_CODES.items()}

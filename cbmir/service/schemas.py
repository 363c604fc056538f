"""Request and response bodies of the HTTP service (pydantic; they make ``/openapi.json``).

Field names are the API (issue 14); the rules behind them (k range, exclude-self, filters, which query
kinds) are the application layer's (:mod:`cbmir.app.searching`), so a value these models accept may
still be refused there with a 4xx naming the valid values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PointRef(BaseModel):
    """A stored point by split and row."""

    model_config = ConfigDict(extra="forbid")
    split: str = Field(..., description="train, val or test", examples=["test"])
    index: int = Field(..., description="row in the split, from 0", examples=[0])


class SearchBody(BaseModel):
    """``POST /api/collections/{name}/search``: exactly one of ``point``, ``point_id``, ``vector``."""

    model_config = ConfigDict(extra="forbid")
    point: PointRef | None = Field(None, description="a stored point as the query")
    point_id: int | None = Field(None, description="a stored point by id")
    vector: list[float] | None = Field(None, max_length=1 << 20,
                                       description="a query vector of the collection's dimension")
    k: int = Field(5, description="results: 1 .. number of database points")
    database_split: str = Field("train", description="the split searched")
    filter: dict[str, Any] | None = Field(None, description='payload filter, e.g. {"label": [0, 2]}',
                                          examples=[{"label": [0, 1]}])
    exclude_self: bool | None = Field(None, description="leave a stored query out of its results "
                                                        "[default: true for a stored query]")


class QueryOut(BaseModel):
    kind: Literal["point", "vector", "image", "file"]
    split: str | None = None
    index: int | None = None
    point_id: int | None = None
    label: int | None = None
    class_name: str | None = None
    filename: str | None = Field(None, description="the uploaded file's name, as sent (text only)")


class HitOut(BaseModel):
    rank: int
    point_id: int
    split: str
    index: int
    label: int
    class_name: str | None
    score: float = Field(..., description="cosine similarity (higher is closer) or Euclidean distance")
    payload: dict[str, Any]
    image_url: str


class SummaryOut(BaseModel):
    majority_label: int | None
    majority_class_name: str | None
    votes: dict[str, int] = Field(..., description="hits per class name, labelled hits only")
    query_label_in_majority: bool | None = Field(..., description="MV@k of this query; null when the query "
                                                                   "has no known label")


class SearchOut(BaseModel):
    collection: str
    k: int
    distance: str
    database_split: str
    filter: dict[str, list[Any]] | None
    excluded_self: bool
    query: QueryOut
    hits: list[HitOut]
    summary: SummaryOut
    notes: list[str] = []


class CollectionOut(BaseModel):
    name: str
    dataset: str
    size: int
    model: str
    family: str | None
    display_name: str | None = None
    dim: int
    distance: str
    engine: str
    counts: dict[str, int]
    class_names: dict[str, str]
    random_init: bool
    baseline: bool
    is_3d: bool


class CollectionDetailOut(CollectionOut):
    metadata: dict[str, Any]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str
    engine: str
    detail: str | None = None


class ErrorOut(BaseModel):
    detail: Any

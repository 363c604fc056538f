"""The routes: parse, call the application layer, render JSON / PNG (issue 14's paths and fields)."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cbmir.app import SearchRequest, collection_info, search
from cbmir.app.collections import require_collection
from cbmir.app.images import DEFAULT_SIZE, MAX_SIZE, MIN_SIZE, point_png
from cbmir.app.summary import vote_summary
from cbmir.app.uploads import add_upload, search_upload
from cbmir.core.errors import CbmirError
from cbmir.service.schemas import (CollectionDetailOut, CollectionOut, ErrorOut, HealthOut, SearchBody,
                                   SearchOut)

router = APIRouter()
ERRORS = {400: {"model": ErrorOut, "description": "invalid input (the message names it and the valid values)"},
          401: {"model": ErrorOut, "description": "missing or wrong API key"},
          404: {"model": ErrorOut, "description": "unknown collection or point"},
          503: {"model": ErrorOut, "description": "store busy or short of resources; retry later"}}
NameParam = Path(..., description="collection name (GET /api/collections)", max_length=200)


def image_url(name: str, point_id: int) -> str:
    """Where the service renders a stored point's image."""
    return f"/api/collections/{name}/points/{point_id}/image"


def search_out(answer) -> dict:
    """The JSON body of a search answer (one query): hits with image URLs and the class vote."""
    q, hits = answer.queries[0], answer.hits[0]
    query = {"kind": q.kind, "split": q.split, "index": q.index, "point_id": q.point_id, "label": q.label,
             "class_name": q.class_name, "filename": q.source if q.kind == "file" else None}
    return {"collection": answer.collection, "k": answer.k, "distance": answer.distance,
            "database_split": answer.database_split, "filter": answer.filter,
            "excluded_self": answer.excluded_self, "query": query,
            "hits": [{"rank": h.rank, "point_id": h.point_id, "split": h.split, "index": h.index, "label": h.label,
                      "class_name": h.class_name, "score": h.score, "payload": h.payload,
                      "image_url": image_url(answer.collection, h.point_id)} for h in hits],
            "summary": {k: v for k, v in vote_summary(hits, q.label).to_dict().items() if k != "tied_labels"},
            "notes": answer.notes}


@router.get("/health", response_model=HealthOut, response_model_exclude_none=True,
            responses={503: {"model": HealthOut}})
def health(request: Request):
    """Whether the store can be reached: 200 ``ok``, or 503 ``unavailable`` with the reason."""
    import cbmir

    app = request.app.state.app
    engine = "qdrant-server" if app.settings.qdrant_url else "qdrant-edge"
    try:
        with app.using_store() as store:
            engine = store.engine
            store.list_collections()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store is "unavailable"
        detail = str(exc) if isinstance(exc, CbmirError) else f"the store cannot be reached ({type(exc).__name__})"
        return JSONResponse({"status": "unavailable", "version": cbmir.__version__, "engine": engine,
                             "detail": detail}, status_code=503)
    return {"status": "ok", "version": cbmir.__version__, "engine": engine}


@router.get("/api/collections", response_model=list[CollectionOut], responses=ERRORS)
def list_collections(request: Request):
    """Every collection: dataset, size, model, family, dim, distance, engine, points per split, class names."""
    app = request.app.state.app
    with app.using_store() as store:
        return [collection_info(store, n) for n in store.list_collections()]


@router.get("/api/collections/{name}", response_model=CollectionDetailOut, responses=ERRORS)
def get_collection(request: Request, name: str = NameParam):
    """One collection, with its full metadata (model, weights, preprocessing, layout, source facts)."""
    from dataclasses import asdict

    app = request.app.state.app
    with app.using_store() as store:
        info = collection_info(store, name)
        return {**info, "metadata": asdict(store.meta(name))}


@router.post("/api/collections/{name}/search", response_model=SearchOut, responses=ERRORS)
def search_json(body: SearchBody, request: Request, name: str = NameParam):
    """Top-k by a stored point (``point`` or ``point_id``) or a ``vector``."""
    app = request.app.state.app
    req = SearchRequest(collection=name, k=body.k, database_split=body.database_split, filter=body.filter,
                        exclude_self=body.exclude_self,
                        points=[(body.point.split, body.point.index)] if body.point is not None else None,
                        point_ids=[body.point_id] if body.point_id is not None else None,
                        vectors=body.vector)
    with app.using_store():
        return search_out(search(app, req))


def _parse_filter(text: str | None):
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CbmirError(f"filter {text[:200]!r} is not JSON ({exc.msg}); give e.g. '{{\"label\": [0, 2]}}'") from None


@router.post("/api/collections/{name}/search/image", response_model=SearchOut, responses={**ERRORS, 413: {
    "model": ErrorOut, "description": "file over the upload limit"}})
async def search_image(request: Request, name: str = NameParam,
                       file: UploadFile = File(..., description="PNG, JPEG, TIFF, BMP, DICOM; NIfTI or .npy "
                                                                "for 3D collections"),
                       k: int = Form(5), database_split: str = Form("train"),
                       filter: str | None = Form(None, description='JSON, e.g. {"label": [0, 2]}')):
    """Top-k for an uploaded image or volume, decoded with the ingest pixel rules and embedded with the
    collection's own extractor."""
    app = request.app.state.app
    data = await file.read()
    req = SearchRequest(collection=name, k=k, database_split=database_split, filter=_parse_filter(filter))

    def run():
        with app.using_store():
            return search_out(search_upload(app, req, data, file.filename))
    return await run_in_threadpool(run)


@router.get("/api/collections/{name}/points/{point_id}/image", response_class=Response,
            responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "the point's image as PNG"}})
def point_image(request: Request, name: str = NameParam,
                point_id: int = Path(..., ge=0, le=(1 << 63) - 1, description="point id (a hit's point_id)"),
                size: int = Query(DEFAULT_SIZE, ge=MIN_SIZE, le=MAX_SIZE, description="longer side, pixels"),
                view: Literal["middle", "montage"] = Query("middle", description="3D: middle axial slice or "
                                                                                "a montage of axial slices")):
    """The stored point's image, rendered from its source (MedMNIST row or archive file)."""
    app = request.app.state.app
    with app.using_store() as store:
        require_collection(store, name)
        png = point_png(app, name, point_id, size=size, view=view)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.post("/api/collections/{name}/points", responses={**ERRORS, 413: {
    "model": ErrorOut, "description": "file over the upload limit"}})
async def add_point(request: Request, name: str = NameParam,
                    file: UploadFile = File(..., description="PNG, JPEG, TIFF, BMP, DICOM; NIfTI or .npy for 3D"),
                    label: str | None = Form(None, description="a class of the collection, by name or id"),
                    split: str | None = Form(None, description="train (the database; default), test or val"),
                    key: str | None = Form(None, max_length=500, description="stable key (default: the "
                                                                             "content's SHA-256)"),
                    meta: str | None = Form(None, description='extra payload as JSON, e.g. {"site": "A"}')):
    """Add an image to a user-archive collection (embedded with the collection's extractor); behind the API
    key when one is set."""
    app = request.app.state.app
    data = await file.read()
    extra = _parse_json_object(meta, "meta")
    lab = int(label) if label is not None and label.strip().lstrip("-").isdigit() else label

    def run():
        from dataclasses import asdict

        with app.using_store():
            return asdict(add_upload(app, name, data, file.filename, key=key, label=lab, split=split,
                                     meta=extra))
    return await run_in_threadpool(run)


@router.delete("/api/collections/{name}/points/{point_id}", responses=ERRORS)
def delete_point(request: Request, name: str = NameParam,
                 point_id: int = Path(..., ge=0, le=(1 << 63) - 1, description="point id (a hit's point_id)")):
    """Delete one point of a user-archive collection; behind the API key when one is set."""
    from dataclasses import asdict

    from cbmir.app.items import delete_points

    app = request.app.state.app
    with app.using_store() as store:
        require_collection(store, name)
        return asdict(delete_points(app, name, point_ids=[point_id]))


def _parse_json_object(text: str | None, field: str) -> dict | None:
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CbmirError(f"{field} {text[:200]!r} is not JSON ({exc.msg}); give an object such as "
                         '{"site": "A"}') from None
    if not isinstance(value, dict):
        raise CbmirError(f"{field} must be a JSON object such as {{\"site\": \"A\"}}")
    return value

"""The FastAPI application: :func:`create_app` wires the application layer (:class:`cbmir.app.App`), the
routes, the error answers and the middleware. No search logic lives here.

Error answers (JSON ``{"detail": ...}``, never a traceback, never 5xx except 503 "try later"):

| cause | status |
|---|---|
| :class:`~cbmir.core.errors.NotFoundError` (collection, point) | 404 |
| other :class:`~cbmir.core.errors.CbmirError` (bad k, split, filter, file ...) | 400 |
| request body or parameter of the wrong type / shape | 422 (``detail`` lists each field) |
| body over ``max_upload_bytes`` | 413 |
| missing / wrong API key | 401 |
| :class:`~cbmir.core.errors.StoreUnavailableError` (server unreachable, collection held by another process), memory / file-system trouble | 503 with ``Retry-After`` |
| anything else | 400 with an error id (logged with its traceback) |
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from cbmir.core.errors import CbmirError, NotFoundError, StoreUnavailableError
from cbmir.service.config import ServiceConfig
from cbmir.service.middleware import ApiKey, BodyLimit, CatchAll

log = logging.getLogger("cbmir.service")

#: the web page (issue 15): ``index.html`` and its assets, served at ``/`` and ``/static``
STATIC_DIR = Path(__file__).resolve().parent / "static"


def cbmir_error_response(exc: CbmirError) -> JSONResponse:
    """The JSON answer of a user-facing error (status by kind: 404 / 503 / 400)."""
    if isinstance(exc, NotFoundError):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    if isinstance(exc, StoreUnavailableError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"detail": str(exc)}, status_code=400)


def create_app(app_ctx, config: ServiceConfig | None = None) -> FastAPI:
    """The service over ``app_ctx`` (:class:`cbmir.app.App`: settings, store, embedders).

    Args:
        app_ctx: the application context; the service does not close it (the caller does).
        config: :class:`~cbmir.service.config.ServiceConfig` (API key, upload limit, idle release).
    """
    import cbmir
    from cbmir.service.routes import router

    config = config or ServiceConfig()
    api = FastAPI(title="cbmir search service", version=cbmir.__version__,
                  description="Exact top-k content-based medical image retrieval over cbmir collections "
                              "(by stored point, vector or uploaded image), with the retrieved images.")
    api.state.app = app_ctx
    api.state.config = config

    @api.exception_handler(CbmirError)
    async def _cbmir_error(request: Request, exc: CbmirError):
        return cbmir_error_response(exc)

    api.include_router(router)

    @api.get("/", include_in_schema=False)
    def index():
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return JSONResponse({"service": "cbmir", "docs": "/docs", "openapi": "/openapi.json"})

    api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    # the last added is the outermost: CatchAll sees everything, the key is checked before the body is read
    api.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    api.add_middleware(ApiKey, key=config.api_key)
    api.add_middleware(CatchAll)
    app_ctx.start_idle_release(config.idle_release_s)
    return api

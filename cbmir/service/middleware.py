"""ASGI middleware of the service: the last line against errors, the API key, the upload limit.

Pure ASGI (no ``BaseHTTPMiddleware``), so a refused request is answered before its body is read.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid

from starlette.exceptions import HTTPException

log = logging.getLogger("cbmir.service")


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete JSON response."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class Watched:
    """An ASGI ``send`` that remembers whether the response has started (then no error answer can follow)."""

    def __init__(self, send) -> None:
        self.send, self.started = send, False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


def unexpected_status(exc: BaseException) -> tuple[int, str]:
    """``(status, detail)`` for an exception nothing else handled: resource trouble (memory, files,
    timeouts) is 503 — try again later —; anything else is answered 400 (the request could not be
    processed), never 500, with an error id that is logged with the traceback."""
    if isinstance(exc, (MemoryError, OSError, TimeoutError)):
        return 503, "the service is short of resources for this request; try again later"
    return 400, "the request could not be processed"


class CatchAll:
    """Outermost: turns any exception that reached here into a JSON 400/503 (no traceback in the body)
    and logs it with an error id, the method and the route (not the request's content)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        watch = Watched(send)
        try:
            await self.app(scope, receive, watch)
        except Exception as exc:  # noqa: BLE001 - the last line: nothing may answer 5xx with a traceback
            err = uuid.uuid4().hex[:12]
            route = getattr(scope.get("route"), "path", None) or "unmatched route"
            log.error("error %s on %s %s: %s", err, scope.get("method"), route, type(exc).__name__,
                      exc_info=exc)
            if not watch.started:
                status, detail = unexpected_status(exc)
                await send_json(send, status, {"detail": f"{detail} (error {err})"},
                                [(b"retry-after", b"5")] if status == 503 else None)


class ApiKey:
    """With a key configured, ``/api/...`` requests need ``X-API-Key: KEY`` or ``Authorization: Bearer
    KEY`` (401 otherwise). The key is compared with :func:`hmac.compare_digest` and never logged.
    ``/health``, ``/``, ``/static``, ``/docs`` and ``/openapi.json`` stay open (they show no data; the
    docs page has an "Authorize" button for the key). Every protected answer carries ``Vary: X-API-Key,
    Authorization``, so a browser cache never serves an answer (e.g. a cached point image) to a request
    without the key that got it."""

    def __init__(self, app, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or not _protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"x-api-key":
                given = value
            elif name == b"authorization" and value[:7].lower() == b"bearer " and not given:
                given = value[7:].strip()
        if not hmac.compare_digest(given, self.key):
            log.warning("401 on %s %s: %s API key", scope.get("method"), scope.get("path", "")[:200],
                        "wrong" if given else "missing")
            return await send_json(send, 401, {"detail": ("wrong API key" if given else "missing API key") +
                                               ": send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"},
                                   [(b"www-authenticate", b"Bearer"), VARY_KEY])
        return await self.app(scope, receive, _with_header(send, VARY_KEY))


#: the request headers a protected answer depends on (see :class:`ApiKey`)
VARY_KEY = (b"vary", b"X-API-Key, Authorization")


def _with_header(send, header: tuple[bytes, bytes]):
    """``send`` that adds ``header`` to the response start."""
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)
    return wrapped


def _protected(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


class BodyTooLarge(HTTPException):
    """Raised inside ``receive`` when a request body passes the limit (an ``HTTPException``: the body
    parsers let it through, and it becomes the 413 answer)."""


class BodyLimit:
    """Requests whose body exceeds ``max_bytes`` get 413: at once when ``Content-Length`` says so, else as
    soon as the bytes received pass the limit (a chunked upload is never read whole)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _detail(self) -> str:
        mb = self.max_bytes / (1024 * 1024)
        return f"request body over the upload limit of {mb:g} MB ({self.max_bytes} bytes); send a smaller file"

    def _refuse(self, send):
        return send_json(send, 413, {"detail": self._detail()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    return await send_json(send, 400, {"detail": "invalid Content-Length header"})
                if int(value) > self.max_bytes:
                    return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(413, self._detail())
            return message

        watch = Watched(send)
        try:
            await self.app(scope, limited, watch)
        except BodyTooLarge:
            if not watch.started:
                await self._refuse(send)

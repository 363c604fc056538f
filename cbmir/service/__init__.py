"""``cbmir serve``: the HTTP search service (FastAPI) over the application layer.

:func:`create_app` builds the ASGI app; :func:`serve` runs it with uvicorn. Paths, fields and error
answers: :mod:`cbmir.service.routes`, :mod:`cbmir.service.app`; README "Search service".
"""

from cbmir.service.app import create_app
from cbmir.service.config import ServiceConfig, check_bind, is_loopback

__all__ = ["ServiceConfig", "check_bind", "create_app", "is_loopback", "serve"]


def serve(settings, config: ServiceConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the service until interrupted: check where it listens (:func:`check_bind`), open the
    application context, serve with uvicorn, close the store on exit.

    Raises:
        CbmirError: a non-loopback host without an API key; a port that cannot be bound.
    """
    import uvicorn

    from cbmir.app import App
    from cbmir.core.errors import CbmirError

    check_bind(host, config.api_key)
    with App(settings) as app_ctx:
        api = create_app(app_ctx, config)
        server = uvicorn.Server(uvicorn.Config(api, host=host, port=int(port), log_level=log_level,
                                               server_header=False))
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        if not server.started:
            raise CbmirError(f"could not listen on {host}:{port} (in use, or not an address of this machine); "
                             "choose another --port or --host")

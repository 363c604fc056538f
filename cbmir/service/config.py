"""Options of the HTTP service and the start-up check of where it listens."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cbmir.core.errors import CbmirError

DEFAULT_MAX_UPLOAD_MB = 32.0
DEFAULT_IDLE_RELEASE_S = 5.0


@dataclass(frozen=True)
class ServiceConfig:
    """What the service needs beyond :class:`cbmir.core.settings.Settings`.

    Attributes:
        api_key: when set, every ``/api/...`` request must carry it (``X-API-Key: KEY`` or
            ``Authorization: Bearer KEY``); compared in constant time, never logged or shown (``repr``).
        max_upload_bytes: larger request bodies are refused with 413 before they are read whole.
        idle_release_s: the embedded store's collections are released after this many seconds without
            a request, so other processes (``cbmir ingest``/``evaluate``/``search``) can open them
            (0: keep them while the service runs).
    """

    api_key: str | None = field(default=None, repr=False)
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    idle_release_s: float = DEFAULT_IDLE_RELEASE_S

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise CbmirError("--api-key / CBMIR_API_KEY is empty; give a non-empty key or leave it unset")
        if self.max_upload_bytes < 1:
            raise CbmirError(f"--max-upload-mb must be > 0 (got {self.max_upload_bytes} bytes)")
        if self.idle_release_s < 0:
            raise CbmirError(f"--idle-release-s must be >= 0 (got {self.idle_release_s})")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for anything else,
    including ``0.0.0.0`` / ``::`` (every interface) and other host names."""
    h = str(host).strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen on a non-loopback address without an API key.

    Raises:
        CbmirError: naming the host and the two fixes.
    """
    if not is_loopback(host) and not api_key:
        raise CbmirError(f"refusing to listen on {host!r} without an API key: anyone who can reach this "
                         "address could search and read the images. Set CBMIR_API_KEY (or --api-key), or "
                         "listen on 127.0.0.1 only (the default)")

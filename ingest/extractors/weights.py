"""Shared weights helpers for every torch extractor: hub reachability, files, identity, errors.

* :func:`hub_reachable` - a cheap (<= ~3 s) HTTP probe of the Hugging Face endpoint; on failure
  :func:`set_hub_offline` switches ``huggingface_hub`` to offline mode, because offline hub calls
  otherwise retry for 23-51 s before failing (DESIGN.md §6).
* :func:`fetch_hub_file` - a hub file from the network or the local HF cache, or a clear error.
* :func:`load_state_dict_file` - a state dict from ``.safetensors`` or a torch pickle loaded
  with ``torch.load(weights_only=True)`` (no arbitrary code execution).
* :func:`load_into_model` - strict loading that may ignore named sub-modules (classifier heads).
* :func:`check_state_dict` - the key / shape check behind it (a clear error naming the mismatches).
* :func:`sha256_file` - the identity of a local weights file (``sha256:<hex>``).
* :func:`hub_identity` - the identity of a hub checkpoint: repository and resolved revision.
* :func:`weights_unavailable_error` - the one message naming both ways to supply weights.
* :func:`model_identity` - the common fields of an extractor's collection identity.
* :func:`seeded` - a random-init model built under a fixed torch seed (:data:`SEED`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Mapping

from cbmir.core.errors import CbmirError
RANDOM_INIT = "random-init"
"""Weights identity of randomly initialised models (tests and smoke runs only)."""
SEED = 0
"""Torch seed set (in a forked RNG) before constructing a random-init model: the same
random-init features in every process, so a random-init collection can be queried later."""

_TRUE = {"1", "true", "yes", "on"}
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def seeded(make: Callable[[], object]):
    """``make()`` with the torch CPU RNG seeded to :data:`SEED` (in a forked RNG state, so the
    caller's RNG is untouched): random-init weights identical in every process."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return make()


def model_identity(spec, *, backend: str, architecture: str, weights_id: str) -> dict:
    """The leading fields of a neural extractor's ``identity()`` (collection metadata), in order:
    ``model``, ``family``, ``backend``, ``architecture``, ``dim``, ``weights`` (``weights_id``) and
    ``random_init`` (``weights_id`` is :data:`RANDOM_INIT`); callers add ``preprocessing`` etc.

    Args:
        spec: the extractor's :class:`~cbmir.ingest.base.ExtractorSpec`.
        backend: ``torch`` or ``keras``.
        architecture: description of the network.
        weights_id: ``hf-hub:<repo>``, ``sha256:<hex>``, ``random-init`` ...
    """
    return {
        "model": spec.name,
        "family": spec.family,
        "backend": backend,
        "architecture": architecture,
        "dim": int(spec.dim),
        "weights": weights_id,
        "random_init": weights_id == RANDOM_INIT,
    }


# --------------------------------------------------------------------------- hub
def hub_endpoint() -> str:
    """The Hugging Face endpoint that ``huggingface_hub`` will call (``HF_ENDPOINT`` as read by
    ``huggingface_hub.constants.ENDPOINT``; default ``https://huggingface.co``)."""
    try:
        import huggingface_hub.constants as hf_constants

        return str(hf_constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def hub_cache_dir() -> str | None:
    """HF hub cache folder passed to ``hf_hub_download`` (``None``: huggingface_hub's default)."""
    return None


def hub_offline_requested() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value in the environment."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def http_reachable(url: str, timeout: float = 2.0) -> bool:
    """True when an HTTP(S) server answers a ``HEAD url`` within about ``timeout`` seconds.

    Any HTTP status counts as an answer (the server is there); DNS, connection, TLS and
    timeout errors do not. Environment proxies are honoured (``urllib``). A bare TCP probe is
    not enough: transparent proxies accept connections to hosts that are not reachable.
    The probe runs in a daemon thread joined for ``timeout + 1`` s, since DNS lookups ignore
    socket timeouts.
    """
    ok: list[bool] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                ok.append(True)
        except urllib.error.HTTPError:
            ok.append(True)
        except Exception:  # noqa: BLE001 - any other failure of the probe: not reachable
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok and ok[0])


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers: False at once when ``HF_HUB_OFFLINE`` is set,
    else an HTTP ``HEAD`` of :func:`hub_endpoint` (:func:`http_reachable`, about 2 s at most)."""
    if hub_offline_requested():
        return False
    return http_reachable(hub_endpoint(), timeout)


def set_hub_offline() -> None:
    """Put ``huggingface_hub`` in offline mode for this process (env var and loaded constant),
    so later hub calls (timm, open_clip) fail at once instead of retrying."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def weights_unavailable_error(model: str, hub_id: str, reason: str = "") -> CbmirError:
    """The error raised when pretrained weights cannot be obtained.

    Names the model, the hub id and both ways to supply weights (``--weights PATH`` or network
    access to the hub), and ``--random-init`` for smoke tests.
    """
    why = f" ({reason})" if reason else ""
    return CbmirError(
        f"no pretrained weights for model {model!r}: the Hugging Face hub id {hub_id!r} is not "
        f"reachable from here and not in the local HF cache{why}. Fix: pass a local state-dict "
        f"file with --weights PATH (.safetensors, .pth or .pt; weights=PATH in Python), or run "
        f"once with network access to {hub_endpoint()} so {hub_id!r} is downloaded into the HF "
        f"cache (HF_HOME). For smoke tests only: --random-init."
    )


def fetch_hub_file(
    hub_id: str,
    model: str,
    filenames: Iterable[str] = ("model.safetensors", "pytorch_model.bin"),
) -> Path:
    """Local path of the first of ``filenames`` in hub repo ``hub_id`` (downloaded when online,
    else taken from the HF cache; never waits on network retries).

    Args:
        hub_id: repo id, e.g. ``timm/resnet50.tv_in1k``.
        model: cbmir model name, for the error message.
        filenames: candidate files in order of preference.

    Raises:
        CbmirError: from :func:`weights_unavailable_error` when no candidate can be obtained.
    """
    from huggingface_hub import hf_hub_download

    online = hub_reachable()
    if not online and not hub_offline_requested():
        set_hub_offline()
    reasons = []
    for name in filenames:
        try:
            path = hf_hub_download(
                hub_id, name, cache_dir=hub_cache_dir(), local_files_only=not online
            )
            return Path(path)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds (offline, 404, gated)
            reasons.append(f"{name}: {type(exc).__name__}")
    state = "online" if online else "offline"
    raise weights_unavailable_error(model, hub_id, f"{state}; " + ", ".join(reasons))


# --------------------------------------------------------------------------- files
def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (streamed; cached per resolved path, mtime and size)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def file_identity(path: str | os.PathLike) -> str:
    """Weights identity of a local file: ``sha256:<hex>``."""
    return f"sha256:{sha256_file(path)}"


def hub_identity(hub_id: str, path: str | os.PathLike) -> str:
    """Weights identity of a hub checkpoint: ``hf-hub:<repo>@<revision>``, the commit the local file
    ``path`` was resolved to (HF cache layout ``.../snapshots/<commit>/<file>``), so a collection records
    exactly which weights built it and a new revision in the cache is not taken for the old one; a file
    outside that layout is identified by its content: ``hf-hub:<repo>@sha256:<hex>``."""
    for folder in Path(path).parents:
        if folder.parent.name == "snapshots":
            return f"hf-hub:{hub_id}@{folder.name}"
    return f"hf-hub:{hub_id}@sha256:{sha256_file(path)}"


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a state dict (name -> ``torch.Tensor``) from a weights file, on the CPU.

    ``.safetensors`` is read with ``safetensors.torch.load_file``; anything else (``.pth``,
    ``.pt``, ``.bin``) with ``torch.load(map_location="cpu", weights_only=True)``. A checkpoint
    dict holding the weights under ``state_dict`` / ``model`` / ``model_state_dict`` is
    unwrapped, and a ``module.`` prefix on every key (DataParallel) is removed.

    Raises:
        CbmirError: file missing, unreadable, not a state dict, or holding pickled objects
            other than tensors (refused by ``weights_only=True``).
    """
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise CbmirError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one CbmirError naming it (below)
        # torch's own message is many lines of advice (weights_only=False ...): keep one line
        msg = str(exc)
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        detail = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if "WeightsUnpickler error" in ln),
                      lines[0] if lines else type(exc).__name__)
        why = ("it holds pickled objects other than tensors, refused for safety" if "unsupported global" in
               msg.lower() else f"{type(exc).__name__}: {detail[:200]}")
        raise CbmirError(
            f"cannot read weights file {p}: not a valid state dict / checkpoint ({why}); expected a state dict "
            f"saved with torch.save(model.state_dict(), path) or a .safetensors file"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CbmirError(f"weights file {p} does not hold a state dict of tensors")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into_model(model, state_dict: Mapping, *, source: str, ignore: Iterable[str] = ()) -> None:
    """Load ``state_dict`` into ``model`` strictly, except keys under the ``ignore`` prefixes.

    Args:
        model: a ``torch.nn.Module``.
        state_dict: name -> tensor.
        source: what the weights are (file path, hub id), for error messages.
        ignore: module prefixes (e.g. ``fc``, ``head.fc``) whose keys may be absent from the
            model or from ``state_dict`` - removed heads of a feature extractor.

    Raises:
        CbmirError: missing / unexpected keys or shape mismatches (first few listed).
    """
    prefixes = tuple(p.rstrip(".") + "." for p in ignore)
    wanted = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    check_state_dict(model, wanted, source, ignore=prefixes)
    model.load_state_dict(wanted, strict=False)


def check_state_dict(model, sd: Mapping, source: str, *, ignore: Iterable[str] = ()) -> None:
    """Raise a clear error unless ``sd`` has exactly ``model``'s keys and shapes (model keys under
    the ``ignore`` prefixes may be absent from ``sd``).

    Raises:
        CbmirError: missing / unexpected keys or shape mismatches (first few listed).
    """
    prefixes = tuple(p.rstrip(".") + "." for p in ignore)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(prefixes)]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise CbmirError(
            f"weights from {source} do not fit {type(model).__name__}: " + "; ".join(parts)
        )

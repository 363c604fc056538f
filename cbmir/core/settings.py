"""Runtime settings (pydantic-settings): ``CBMIR_*`` environment variables and ``.env``.

CLI flags override these values; see ``cbmir --help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """cbmir configuration.

    Attributes:
        data_dir: folder holding MedMNIST ``<flag>.npz`` / ``<flag>_<size>.npz`` files
            (``CBMIR_DATA_DIR``; default ``~/.medmnist``, the medmnist package's own default).
        store_path: directory of the embedded Qdrant Edge engine, one shard directory per
            collection (``CBMIR_STORE_PATH``).
        qdrant_url: when set, a Qdrant server is used through qdrant-client instead of the
            embedded engine (``CBMIR_QDRANT_URL``, e.g. ``http://localhost:6333``).
        qdrant_api_key: API key for the server (``CBMIR_QDRANT_API_KEY``); a ``SecretStr``, so it
            never appears in reprs, logs or error messages.
        qdrant_timeout_s: seconds per server request (``CBMIR_QDRANT_TIMEOUT_S``).
        qdrant_retry_s: longest time, in seconds, one server call is retried (exponential backoff)
            while the server is unreachable, timing out or answering 5xx, before a clear error
            (``CBMIR_QDRANT_RETRY_S``; 0 = no retries).
        qdrant_shard_number, qdrant_replication_factor, qdrant_write_consistency_factor: a Qdrant server's
            shards, copies of each shard and replicas acknowledging a write, for collections cbmir creates
            (``CBMIR_QDRANT_SHARD_NUMBER`` ...; None: the server's default). See ``docs/scaling.md``.
        qdrant_read_consistency: replicas that must answer a read: ``all``, ``majority``, ``quorum`` or a number
            (``CBMIR_QDRANT_READ_CONSISTENCY``; None: the server's default, one).
        qdrant_prefer_grpc: talk to the server over gRPC (port ``qdrant_grpc_port``) instead of REST
            (``CBMIR_QDRANT_PREFER_GRPC``): protobuf bulk upserts and batched queries.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: forward-pass precision of the torch extractors (``CBMIR_PRECISION``): ``auto`` (bf16 autocast
            on CUDA, fp32 on CPU), ``fp32`` (everywhere) or ``bf16`` (autocast on CPU too: about 2x faster on CPUs
            with native bf16). Recorded per collection; see :mod:`cbmir.ingest.extractors.precision`.
        torch_compile: ingest with the ImageNet CNNs' forward pass compiled by ``torch.compile``
            (``CBMIR_TORCH_COMPILE``): about 1.5x the images/s of big jobs at 224 px on CPU after a ~30 s compile
            (slower for the small ``native`` inputs), same precision; queries stay eager. Recorded per embedded split;
            see :mod:`cbmir.ingest.extractors.compiled`.
        batch_size: images per extractor forward pass.
        num_workers: DataLoader workers for preprocessing (0 = in the main process).
        threads: torch intra-op CPU threads for extraction (``CBMIR_THREADS``; None = torch's default,
            one per core). On a shared or oversubscribed CPU, 1 is often several times faster.
        lock_wait_s: seconds a command waits for an embedded-store collection that another process
            (e.g. a running ``cbmir serve``) holds, before the error naming the holder
            (``CBMIR_LOCK_WAIT_S``; 0 = fail at once).
    """

    model_config = SettingsConfigDict(env_prefix="CBMIR_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".medmnist")
    store_path: Path = Path(".cbmir/store")
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    qdrant_timeout_s: float = Field(default=60.0, gt=0)
    qdrant_retry_s: float = Field(default=120.0, ge=0)
    qdrant_shard_number: int | None = Field(default=None, ge=1)
    qdrant_replication_factor: int | None = Field(default=None, ge=1)
    qdrant_write_consistency_factor: int | None = Field(default=None, ge=1)
    qdrant_read_consistency: str | None = None
    qdrant_prefer_grpc: bool = False
    qdrant_grpc_port: int = Field(default=6334, ge=1, le=65535)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    torch_compile: bool = False
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    distance: Literal["cosine", "euclidean"] = "cosine"
    lock_wait_s: float = Field(default=10.0, ge=0)


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) applied on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})

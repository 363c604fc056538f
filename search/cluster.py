"""A Qdrant server or cluster: collection-creation and request settings, as qdrant-client arguments.

:class:`ClusterConfig` holds what cbmir passes to a Qdrant server beyond the URL and API key
(``CBMIR_QDRANT_*`` settings, ``cbmir ingest`` flags; see ``docs/scaling.md``):

* at collection creation: ``shard_number`` (shards spread over the cluster's nodes),
  ``replication_factor`` (copies of each shard) and ``write_consistency_factor`` (replicas that must
  acknowledge a write) — None leaves the server's default (1 shard per node, 1 copy, 1 ack);
* on every read (query, scroll, retrieve): ``read_consistency`` (``all``, ``majority``, ``quorum`` or
  a number of replicas) — None: the server's default (one replica answers);
* ``prefer_grpc``: qdrant-client sends every call over gRPC (port ``grpc_port``, 6334 by default):
  bulk upserts and batched queries as protobuf instead of JSON; REST otherwise.

:func:`collection_params` also turns a collection's search mode (:mod:`cbmir.search.index_config`)
into the server's HNSW / quantization / optimizer settings, and :func:`search_params` into per-query
search parameters. The embedded engine ignores cluster settings (one process, one shard).
"""

from __future__ import annotations

from dataclasses import dataclass

from qdrant_client import models

from cbmir.core.errors import CbmirError
from cbmir.search.index_config import IndexConfig, search_settings

READ_CONSISTENCIES = ("all", "majority", "quorum")


def parse_read_consistency(value) -> str | int | None:
    """``all`` / ``majority`` / ``quorum`` / a positive integer (as text or int), or None.

    Raises:
        CbmirError: anything else, naming the valid values.
    """
    if value is None or value == "":
        return None
    text = str(value).strip().lower()
    if text in READ_CONSISTENCIES:
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise CbmirError(f"--read-consistency / CBMIR_QDRANT_READ_CONSISTENCY {value!r}: give all, majority, quorum "
                     "or a number of replicas >= 1")


@dataclass(frozen=True)
class ClusterConfig:
    """Qdrant server / cluster settings (module docstring); every None is the server's default.

    Attributes:
        shard_number, replication_factor, write_consistency_factor: positive integers or None.
        read_consistency: ``all``, ``majority``, ``quorum``, a positive integer, or None.
        prefer_grpc: talk gRPC (port ``grpc_port``) instead of REST.
        grpc_port: the server's gRPC port.
    """

    shard_number: int | None = None
    replication_factor: int | None = None
    write_consistency_factor: int | None = None
    read_consistency: str | int | None = None
    prefer_grpc: bool = False
    grpc_port: int = 6334

    def __post_init__(self) -> None:
        for name in ("shard_number", "replication_factor", "write_consistency_factor"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise CbmirError(f"--{name.replace('_', '-')} {v!r}: must be an integer >= 1")
        if (self.write_consistency_factor and self.replication_factor
                and self.write_consistency_factor > self.replication_factor):
            raise CbmirError(f"--write-consistency-factor {self.write_consistency_factor} exceeds "
                             f"--replication-factor {self.replication_factor}: a write cannot wait for more "
                             "replicas than exist")
        object.__setattr__(self, "read_consistency", parse_read_consistency(self.read_consistency))

    def consistency(self):
        """The ``consistency`` argument of qdrant-client read calls (None: the server's default)."""
        rc = self.read_consistency
        return models.ReadConsistencyType(rc) if isinstance(rc, str) else rc

    def creation_params(self) -> dict:
        """``create_collection`` keyword arguments: the shard / replica / write-consistency numbers set."""
        return {k: getattr(self, k) for k in ("shard_number", "replication_factor", "write_consistency_factor")
                if getattr(self, k) is not None}


def collection_params(mode: IndexConfig) -> dict:
    """``create_collection`` keyword arguments for a collection's search mode.

    Exact collections get no HNSW graph (``m = 0``: every query is a brute-force scan, so the graph would
    only cost memory and indexing time); ``hnsw`` ones get ``m``, ``ef_construct`` and the full-scan
    threshold; a quantization adds its config with the quantized vectors kept in RAM.
    """
    if mode.index == "hnsw":
        hnsw = models.HnswConfigDiff(m=mode.m, ef_construct=mode.ef_construct, full_scan_threshold=mode.full_scan_kb)
    else:
        hnsw = models.HnswConfigDiff(m=0)
    out = {"hnsw_config": hnsw}
    if mode.quantization == "int8":
        out["quantization_config"] = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=mode.quantile, always_ram=True))
    elif mode.quantization == "binary":
        out["quantization_config"] = models.BinaryQuantization(
            binary=models.BinaryQuantizationConfig(always_ram=True))
    if mode.approximate:
        out["optimizers_config"] = models.OptimizersConfigDiff(indexing_threshold=mode.full_scan_kb)
    return out


def search_params(mode: IndexConfig | None) -> models.SearchParams:
    """Per-query search parameters (:func:`cbmir.search.index_config.search_settings`)."""
    params, quant = search_settings(mode)
    return models.SearchParams(**params, quantization=models.QuantizationSearchParams(**quant) if quant else None)

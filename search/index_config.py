"""A collection's search mode: exact (the default, and the study's protocol) or approximate.

A collection is searched either by brute force over its float32 vectors (``exact``, no quantization:
rankings equal a numpy brute force) or approximately, chosen per collection at creation
(``cbmir ingest --index hnsw --quantization int8``) and recorded in its metadata
(:attr:`cbmir.search.schema.CollectionMeta.index`):

* ``index``: ``exact`` (every database point is scored) or ``hnsw`` (a graph index: ``m`` links per
  point, ``ef_construct`` candidates while building, ``ef`` candidates per query — the recall /
  speed knob, overridable per query);
* ``quantization``: ``none``, ``int8`` (scalar, 4x smaller, ``quantile`` clipping) or ``binary``
  (1 bit per dimension, 32x smaller; the sign of each value, so it is useless for non-negative
  features such as CNN activations or HOG, where every bit is 1 — measured in ``docs/scaling.md``),
  with ``rescore`` (re-score the candidates with the float32 vectors) and ``oversampling`` (fetch
  ``oversampling x limit`` quantized candidates before rescoring).

``exact`` with a quantization is a brute-force scan of the quantized vectors (no graph), rescored.
Any other mode than ``exact`` / ``none`` is approximate: its recall against exact search is measured
by ``python -m cbmir.benchmarks.recall`` (README, "Approximate search"). The study's protocol
(``cbmir run``, ``evaluate``, ``benchmark``) always searches exactly, whatever the collection's mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from cbmir.core.errors import CbmirError

INDEX_KINDS = ("exact", "hnsw")
QUANTIZATIONS = ("none", "int8", "binary")
#: Qdrant's default ``full_scan_threshold`` / ``indexing_threshold`` (KB of vectors): a segment or a filtered
#: subset smaller than this is searched by brute force, and a segment smaller than this gets no HNSW graph.
DEFAULT_FULL_SCAN_KB = 10_000


@dataclass(frozen=True)
class IndexConfig:
    """How a collection is indexed and searched (module docstring).

    Attributes:
        index: ``exact`` or ``hnsw``.
        quantization: ``none``, ``int8`` or ``binary``.
        m: HNSW links per point (``hnsw``; 16 is Qdrant's default).
        ef_construct: HNSW build-time candidate list (``hnsw``; 100 is Qdrant's default).
        ef: HNSW query-time candidate list (``hnsw``; at least the number of results fetched).
        rescore: re-score quantized candidates with the original float32 vectors.
        oversampling: quantized candidates fetched per result before rescoring (>= 1).
        quantile: int8 quantization clips values outside this quantile (Qdrant's ``quantile``).
        full_scan_kb: KB of vectors below which Qdrant scans instead of using the graph (and builds none).
    """

    index: str = "exact"
    quantization: str = "none"
    m: int = 16
    ef_construct: int = 100
    ef: int = 128
    rescore: bool = True
    oversampling: float = 2.0
    quantile: float = 0.99
    full_scan_kb: int = DEFAULT_FULL_SCAN_KB

    def __post_init__(self) -> None:
        if self.index not in INDEX_KINDS:
            raise CbmirError(f"unknown --index {self.index!r}; valid: {', '.join(INDEX_KINDS)}")
        if self.quantization not in QUANTIZATIONS:
            raise CbmirError(f"unknown --quantization {self.quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
        for name, low in (("m", 2), ("ef_construct", 4), ("ef", 1), ("full_scan_kb", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise CbmirError(f"--hnsw-{name.replace('_', '-')} {v!r}: must be an integer >= {low}")
        if not (isinstance(self.oversampling, (int, float)) and self.oversampling >= 1):
            raise CbmirError(f"--oversampling {self.oversampling!r}: must be a number >= 1")
        if not (isinstance(self.quantile, (int, float)) and 0.5 <= self.quantile <= 1):
            raise CbmirError(f"quantization quantile {self.quantile!r}: must be in [0.5, 1]")

    @property
    def approximate(self) -> bool:
        """True unless the mode is ``exact`` without quantization."""
        return self.index != "exact" or self.quantization != "none"

    @property
    def name(self) -> str:
        """Short mode name, e.g. ``exact``, ``hnsw``, ``hnsw+int8``, ``exact+binary``."""
        return self.index + ("" if self.quantization == "none" else f"+{self.quantization}")

    def with_ef(self, ef: int | None) -> "IndexConfig":
        """This mode with the query-time ``ef`` replaced (None: unchanged)."""
        return self if ef is None else replace(self, ef=int(ef))

    def describe(self) -> str:
        """One line, e.g. ``hnsw (m=16, ef_construct=100, ef=128) + int8 (rescored, oversampling 2)``."""
        if not self.approximate:
            return "exact"
        out = self.index if self.index == "exact" else \
            f"hnsw (m={self.m}, ef_construct={self.ef_construct}, ef={self.ef})"
        if self.quantization != "none":
            how = f"rescored, oversampling {self.oversampling:g}" if self.rescore else "not rescored"
            out += f" + {self.quantization} ({how})"
        return out

    def to_meta(self) -> dict:
        """The form stored in collection metadata: ``{}`` for exact (as collections made before modes
        existed), else every field."""
        return asdict(self) if self.approximate else {}

    @classmethod
    def from_meta(cls, d: dict | None) -> "IndexConfig":
        """The mode stored in collection metadata (``{}`` or None: exact).

        Raises:
            CbmirError: unknown keys or invalid values (damaged metadata).
        """
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise CbmirError(f"collection index settings have unknown key(s) {sorted(unknown)}")
        return cls(**d)


def search_settings(mode: IndexConfig | None) -> tuple[dict, dict | None]:
    """Keyword arguments of an engine's ``SearchParams`` and of its ``QuantizationSearchParams`` (None: none)
    for one query: exact (``mode`` None: every point on its float32 vector, quantized vectors ignored) or the
    collection's approximate ``mode`` (``hnsw_ef``; quantization rescoring and oversampling). Both engines
    (Qdrant Edge, qdrant-client) take the same names."""
    if mode is None:
        return {"exact": True}, {"ignore": True}
    quant = None
    if mode.quantization != "none":
        quant = {"rescore": mode.rescore, "oversampling": float(mode.oversampling)}
    return {"exact": False, "hnsw_ef": mode.ef if mode.index == "hnsw" else None}, quant


def index_config(index: str | None = None, quantization: str | None = None, *, m: int | None = None,
                 ef_construct: int | None = None, ef: int | None = None, rescore: bool | None = None,
                 oversampling: float | None = None) -> IndexConfig | None:
    """The mode that command-line options ask for; None when none is given (an existing collection keeps its
    own mode, a new one is exact).

    Raises:
        CbmirError: HNSW options without ``--index hnsw``, quantization options without a quantization, or
            invalid values.
    """
    given = {k: v for k, v in dict(m=m, ef_construct=ef_construct, ef=ef, rescore=rescore,
                                   oversampling=oversampling).items() if v is not None}
    if index is None and quantization is None:
        if given:
            raise CbmirError(f"--{next(iter(given)).replace('_', '-')} needs --index hnsw or --quantization")
        return None
    index = index or "exact"
    quantization = quantization or "none"
    hnsw_only = [k for k in ("m", "ef_construct", "ef") if k in given]
    if hnsw_only and index != "hnsw":
        raise CbmirError(f"--hnsw-{hnsw_only[0].replace('_', '-')} applies to --index hnsw only")
    q_only = [k for k in ("rescore", "oversampling") if k in given]
    if q_only and quantization == "none":
        raise CbmirError(f"--{q_only[0]} applies to a quantized collection (--quantization int8|binary)")
    return IndexConfig(index=index, quantization=quantization, **given)

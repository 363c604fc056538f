"""Collection naming, deterministic point ids, payload schema and collection metadata.

One collection per (dataset, size, model); non-default backend, distance or volume
aggregation add a suffix so that such runs never share a collection
(e.g. ``breastmnist_28_hog``, ``adrenalmnist3d_64_resnet50_keras_euclidean``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from cbmir.core.errors import CbmirError
from cbmir.core.input_size import input_size_suffix
from cbmir.core.splits import CODE_SPLITS as _CODE_SPLITS
from cbmir.core.splits import SPLIT_CODES
_INDEX_BITS = 40
#: Qdrant servers reject dense vectors above this many dimensions (documented limit).
MAX_VECTOR_DIM = 65_535
DISTANCES = ("cosine", "euclidean")


def collection_name(
    dataset: str,
    size: int,
    model: str,
    *,
    backend: str = "torch",
    distance: str = "cosine",
    aggregation: str = "concat",
    random_init: bool = False,
    input_size: int | None = None,
) -> str:
    """Name of the collection of (dataset, size, model), e.g. ``breastmnist_28_hog``.

    Defaults (torch backend, ``native`` input size, cosine distance, concat slice aggregation, pretrained
    weights) add no suffix; a fixed CNN input size adds ``_in<N>`` after the backend
    (``breastmnist_28_efficientnet_lite0_in224``, :mod:`cbmir.core.input_size`); random weights
    (``--random-init``) add ``_randinit`` last, so a smoke-test collection never
    takes the name of the pretrained one (``breastmnist_28_resnet50_randinit``).
    """
    parts = [dataset, str(size), model]
    if backend not in ("torch", "numpy"):
        parts.append(backend)
    if input_size is not None:
        parts.append(input_size_suffix(input_size))
    if aggregation != "concat":
        parts.append(aggregation)
    if distance != "cosine":
        parts.append(distance)
    if random_init:
        parts.append("randinit")
    name = "_".join(parts).lower()
    if not re.fullmatch(r"[a-z0-9_.\-]+", name):
        raise CbmirError(f"invalid collection name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def point_id(split: str, index: int) -> int:
    """Deterministic unsigned point id of row ``index`` of ``split`` (``split`` code << 40 | index).

    Re-ingesting the same row overwrites the same point. Within one split, id order equals
    row order, so sorting hits by id breaks similarity ties by lower database index.
    """
    if split not in SPLIT_CODES:
        raise CbmirError(f"unknown split {split!r}; valid: {', '.join(SPLIT_CODES)}")
    if not 0 <= int(index) < (1 << _INDEX_BITS):
        raise CbmirError(f"row index {index} out of range")
    return (SPLIT_CODES[split] << _INDEX_BITS) | int(index)


def split_and_index(pid: int) -> tuple[str, int]:
    """Inverse of :func:`point_id`: ``(split, index)``."""
    pid = int(pid)
    return _CODE_SPLITS[pid >> _INDEX_BITS], pid & ((1 << _INDEX_BITS) - 1)


#: ``CollectionMeta.extra["point_ids"]`` of collections whose ids come from item keys (:func:`key_index`)
KEY_IDS = "key-sha256"
#: Most probes :func:`key_index` may take for one key (a 40-bit collision needs a second one; 64 never happen)
MAX_PROBES = 64


def key_index(key: str, probe: int = 0) -> int:
    """Stable row index of a user-archive item: the low 40 bits of SHA-256 of ``probe`` and its key (the
    relative path, or a manifest key), so ``point_id(split, key_index(key))`` never changes while the file
    stays where it is, whatever else is added to or removed from the archive.

    Point ids keep the split code in their high bits (:func:`split_and_index` decodes them), and for such
    collections the row ``index`` of a point *is* this 40-bit number: similarity ties are broken by lower
    index, i.e. by this hash, the same on every engine and after every sync. Two keys of one split whose
    hashes collide (about one pair in a million-file split) are told apart by probing: the later key takes
    ``probe`` 1, 2, ... (:func:`allocate_index`).
    """
    import hashlib

    digest = hashlib.sha256(f"{int(probe)}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << _INDEX_BITS) - 1)


def allocate_index(key: str, taken: dict[int, str]) -> int:
    """The index of ``key`` given the indices already ``taken`` in its split (index -> key): its first
    probe that is free or already holds this key. ``taken`` is not changed.

    Raises:
        CbmirError: :data:`MAX_PROBES` probes all taken (never in practice).
    """
    for probe in range(MAX_PROBES):
        ix = key_index(key, probe)
        if taken.get(ix, key) == key:
            return ix
    raise CbmirError(f"no free point id for item {key!r} after {MAX_PROBES} probes")


def uses_key_ids(meta: "CollectionMeta") -> bool:
    """True for collections whose point ids come from item keys (user archives ingested by this cbmir):
    they can be synced and take single-item adds and deletes. MedMNIST collections (and archives ingested
    by an older cbmir) keep row positions."""
    return (meta.extra or {}).get("point_ids") == KEY_IDS


def chunk_layout(dim: int, max_dim: int = MAX_VECTOR_DIM) -> list[tuple[str, int, int]]:
    """Split ``dim`` into named vector chunks ``(name, start, stop)`` of at most ``max_dim`` each.

    One chunk (name ``v0``) when ``dim <= max_dim``; otherwise ``ceil(dim / max_dim)`` chunks of
    near-equal length, in order. Used for 3D concatenated slice vectors above Qdrant's
    65,535-dim limit (DESIGN.md §1).
    """
    if dim < 1:
        raise CbmirError(f"vector dimension must be positive, got {dim}")
    n = -(-dim // max_dim)
    step = -(-dim // n)
    return [(f"v{i}", i * step, min(dim, (i + 1) * step)) for i in range(n)]


@dataclass
class CollectionMeta:
    """What a collection holds; stored with the collection and checked on every ingest.

    Attributes:
        dataset, size, model, backend: the (dataset, size, model, backend) cell.
        dim: full embedding dimension (for volumes: slices × per-slice dim when concatenated).
        distance: ``cosine`` or ``euclidean``.
        weights: weights identity (hub id, ``sha256:...`` of a file, ``random-init``, ``none``).
        random_init: True for smoke-test collections built without pretrained weights.
        preprocessing: description of the preprocessing chain.
        is_3d: True when points are volumes.
        aggregation: slice aggregation for volumes (``concat``, ``mean``, ``max``), else ``none``.
        layout: named vector chunks ``[[name, start, stop], ...]``; more than one when
            ``dim`` exceeds :data:`MAX_VECTOR_DIM`. Cosine vectors are L2-normalised as a whole
            before chunking; the score of a point is the sum of its chunk scores.
        index: the search mode (:meth:`cbmir.search.index_config.IndexConfig.to_meta`): ``{}`` for exact
            search (the default), else the approximate index and quantization settings.
        extra: free-form extra facts (source kind, version) — not checked for compatibility.
        input_size: the CNN input-size policy: None = ``native`` (the study's), else the side N every
            image (or slice) was resized to (:mod:`cbmir.core.input_size`). Absent in older metadata (native).
    """

    dataset: str
    size: int
    model: str
    backend: str
    dim: int
    distance: str = "cosine"
    weights: str = "none"
    random_init: bool = False
    preprocessing: str = ""
    is_3d: bool = False
    aggregation: str = "none"
    layout: list = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    index: dict[str, Any] = field(default_factory=dict)

    CHECKED = ("dataset", "size", "model", "backend", "dim", "distance", "weights",
               "random_init", "preprocessing", "is_3d", "aggregation", "input_size", "index")

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise CbmirError(f"unknown distance {self.distance!r}; valid: {', '.join(DISTANCES)}")
        if not self.layout:
            self.layout = [list(c) for c in chunk_layout(self.dim)]
        self.layout = [list(c) for c in self.layout]
        if self.index and len(self.layout) > 1:
            raise CbmirError(
                f"approximate search (--index / --quantization) needs one vector of at most {MAX_VECTOR_DIM:,} "
                f"dims; {self.dim:,}-dim vectors are stored in {len(self.layout)} chunks whose scores are summed "
                "over every point, which only exact search can do: use --index exact")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    #: JSON type of every field, checked by :meth:`from_dict` (stored metadata may be damaged)
    _TYPES = {"dataset": str, "size": int, "model": str, "backend": str, "dim": int, "distance": str,
              "weights": str, "random_init": bool, "preprocessing": str, "is_3d": bool, "aggregation": str,
              "layout": list, "extra": dict, "input_size": (int, type(None)), "index": dict}

    @classmethod
    def from_dict(cls, d: dict) -> "CollectionMeta":
        """Metadata from its stored form.

        Raises:
            ValueError: ``d`` is not a mapping, misses a required key, or holds a value of the wrong
                type (callers name the stored file; see :func:`parse_meta`).
        """
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("dataset", "size", "model", "backend", "dim") if k not in d]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        for k, t in cls._TYPES.items():
            v = d.get(k, None)
            ints = int in (t if isinstance(t, tuple) else (t,))
            if k in d and (not isinstance(v, t) or (ints and isinstance(v, bool))):
                raise ValueError(f"{k} = {v!r} is not a {getattr(t, '__name__', 'int or null')}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def index_config(self):
        """The collection's search mode, :class:`cbmir.search.index_config.IndexConfig` (exact when none is
        recorded)."""
        from cbmir.search.index_config import IndexConfig

        return IndexConfig.from_meta(self.index)

    def differences(self, other: "CollectionMeta") -> dict[str, tuple[Any, Any]]:
        """Fields (of :attr:`CHECKED`) whose values differ: ``{field: (self, other)}``."""
        return {k: (getattr(self, k), getattr(other, k)) for k in self.CHECKED
                if getattr(self, k) != getattr(other, k)}

    def describe(self) -> str:
        """One-line human description (model, backend, dim, weights, distance)."""
        ri = " RANDOM-INIT" if self.random_init else ""
        ins = f" input_size={self.input_size}" if self.input_size is not None else ""
        mode = f" index={self.index_config().describe()}" if self.index else ""
        return (f"{self.dataset}@{self.size} model={self.model} backend={self.backend}{ins} dim={self.dim} "
                f"distance={self.distance} weights={self.weights}{ri} preprocessing={self.preprocessing!r}{mode}")


class DamagedMetaError(CbmirError):
    """A collection's stored metadata exists but cannot be read (bad JSON, missing keys, wrong types).

    ``--recreate`` treats such a collection as existing and replaces it (:func:`cbmir.ingest.job.ingest`).
    """


def parse_meta(text: str | bytes, name: str, where: str) -> CollectionMeta:
    """:class:`CollectionMeta` of collection ``name`` from its stored JSON ``text`` (kept in ``where``).

    Raises:
        DamagedMetaError: the text is not valid metadata; one line naming the collection, ``where``
            and ``--recreate`` (nothing is deleted automatically).
    """
    try:
        return CollectionMeta.from_dict(json.loads(text))
    except (ValueError, TypeError, CbmirError) as e:  # json.JSONDecodeError is a ValueError
        detail = " ".join(str(e).split())
        raise DamagedMetaError(
            f"collection {name!r}: its metadata {where} is damaged ({detail}); nothing was deleted. "
            f"Re-run `cbmir ingest` (or `cbmir run`) with --recreate to rebuild the collection") from None


def make_payload(*, dataset: str, split: str, index: int, label: int, model: str, size: int,
                 image_id: str, extra: dict | None = None) -> dict:
    """Payload of one point: ``dataset``, ``split``, ``index``, ``label``, ``model``, ``size``,
    ``image_id`` (plus user-supplied extra fields, which never override these)."""
    p = dict(extra or {})
    p.update(dataset=dataset, split=split, index=int(index), label=int(label), model=model,
             size=int(size), image_id=image_id)
    return p

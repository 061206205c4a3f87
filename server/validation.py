"""Validation primitives (JSON, ids, vectors, payloads, numbers) and the collection config (Qdrant's create body).

Everything raises ApiError(4xx) with what was given and what was expected, before any state changes.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.config import Settings
from server.errors import ApiError
from server.ids import INT_ID_MAX, PointId, parse_uuid
from tqindex.index import MAX_NORM, norm_error

__all__ = [
    "parse_json", "check_payload", "check_name", "check_int", "check_bool", "obj", "no_unknown", "short", "tname",
    "parse_point_id", "parse_vectors", "CollectionSpec", "parse_collection", "DISTANCES",
]

INT64_MAX = (1 << 63) - 1
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
METRICS = ("ip", "cosine", "l2")
CODECS = ("prod", "mse")
BITS = {"prod": (1, 9), "mse": (1, 8)}


def short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; every number must be finite")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e400 parses to inf: it could be neither stored in the log nor answered
        raise ValueError(f"number {short(text, 40)} is beyond the range of a double; every number must be finite")
    return v


def parse_json(body: bytes) -> Any:
    """Body bytes -> JSON value; 400 for empty, non-UTF-8, malformed or too deeply nested JSON, and for
    numbers that are not finite doubles (NaN, Infinity, 1e400)."""
    if not body.strip():
        raise ApiError(400, "malformed JSON: the request body is empty; expected a JSON object")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"malformed JSON: body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: arrays or objects nested too deeply to parse; expected at most a "
                            "few hundred levels (payloads: --max-payload-depth)") from None
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None


def _depth(v: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, {} and [] are 1), without recursion."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in x.values())
        elif isinstance(x, list):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in x)
    return deepest


def check_payload(pl: dict[str, Any], where: str, settings: Settings) -> None:
    """A payload the log can store and every read can answer: depth and encoded size within limits."""
    depth = _depth(pl)
    if depth > settings.max_payload_depth:
        raise ApiError(400, f"{where} is nested {depth} levels deep; expected at most {settings.max_payload_depth} "
                            "(--max-payload-depth)")
    try:
        size = len(json.dumps(pl, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode())
    except (ValueError, TypeError) as e:  # pragma: no cover - parse_json lets only encodable values through
        raise ApiError(400, f"{where} cannot be stored as JSON: {e}") from None
    if size > settings.max_payload_bytes:
        raise ApiError(413, f"{where} is {size} bytes as JSON; expected at most {settings.max_payload_bytes} "
                            "(--max-payload-bytes)")


def obj(v: Any, what: str = "request body") -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ApiError(400, f"{what} is a JSON {tname(v)}; expected a JSON object")
    return v


def no_unknown(d: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ApiError(400, f"{what} has unknown field(s) {extra}; expected only {sorted(allowed)}")


def check_int(v: Any, name: str, lo: int, hi: int, *, status_hi: int = 400) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} is {short(v)} ({tname(v)}); expected an integer in {lo}..{hi}")
    if v < lo:
        raise ApiError(400, f"{name} is {v}; expected an integer in {lo}..{hi}")
    if v > hi:
        raise ApiError(status_hi, f"{name} is {v}; expected an integer in {lo}..{hi}")
    return v


def check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} is {short(v)} ({tname(v)}); expected true or false")
    return v


def check_name(name: Any) -> str:
    """A collection name: 1-64 characters of letters, digits, '_' and '-'."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(400, f"collection name {short(name)} is invalid; expected 1-64 characters of "
                            "letters, digits, '_' or '-'")
    return name


# -- ids and vectors --------------------------------------------------------------------------------
def parse_point_id(v: Any, where: str) -> PointId:
    """A Qdrant point id: an integer in 0..INT_ID_MAX or a UUID string (any form Python's uuid reads)."""
    if isinstance(v, str):
        u = parse_uuid(v)
        if u is None:
            raise ApiError(400, f"{where} is {short(v)}, not a UUID; expected an unsigned integer or a UUID string")
        return u
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{where} is {short(v)} ({tname(v)}); expected an unsigned integer or a UUID string")
    if v < 0 or v > INT_ID_MAX:
        raise ApiError(400, f"{where} is {v}, outside tqindex's integer ids; expected an integer in 0..{INT_ID_MAX} "
                            "(2^62-1: the ids above it are where UUID points are stored) or a UUID string")
    return v


def parse_point_ids(v: Any, name: str, settings: Settings, *, unique: bool) -> list[PointId]:
    """An array of point ids (at most --max-batch; 413 above it), duplicates refused if ``unique``."""
    if not isinstance(v, list):
        raise ApiError(400, f"{name} is a JSON {tname(v)}; expected an array of point ids")
    if len(v) > settings.max_batch:
        raise ApiError(413, f"{name} holds {len(v)} ids; expected at most {settings.max_batch} (--max-batch)")
    out = [parse_point_id(x, f"{name}[{i}]") for i, x in enumerate(v)]
    if unique:
        check_unique(out, name)
    return out


def check_unique(ids: list[PointId], name: str) -> None:
    if len(set(ids)) != len(ids):
        seen: set[PointId] = set()
        dup = []
        for i in ids:
            if i in seen and i not in dup:
                dup.append(i)
            seen.add(i)
        shown = [str(d) if not isinstance(d, int) else d for d in dup[:10]]
        raise ApiError(400, f"{name} has duplicate ids {shown} in one batch; expected each id once")


def parse_vectors(rows: list[Any], dim: int, where: str, metric: str) -> np.ndarray:
    """List of n rows -> (n, dim) float32, finite; ``where.format(i)`` names row i in messages. For ip and
    l2, each row's norm must be at most tqindex's MAX_NORM (so the index can never overflow on it)."""
    for i, r in enumerate(rows):
        if not isinstance(r, list):
            raise ApiError(400, f"{where.format(i)} is a JSON {tname(r)}; expected an array of {dim} numbers")
        if len(r) != dim:
            raise ApiError(400, f"{where.format(i)} has {len(r)} dimensions, but this collection expects {dim}")
    if not rows:
        return np.empty((0, dim), np.float32)
    types = set(map(type, itertools.chain.from_iterable(rows)))
    if not types <= {int, float}:
        for i, r in enumerate(rows):
            for j, x in enumerate(r):
                if type(x) not in (int, float):
                    raise ApiError(400, f"{where.format(i)}[{j}] is {short(x)} ({tname(x)}); expected a number")
    f32max = float(np.finfo(np.float32).max)
    try:
        arr = np.array(rows, dtype=np.float64).reshape(len(rows), dim)
        ok = bool(np.isfinite(arr).all() and (np.abs(arr) <= f32max).all())
    except OverflowError:
        ok = False
    if not ok:
        for i, r in enumerate(rows):
            try:
                a = np.array(r, dtype=np.float64)
                if np.isfinite(a).all() and (np.abs(a) <= f32max).all():
                    continue
            except OverflowError:
                pass
            raise ApiError(400, f"{where.format(i)} has a value that is not a finite float32; "
                                "expected finite numbers within ±3.4e38")
    if metric != "cosine" and arr.size:
        norms = np.linalg.norm(arr, axis=1)  # float64: finite for any float32 input
        bad = np.flatnonzero(norms > MAX_NORM)
        if bad.size:
            raise ApiError(400, norm_error(where.format(int(bad[0])), float(norms[bad[0]])))
    return arr.astype(np.float32)


# -- the collection config --------------------------------------------------------------------------
DISTANCES = {"Cosine": "cosine", "Dot": "ip", "Euclid": "l2"}  # Qdrant's distance -> tqindex's metric
QDRANT_DISTANCE = {v: k for k, v in DISTANCES.items()}
# TurboQuant defaults (every distance): 4-bit MSE codes ranked better than PROD codes at equal bytes in
# every measurement of this repository, rescored x4 from the originals.
DEFAULTS = {"bits": 4, "codec": "mse", "rerank": 4, "seed": 0}
TQ_FIELDS = {"bits", "codec", "rerank", "seed", "index"}


@dataclass(frozen=True)
class CollectionSpec:
    """A collection's configuration, as stored in its config.json; ``metadata``: Qdrant's collection
    metadata as given at creation (its "tqindex" object holds the TurboQuant settings)."""

    name: str
    dim: int
    metric: str = "ip"
    bits: int = 4
    codec: str = "prod"
    rerank: int = 4
    seed: int = 0
    index: tuple[tuple[str, Any], ...] = (("type", "flat"),)  # {"type": "flat"} or {"type": "ivf", ...}
    metadata: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def index_kwargs(self) -> dict[str, Any]:
        return {"metric": self.metric, "bits": self.bits, "codec": self.codec, "rerank": self.rerank,
                "seed": self.seed}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "CollectionSpec":
        """Read a config.json (written by :meth:`to_json`; those of before "index" existed are flat)."""
        raw = dict(raw)
        index = raw.pop("index", {"type": "flat"})
        return cls(**raw, index=tuple(index.items()))

    @property
    def index_spec(self) -> dict[str, Any]:
        return dict(self.index)

    def tqindex_settings(self) -> dict[str, Any]:
        """The effective TurboQuant settings, in the form of metadata.tqindex."""
        return {"bits": self.bits, "codec": self.codec, "rerank": self.rerank, "seed": self.seed,
                "index": self.index_spec}

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dim": self.dim, "metric": self.metric, "bits": self.bits,
               "codec": self.codec, "rerank": self.rerank, "seed": self.seed}
        if self.index_spec["type"] != "flat":  # flat collections keep the config.json of before
            out["index"] = self.index_spec
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


def parse_index(v: Any) -> tuple[tuple[str, Any], ...]:
    """metadata.tqindex.index: {"type": "flat"} (default) or {"type": "ivf", "nlist": L, "nprobe": P
    (default 16, at most L), "train_at": T (points at which the lists are trained; default
    max(39 * L, 1000))}."""
    d = obj(v, "metadata.tqindex.index")
    kind = d.get("type", "flat")
    if kind == "flat":
        no_unknown(d, {"type"}, "metadata.tqindex.index")
        return (("type", "flat"),)
    if kind != "ivf":
        raise ApiError(400, f"metadata.tqindex.index.type is {short(kind)}; expected 'flat' or 'ivf'")
    no_unknown(d, {"type", "nlist", "nprobe", "train_at"}, "metadata.tqindex.index")
    if "nlist" not in d:
        raise ApiError(400, "metadata.tqindex.index has no 'nlist'; expected the number of inverted lists of an "
                            "ivf index")
    nlist = check_int(d["nlist"], "index.nlist", 1, 65536)
    nprobe = check_int(d.get("nprobe", min(16, nlist)), "index.nprobe", 1, nlist)
    train_at = check_int(d.get("train_at", max(39 * nlist, 1000)), "index.train_at", nlist, INT64_MAX)
    return (("type", "ivf"), ("nlist", nlist), ("nprobe", nprobe), ("train_at", train_at))


_VECTOR_PARAMS = {"size", "distance", "hnsw_config", "quantization_config", "on_disk", "memory", "datatype",
                  "multivector_config"}
_CREATE = {"vectors", "shard_number", "sharding_method", "replication_factor", "write_consistency_factor",
           "on_disk_payload", "payload", "id_tracker", "hnsw_config", "wal_config", "optimizers_config",
           "quantization_config", "sparse_vectors", "strict_mode_config", "metadata", "init_from"}


def _vector_params(v: Any) -> tuple[int, str, dict[str, Any]]:
    d = obj(v, "vectors")
    if "size" not in d and "distance" not in d:
        names = sorted(d)
        if names == [""]:  # the unnamed vector written as a map (LangChain does this)
            d = obj(d[""], 'vectors[""]')
        else:
            raise ApiError(400, f"vectors names the vectors {[short(n) for n in names][:10]}: named vectors are not "
                                "supported by tqindex; expected one unnamed vector config {\"size\", \"distance\"}")
    no_unknown(d, _VECTOR_PARAMS, "vectors")
    if d.get("multivector_config") is not None:
        raise ApiError(400, "vectors.multivector_config: multivectors are not supported by tqindex; expected one "
                            "vector per point")
    if d.get("datatype") not in (None, "float32"):
        raise ApiError(400, f"vectors.datatype is {short(d['datatype'])}; tqindex keeps float32 originals beside its "
                            "TurboQuant codes: expected 'float32' or no datatype")
    if d.get("quantization_config") is not None:
        raise ApiError(400, "vectors.quantization_config: Qdrant quantization is not supported (tqindex always stores "
                            "TurboQuant codes); expected none, with bits/codec/rerank in metadata.tqindex")
    if "size" not in d or "distance" not in d:
        raise ApiError(400, f"vectors has fields {sorted(d)}; expected 'size' and 'distance'")
    dist = d["distance"]
    if dist not in DISTANCES:
        raise ApiError(400, f"vectors.distance is {short(dist)}; expected one of {list(DISTANCES)} "
                            "(Manhattan is not supported by tqindex)")
    return d["size"], DISTANCES[dist], d


def parse_collection(name: Any, v: Any, settings: Settings) -> CollectionSpec:
    """Body of PUT /collections/{name} (Qdrant's CreateCollection). TurboQuant settings come from
    ``metadata.tqindex`` ({"bits", "codec", "rerank", "seed", "index"}), else DEFAULTS. Cluster, HNSW,
    WAL and optimizer settings are accepted and ignored (they change no answer); features that would
    (named, sparse or multi-vectors, Qdrant quantization, init_from) are a 400 naming them."""
    name = check_name(name)
    d = obj(v)
    no_unknown(d, _CREATE, "collection config")
    if d.get("vectors") is None:
        raise ApiError(400, "collection config has no 'vectors'; expected {\"vectors\": {\"size\": dim, "
                            "\"distance\": \"Cosine\" | \"Dot\" | \"Euclid\"}}")
    size, metric, _ = _vector_params(d["vectors"])
    if d.get("sparse_vectors"):
        raise ApiError(400, "sparse_vectors: sparse vectors are not supported by tqindex; expected none or {}")
    if d.get("quantization_config") is not None:
        raise ApiError(400, "quantization_config: Qdrant quantization is not supported (tqindex always stores "
                            "TurboQuant codes); expected none, with bits/codec/rerank in metadata.tqindex")
    if d.get("init_from") is not None:
        raise ApiError(400, "init_from: creating a collection from another is not supported by tqindex")
    for f in ("shard_number", "replication_factor", "write_consistency_factor"):
        if d.get(f) is not None:
            check_int(d[f], f, 1, 1 << 31)
    dim = check_int(size, "vectors.size", 2, settings.max_dim)
    meta = d.get("metadata")
    if meta is not None:
        obj(meta, "metadata")
        check_payload(meta, "metadata", settings)
    tq = obj(meta.get("tqindex", {}), "metadata.tqindex") if meta else {}
    no_unknown(tq, TQ_FIELDS, "metadata.tqindex")
    codec = tq.get("codec", DEFAULTS["codec"])
    if codec not in CODECS:
        raise ApiError(400, f"metadata.tqindex.codec is {short(codec)}; expected one of {list(CODECS)}")
    lo, hi = BITS[codec]
    bits = check_int(tq.get("bits", DEFAULTS["bits"]), f"metadata.tqindex.bits (codec {codec})", lo, hi)
    rerank = check_int(tq.get("rerank", DEFAULTS["rerank"]), "metadata.tqindex.rerank", 0, settings.max_rerank)
    seed = check_int(tq.get("seed", DEFAULTS["seed"]), "metadata.tqindex.seed", 0, INT64_MAX)
    index = parse_index(tq["index"]) if "index" in tq else (("type", "flat"),)
    return CollectionSpec(name, dim, metric, bits, codec, rerank, seed, index, meta)

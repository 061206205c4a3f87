"""Request validation: JSON bodies -> typed requests, or ApiError(4xx) before any state changes."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.config import Settings
from server.errors import ApiError
from server.payloads import Condition, Filter
from tqindex.index import MAX_NORM, norm_error

__all__ = [
    "parse_json", "CollectionSpec", "UpsertRequest", "SearchRequest", "IdsRequest", "ScrollRequest",
    "parse_collection", "parse_upsert", "parse_search", "parse_ids_request", "parse_scroll", "check_name",
    "check_payload",
]

INT64_MAX = (1 << 63) - 1
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
METRICS = ("ip", "cosine", "l2")
CODECS = ("prod", "mse")
BITS = {"prod": (1, 9), "mse": (1, 8)}


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; every number must be finite")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e400 parses to inf: it could be neither stored in the log nor answered
        raise ValueError(f"number {_short(text, 40)} is beyond the range of a double; every number must be finite")
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


def _obj(v: Any, what: str = "request body") -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ApiError(400, f"{what} is a JSON {_tname(v)}; expected a JSON object")
    return v


def _no_unknown(d: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ApiError(400, f"{what} has unknown field(s) {extra}; expected only {sorted(allowed)}")


def _int(v: Any, name: str, lo: int, hi: int, *, status_hi: int = 400) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} is {_short(v)} ({_tname(v)}); expected an integer in {lo}..{hi}")
    if v < lo:
        raise ApiError(400, f"{name} is {v}; expected an integer in {lo}..{hi}")
    if v > hi:
        raise ApiError(status_hi, f"{name} is {v}; expected an integer in {lo}..{hi}")
    return v


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} is {_short(v)} ({_tname(v)}); expected true or false")
    return v


def check_name(name: Any) -> str:
    """A collection name: 1-64 characters of letters, digits, '_' and '-'."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(400, f"collection name {_short(name)} is invalid; expected 1-64 characters of "
                            "letters, digits, '_' or '-'")
    return name


# -- ids and vectors --------------------------------------------------------------------------------
def _id(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{where} is {_short(v)} ({_tname(v)}); expected an integer id in 0..{INT64_MAX}")
    if v < 0 or v > INT64_MAX:
        raise ApiError(400, f"{where} is {v}, outside int64 ids; expected an integer in 0..{INT64_MAX}")
    return v


def _ids(v: Any, name: str, settings: Settings, *, unique: bool) -> np.ndarray:
    if not isinstance(v, list):
        raise ApiError(400, f"{name} is a JSON {_tname(v)}; expected an array of integer ids")
    if len(v) > settings.max_batch:
        raise ApiError(413, f"{name} holds {len(v)} ids; expected at most {settings.max_batch} (--max-batch)")
    out = np.fromiter((_id(x, f"{name}[{i}]") for i, x in enumerate(v)), dtype=np.int64, count=len(v))
    if unique and np.unique(out).size != out.size:
        u, c = np.unique(out, return_counts=True)
        raise ApiError(400, f"{name} has duplicate ids {u[c > 1][:10].tolist()}; expected each id at most once")
    return out


def _vectors(rows: list[Any], dim: int, where: str, metric: str) -> np.ndarray:
    """List of n rows -> (n, dim) float32, finite; ``where(i)`` names row i in messages. For ip and l2,
    each row's norm must be at most tqindex's MAX_NORM (so the index can never overflow on it)."""
    for i, r in enumerate(rows):
        if not isinstance(r, list):
            raise ApiError(400, f"{where.format(i)} is a JSON {_tname(r)}; expected an array of {dim} numbers")
        if len(r) != dim:
            raise ApiError(400, f"{where.format(i)} has {len(r)} dimensions, but this collection expects {dim}")
    types = set(map(type, itertools.chain.from_iterable(rows)))
    if not types <= {int, float}:
        for i, r in enumerate(rows):
            for j, x in enumerate(r):
                if type(x) not in (int, float):
                    raise ApiError(400, f"{where.format(i)}[{j}] is {_short(x)} ({_tname(x)}); expected a number")
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


# -- requests ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollectionSpec:
    """A collection's configuration, as stored in its config.json."""

    name: str
    dim: int
    metric: str = "ip"
    bits: int = 4
    codec: str = "prod"
    rerank: int = 4
    seed: int = 0
    index: tuple[tuple[str, Any], ...] = (("type", "flat"),)  # {"type": "flat"} or {"type": "ivf", ...}

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

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dim": self.dim, "metric": self.metric, "bits": self.bits,
               "codec": self.codec, "rerank": self.rerank, "seed": self.seed}
        if self.index_spec["type"] != "flat":  # flat collections keep the config.json of before
            out["index"] = self.index_spec
        return out


def parse_index(v: Any) -> tuple[tuple[str, Any], ...]:
    """The "index" of a collection config: {"type": "flat"} (default) or {"type": "ivf", "nlist": L,
    "nprobe": P (default 16, at most L), "train_at": T (points at which the lists are trained; default
    max(39 * L, 1000))}."""
    d = _obj(v, "index")
    kind = d.get("type", "flat")
    if kind == "flat":
        _no_unknown(d, {"type"}, "index")
        return (("type", "flat"),)
    if kind != "ivf":
        raise ApiError(400, f"index.type is {_short(kind)}; expected 'flat' or 'ivf'")
    _no_unknown(d, {"type", "nlist", "nprobe", "train_at"}, "index")
    if "nlist" not in d:
        raise ApiError(400, "index has no 'nlist'; expected the number of inverted lists of an ivf index")
    nlist = _int(d["nlist"], "index.nlist", 1, 65536)
    nprobe = _int(d.get("nprobe", min(16, nlist)), "index.nprobe", 1, nlist)
    train_at = _int(d.get("train_at", max(39 * nlist, 1000)), "index.train_at", nlist, INT64_MAX)
    return (("type", "ivf"), ("nlist", nlist), ("nprobe", nprobe), ("train_at", train_at))


def parse_collection(v: Any, settings: Settings) -> CollectionSpec:
    """Body of POST /collections."""
    d = _obj(v)
    _no_unknown(d, {"name", "dim", "metric", "bits", "codec", "rerank", "seed", "index"}, "collection config")
    if "name" not in d or "dim" not in d:
        raise ApiError(400, f"collection config has fields {sorted(d)}; expected at least 'name' and 'dim'")
    name = check_name(d["name"])
    dim = _int(d["dim"], "dim", 2, settings.max_dim)
    metric = d.get("metric", "ip")
    if metric not in METRICS:
        raise ApiError(400, f"metric is {_short(metric)}; expected one of {list(METRICS)}")
    codec = d.get("codec", "prod")
    if codec not in CODECS:
        raise ApiError(400, f"codec is {_short(codec)}; expected one of {list(CODECS)}")
    lo, hi = BITS[codec]
    bits = _int(d.get("bits", 4), f"bits (codec {codec})", lo, hi)
    rerank = _int(d.get("rerank", 4), "rerank", 0, settings.max_rerank)
    seed = _int(d.get("seed", 0), "seed", 0, (1 << 63) - 1)
    index = parse_index(d["index"]) if "index" in d else (("type", "flat"),)
    return CollectionSpec(name, dim, metric, bits, codec, rerank, seed, index)


@dataclass(frozen=True)
class UpsertRequest:
    """Validated upsert: ids (n,) int64 unique, vectors (n, dim) float32 finite, payloads (n)."""

    ids: np.ndarray
    vectors: np.ndarray
    payloads: list[dict[str, Any] | None]


def parse_upsert(v: Any, dim: int, settings: Settings, metric: str = "ip") -> UpsertRequest:
    """Body of PUT /collections/{name}/points."""
    d = _obj(v)
    _no_unknown(d, {"points"}, "upsert request")
    pts = d.get("points")
    if not isinstance(pts, list):
        raise ApiError(400, f"points is {'missing' if pts is None else 'a JSON ' + _tname(pts)}; "
                            "expected an array of {\"id\", \"vector\", \"payload\"} objects")
    if len(pts) > settings.max_batch:
        raise ApiError(413, f"points holds {len(pts)} points; expected at most {settings.max_batch} (--max-batch)")
    ids, rows, payloads = [], [], []
    for i, p in enumerate(pts):
        p = _obj(p, f"points[{i}]")
        _no_unknown(p, {"id", "vector", "payload"}, f"points[{i}]")
        if "id" not in p or "vector" not in p:
            raise ApiError(400, f"points[{i}] has fields {sorted(p)}; expected 'id' and 'vector' (and optional 'payload')")
        ids.append(_id(p["id"], f"points[{i}].id"))
        rows.append(p["vector"])
        pl = p.get("payload")
        if pl is not None and not isinstance(pl, dict):
            raise ApiError(400, f"points[{i}].payload is a JSON {_tname(pl)}; expected an object or null")
        if pl is not None:
            check_payload(pl, f"points[{i}].payload", settings)
        payloads.append(pl)
    arr = np.asarray(ids, dtype=np.int64)
    if np.unique(arr).size != arr.size:
        u, c = np.unique(arr, return_counts=True)
        raise ApiError(400, f"points has duplicate ids {u[c > 1][:10].tolist()} in one batch; expected each id once")
    vecs = _vectors(rows, dim, "points[{}].vector", metric) if rows else np.empty((0, dim), np.float32)
    return UpsertRequest(arr, vecs, payloads)


@dataclass(frozen=True)
class SearchRequest:
    """Validated search: queries (nq, dim) float32, k, optional rerank, filter; batch: 'vectors' was used."""

    queries: np.ndarray
    k: int
    rerank: int | None
    with_payload: bool
    with_vector: bool
    filter: Filter | None
    batch: bool
    nprobe: int | None = None


def _scalar(v: Any, where: str) -> Any:
    if isinstance(v, (str, bool, int, float)):
        return v
    raise ApiError(400, f"{where} is {_short(v)} ({_tname(v)}); expected a string, number or boolean")


def _condition(c: Any, where: str, settings: Settings) -> Condition:
    c = _obj(c, where)
    if "has_id" in c:
        _no_unknown(c, {"has_id"}, where)
        return Condition(ids=tuple(_ids(c["has_id"], f"{where}.has_id", settings, unique=False).tolist()))
    _no_unknown(c, {"key", "match"}, where)
    key, match = c.get("key"), c.get("match")
    if not isinstance(key, str) or not key:
        raise ApiError(400, f"{where}.key is {_short(key)}; expected a non-empty string (a payload key, dotted for nested)")
    m = _obj(match, f"{where}.match")
    if set(m) == {"value"}:
        return Condition(key=key, values=(_scalar(m["value"], f"{where}.match.value"),))
    if set(m) == {"any"} and isinstance(m["any"], list):
        return Condition(key=key, values=tuple(_scalar(x, f"{where}.match.any[{i}]") for i, x in enumerate(m["any"])))
    raise ApiError(400, f"{where}.match is {_short(m)}; expected {{\"value\": v}} or {{\"any\": [v, ...]}}")


def parse_filter(v: Any, settings: Settings) -> Filter | None:
    if v is None:
        return None
    d = _obj(v, "filter")
    _no_unknown(d, {"must", "should", "must_not"}, "filter")
    parts: dict[str, tuple[Condition, ...]] = {}
    for part in ("must", "should", "must_not"):
        conds = d.get(part, [])
        if isinstance(conds, dict):
            conds = [conds]
        if not isinstance(conds, list):
            raise ApiError(400, f"filter.{part} is a JSON {_tname(conds)}; expected an array of conditions")
        parts[part] = tuple(_condition(c, f"filter.{part}[{i}]", settings) for i, c in enumerate(conds))
    return Filter(**parts)


def parse_search(v: Any, dim: int, settings: Settings, metric: str = "ip") -> SearchRequest:
    """Body of POST /collections/{name}/search."""
    d = _obj(v)
    _no_unknown(d, {"vector", "vectors", "k", "limit", "rerank", "nprobe", "with_payload", "with_vector", "filter"},
                "search request")
    if ("vector" in d) == ("vectors" in d):
        raise ApiError(400, "search request has " + ("both 'vector' and 'vectors'" if "vector" in d else
                                                     "neither 'vector' nor 'vectors'") +
                       "; expected exactly one of them")
    if "vector" in d:
        queries = _vectors([d["vector"]], dim, "vector", metric)
        batch = False
    else:
        rows = d["vectors"]
        if not isinstance(rows, list) or not rows:
            raise ApiError(400, f"vectors is {_short(rows)}; expected a non-empty array of vectors")
        if len(rows) > settings.max_batch:
            raise ApiError(413, f"vectors holds {len(rows)} queries; expected at most {settings.max_batch} (--max-batch)")
        queries = _vectors(rows, dim, "vectors[{}]", metric)
        batch = True
    if "k" in d and "limit" in d:
        raise ApiError(400, "search request has both 'k' and 'limit'; expected one of them")
    if "k" not in d and "limit" not in d:
        raise ApiError(400, "search request has no 'k'; expected an integer number of results")
    k = _int(d.get("k", d.get("limit")), "k", 1, settings.max_k)
    if queries.shape[0] * k > settings.max_results:
        raise ApiError(413, f"search asks for {queries.shape[0]} queries x k {k} = {queries.shape[0] * k} results; "
                            f"expected at most {settings.max_results} per request (--max-results)")
    rerank = d.get("rerank")
    rerank = None if rerank is None else _int(rerank, "rerank", 0, settings.max_rerank)
    nprobe = d.get("nprobe")
    nprobe = None if nprobe is None else _int(nprobe, "nprobe", 1, 65536)
    return SearchRequest(
        queries, k, rerank,
        _bool(d.get("with_payload", False), "with_payload"),
        _bool(d.get("with_vector", False), "with_vector"),
        parse_filter(d.get("filter"), settings),
        batch, nprobe,
    )


@dataclass(frozen=True)
class IdsRequest:
    ids: np.ndarray
    with_payload: bool = True
    with_vector: bool = False


def parse_ids_request(v: Any, settings: Settings, *, get: bool) -> IdsRequest:
    """Body of points/get (ids, with_payload, with_vector) or points/delete (ids)."""
    d = _obj(v)
    allowed = {"ids", "with_payload", "with_vector"} if get else {"ids"}
    _no_unknown(d, allowed, "request")
    if "ids" not in d:
        raise ApiError(400, f"request has fields {sorted(d)}; expected 'ids': an array of integer ids")
    ids = _ids(d["ids"], "ids", settings, unique=False)
    if not get:
        return IdsRequest(ids)
    return IdsRequest(ids, _bool(d.get("with_payload", True), "with_payload"),
                      _bool(d.get("with_vector", False), "with_vector"))


@dataclass(frozen=True)
class ScrollRequest:
    offset: int | None
    limit: int
    with_payload: bool
    with_vector: bool
    filter: Filter | None


def parse_scroll(v: Any, settings: Settings) -> ScrollRequest:
    """Body of points/scroll: offset (first id, inclusive), limit, with_payload, with_vector, filter."""
    d = _obj(v)
    _no_unknown(d, {"offset", "limit", "with_payload", "with_vector", "filter"}, "scroll request")
    off = d.get("offset")
    return ScrollRequest(
        None if off is None else _id(off, "offset"),
        _int(d.get("limit", 10), "limit", 1, settings.max_batch, status_hi=413),
        _bool(d.get("with_payload", True), "with_payload"),
        _bool(d.get("with_vector", False), "with_vector"),
        parse_filter(d.get("filter"), settings),
    )

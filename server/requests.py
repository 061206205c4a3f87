"""Qdrant request bodies of the points routes -> typed requests, or ApiError(4xx) before any state changes.

The bodies are those qdrant-client sends in REST mode (PointsList / Batch, QueryRequest, SearchRequest,
PointRequest, PointsSelector, ScrollRequest, CountRequest, SetPayload, DeletePayload). A field of a
Qdrant feature tqindex lacks (named or sparse vectors, shard keys, prefetch, order_by, ...) is a 400
naming the feature, never ignored where it would change the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.config import Settings
from server.errors import ApiError
from server.filters import Filter, parse_filter
from server.ids import PointId
from server.validation import (
    check_bool, check_int, check_payload, check_unique, no_unknown, obj, parse_point_id, parse_point_ids,
    parse_vectors, short, tname,
)

__all__ = [
    "PayloadSelector", "UpsertRequest", "SearchRequest", "Selector", "PayloadRequest", "ScrollRequest",
    "parse_upsert", "parse_query", "parse_search", "parse_batch", "parse_retrieve", "parse_selector",
    "parse_scroll", "parse_count", "parse_set_payload", "parse_delete_payload", "parse_path_id",
]

# True / False, or ("include" | "exclude", top-level keys)
PayloadSelector = bool | tuple[str, tuple[str, ...]]


def _no_shard_key(d: dict[str, Any], where: str) -> None:
    if d.get("shard_key") is not None:
        raise ApiError(400, f"{where}.shard_key: shard keys (custom sharding) are not supported by tqindex")


def _named(where: str) -> ApiError:
    return ApiError(400, f"{where}: named vectors are not supported by tqindex; expected the unnamed vector "
                         "(no name, or the name \"\")")


def _vector(v: Any, where: str) -> Any:
    """A point's vector as sent: a list, or {"": list} (the unnamed vector as a map)."""
    if isinstance(v, dict):
        if set(v) == {"indices", "values"}:
            raise ApiError(400, f"{where} is a sparse vector: sparse vectors are not supported by tqindex")
        if set(v) != {""}:
            raise _named(where)
        v = v[""]
    if isinstance(v, list) and v and isinstance(v[0], list):
        raise ApiError(400, f"{where} is a list of vectors: multivectors are not supported by tqindex")
    return v


def parse_with_payload(v: Any, where: str = "with_payload") -> PayloadSelector:
    """with_payload: true / false, a list of keys, {"include": [...]} or {"exclude": [...]} (top-level keys)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, list):
        mode, keys = "include", v
    elif isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("include", "exclude"):
        mode, keys = next(iter(v.items()))
    else:
        raise ApiError(400, f"{where} is {short(v)}; expected true, false, a list of keys, {{\"include\": [...]}} "
                            "or {\"exclude\": [...]}")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ApiError(400, f"{where}.{mode} is {short(keys)}; expected a list of payload keys")
    return (mode, tuple(keys))


def parse_with_vector(v: Any, where: str = "with_vector") -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, list) and all(isinstance(n, str) for n in v):
        if set(v) <= {""}:
            return bool(v)
        raise _named(where)
    raise ApiError(400, f"{where} is {short(v)} ({tname(v)}); expected true or false")


def parse_path_id(raw: str) -> PointId:
    """The {id} of GET /collections/{name}/points/{id}: digits are an integer id, else a UUID."""
    return parse_point_id(int(raw) if raw.isdigit() else raw, "point id")


# -- upsert -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpsertRequest:
    """Validated upsert: n unique ids (int or UUID), vectors (n, dim) float32 finite, n payloads (or None)."""

    ids: list[PointId]
    vectors: np.ndarray
    payloads: list[dict[str, Any] | None]


def _payload(pl: Any, where: str, settings: Settings) -> dict[str, Any] | None:
    if pl is None:
        return None
    if not isinstance(pl, dict):
        raise ApiError(400, f"{where} is a JSON {tname(pl)}; expected an object or null")
    check_payload(pl, where, settings)
    return pl


def parse_upsert(v: Any, dim: int, settings: Settings, metric: str = "ip") -> UpsertRequest:
    """Body of PUT /collections/{name}/points: {"points": [{"id", "vector", "payload"}]} or
    {"batch": {"ids", "vectors", "payloads"}}."""
    d = obj(v)
    no_unknown(d, {"points", "batch", "shard_key", "update_filter", "update_mode"}, "upsert request")
    _no_shard_key(d, "upsert request")
    if d.get("update_filter") is not None:
        raise ApiError(400, "update_filter: conditional upserts are not supported by tqindex")
    if d.get("update_mode") not in (None, "upsert"):
        raise ApiError(400, f"update_mode is {short(d['update_mode'])}; tqindex supports only 'upsert'")
    if ("points" in d) == ("batch" in d):
        raise ApiError(400, "upsert request has " + ("both 'points' and 'batch'" if "points" in d else
                                                     "neither 'points' nor 'batch'") + "; expected one of them")
    ids: list[PointId] = []
    rows: list[Any] = []
    payloads: list[dict[str, Any] | None] = []
    if "points" in d:
        pts = d["points"]
        if not isinstance(pts, list):
            raise ApiError(400, f"points is a JSON {tname(pts)}; expected an array of {{\"id\", \"vector\", "
                                "\"payload\"} objects")
        if len(pts) > settings.max_batch:
            raise ApiError(413, f"points holds {len(pts)} points; expected at most {settings.max_batch} (--max-batch)")
        for i, p in enumerate(pts):
            p = obj(p, f"points[{i}]")
            no_unknown(p, {"id", "vector", "payload"}, f"points[{i}]")
            if "id" not in p or "vector" not in p:
                raise ApiError(400, f"points[{i}] has fields {sorted(p)}; expected 'id' and 'vector' (and optional "
                                    "'payload')")
            ids.append(parse_point_id(p["id"], f"points[{i}].id"))
            rows.append(_vector(p["vector"], f"points[{i}].vector"))
            payloads.append(_payload(p.get("payload"), f"points[{i}].payload", settings))
        where = "points[{}].vector"
    else:
        b = obj(d["batch"], "batch")
        no_unknown(b, {"ids", "vectors", "payloads"}, "batch")
        ids = parse_point_ids(b.get("ids"), "batch.ids", settings, unique=False)
        vecs = b.get("vectors")
        if isinstance(vecs, dict):  # {"": [[...], ...]}: the unnamed vector as a map
            if set(vecs) != {""}:
                raise _named("batch.vectors")
            vecs = vecs[""]
        if not isinstance(vecs, list) or len(vecs) != len(ids):
            raise ApiError(400, f"batch.vectors is {short(vecs)}; expected an array of {len(ids)} vectors (one per id)")
        rows = [_vector(r, f"batch.vectors[{i}]") for i, r in enumerate(vecs)]
        pls = b.get("payloads")
        if pls is not None and (not isinstance(pls, list) or len(pls) != len(ids)):
            raise ApiError(400, f"batch.payloads is {short(pls)}; expected null or an array of {len(ids)} payloads")
        payloads = [_payload(p, f"batch.payloads[{i}]", settings) for i, p in enumerate(pls or [None] * len(ids))]
        where = "batch.vectors[{}]"
    check_unique(ids, "points" if "points" in d else "batch.ids")
    return UpsertRequest(ids, parse_vectors(rows, dim, where, metric), payloads)


# -- search -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchRequest:
    """One validated query: vector (1, dim) float32; ``limit`` hits after skipping ``offset``.

    rerank / nprobe: None for the collection's setting; exact: score every candidate from the originals.
    """

    query: np.ndarray
    limit: int
    offset: int
    rerank: int | None
    nprobe: int | None
    exact: bool
    with_payload: PayloadSelector
    with_vector: bool
    filter: Filter | None
    score_threshold: float | None


_QUERY_KINDS = {"recommend": "recommend queries", "discover": "discover queries", "context": "context queries",
                "order_by": "order_by queries", "fusion": "fusion queries", "rrf": "fusion queries",
                "formula": "formula queries", "sample": "sample queries"}


def _params(v: Any, settings: Settings) -> tuple[int | None, int | None, bool]:
    """SearchParams -> (rerank, nprobe, exact). quantization.oversampling is the rescoring factor,
    quantization.rescore=false turns rescoring off, quantization.ignore or exact scores exactly,
    hnsw_ef is the nprobe of an ivf collection."""
    if v is None:
        return None, None, False
    d = obj(v, "params")
    no_unknown(d, {"hnsw_ef", "exact", "quantization", "indexed_only", "acorn", "idf"}, "params")
    exact = check_bool(d["exact"], "params.exact") if d.get("exact") is not None else False
    nprobe = None if d.get("hnsw_ef") is None else check_int(d["hnsw_ef"], "params.hnsw_ef", 1, 65536)
    rerank = None
    if d.get("quantization") is not None:
        q = obj(d["quantization"], "params.quantization")
        no_unknown(q, {"ignore", "rescore", "oversampling"}, "params.quantization")
        if q.get("ignore") is not None and check_bool(q["ignore"], "params.quantization.ignore"):
            exact = True
        over = q.get("oversampling")
        if over is not None:
            if isinstance(over, bool) or not isinstance(over, (int, float)) or not 1 <= over <= settings.max_rerank:
                raise ApiError(400, f"params.quantization.oversampling is {short(over)}; expected a number in "
                                    f"1..{settings.max_rerank} (the rescoring factor, --max-rerank)")
            rerank = int(math.ceil(over))
        if q.get("rescore") is not None and not check_bool(q["rescore"], "params.quantization.rescore"):
            rerank = 0
    return rerank, nprobe, exact


def _limits(d: dict[str, Any], settings: Settings) -> tuple[int, int]:
    limit = check_int(d["limit"], "limit", 1, settings.max_k) if d.get("limit") is not None else 10
    offset = check_int(d["offset"], "offset", 0, settings.max_k) if d.get("offset") is not None else 0
    if limit + offset > settings.max_k:
        raise ApiError(400, f"limit {limit} + offset {offset} is {limit + offset}; expected at most {settings.max_k} "
                            "(--max-k)")
    return limit, offset


def _threshold(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"score_threshold is {short(v)} ({tname(v)}); expected a number")
    return float(v)


def _search(d: dict[str, Any], vec: Any, where: str, dim: int, settings: Settings, metric: str,
            with_payload_default: PayloadSelector) -> SearchRequest:
    q = parse_vectors([_vector(vec, where)], dim, where, metric)
    limit, offset = _limits(d, settings)
    rerank, nprobe, exact = _params(d.get("params"), settings)
    wp = parse_with_payload(d["with_payload"]) if d.get("with_payload") is not None else with_payload_default
    wv = parse_with_vector(d["with_vector"]) if d.get("with_vector") is not None else False
    return SearchRequest(q, limit, offset, rerank, nprobe, exact, wp, wv,
                         parse_filter(d.get("filter"), max_items=settings.max_batch), _threshold(d.get("score_threshold")))


def parse_query(v: Any, dim: int, settings: Settings, metric: str = "ip") -> SearchRequest:
    """Body of POST /collections/{name}/points/query (QueryRequest) with a nearest-vector query."""
    d = obj(v)
    no_unknown(d, {"shard_key", "prefetch", "query", "using", "filter", "params", "score_threshold", "limit",
                   "offset", "with_vector", "with_payload", "lookup_from"}, "query request")
    _no_shard_key(d, "query request")
    if d.get("prefetch") not in (None, []):
        raise ApiError(400, "prefetch: multi-stage and hybrid queries are not supported by tqindex; expected a "
                            "single nearest-vector query")
    if d.get("lookup_from") is not None:
        raise ApiError(400, "lookup_from: queries by the vectors of another collection are not supported by tqindex")
    if d.get("using") not in (None, ""):
        raise _named(f"using is {short(d['using'])}")
    q = d.get("query")
    if q is None:
        raise ApiError(400, "query request has no 'query'; expected a vector (queries without one are not supported "
                            "by tqindex: use /points/scroll)")
    if isinstance(q, dict):
        if "nearest" in q:
            no_unknown(q, {"nearest", "mmr"}, "query")
            if q.get("mmr") is not None:
                raise ApiError(400, "query.mmr: maximal-marginal-relevance queries are not supported by tqindex")
            q = q["nearest"]
        else:
            for kind, what in _QUERY_KINDS.items():
                if kind in q:
                    raise ApiError(400, f"query.{kind}: {what} are not supported by tqindex; expected a vector or "
                                        "{\"nearest\": vector}")
    if isinstance(q, (str, int)) and not isinstance(q, bool):
        raise ApiError(400, f"query is {short(q)}, a point id: queries by point id are not supported by tqindex; "
                            "expected a vector")
    if isinstance(q, dict) and set(q) != {""} and set(q) != {"indices", "values"}:
        raise ApiError(400, f"query is {short(q)}; expected a vector or {{\"nearest\": vector}}")
    return _search(d, q, "query", dim, settings, metric, False)


def parse_search(v: Any, dim: int, settings: Settings, metric: str = "ip") -> SearchRequest:
    """Body of POST /collections/{name}/points/search (Qdrant's SearchRequest, the API before query)."""
    d = obj(v)
    no_unknown(d, {"shard_key", "vector", "filter", "params", "limit", "offset", "with_payload", "with_vector",
                   "score_threshold"}, "search request")
    _no_shard_key(d, "search request")
    vec = d.get("vector")
    if isinstance(vec, dict) and "name" in vec:
        no_unknown(vec, {"name", "vector"}, "vector")
        if vec["name"] != "":
            raise _named(f"vector.name is {short(vec['name'])}")
        vec = vec.get("vector")
    if vec is None:
        raise ApiError(400, "search request has no 'vector'; expected an array of numbers")
    if d.get("limit") is None:
        raise ApiError(400, "search request has no 'limit'; expected an integer number of results")
    return _search(d, vec, "vector", dim, settings, metric, False)


def parse_batch(v: Any, settings: Settings) -> list[Any]:
    """{"searches": [...]} of the /batch routes -> the list of request bodies (each parsed on its own)."""
    d = obj(v)
    no_unknown(d, {"searches"}, "batch request")
    s = d.get("searches")
    if not isinstance(s, list):
        raise ApiError(400, f"searches is {short(s)}; expected an array of requests")
    if len(s) > settings.max_batch:
        raise ApiError(413, f"searches holds {len(s)} requests; expected at most {settings.max_batch} (--max-batch)")
    return s


# -- retrieve, select, scroll, count ----------------------------------------------------------------
def parse_retrieve(v: Any, settings: Settings) -> tuple[list[PointId], PayloadSelector, bool]:
    """Body of POST /collections/{name}/points (PointRequest): (ids, with_payload, with_vector)."""
    d = obj(v)
    no_unknown(d, {"ids", "with_payload", "with_vector", "shard_key"}, "retrieve request")
    _no_shard_key(d, "retrieve request")
    if "ids" not in d:
        raise ApiError(400, f"retrieve request has fields {sorted(d)}; expected 'ids': an array of point ids")
    ids = parse_point_ids(d["ids"], "ids", settings, unique=False)
    wp = parse_with_payload(d["with_payload"]) if d.get("with_payload") is not None else True
    wv = parse_with_vector(d["with_vector"]) if d.get("with_vector") is not None else False
    return ids, wp, wv


@dataclass(frozen=True)
class Selector:
    """The points an operation applies to: listed ids, or those matching a filter."""

    ids: list[PointId] | None = None
    filter: Filter | None = None


def _selector(d: dict[str, Any], settings: Settings, where: str) -> Selector:
    has_p, has_f = d.get("points") is not None, d.get("filter") is not None
    if has_p == has_f:
        raise ApiError(400, f"{where} has " + ("both 'points' and 'filter'" if has_p else "neither 'points' nor 'filter'")
                       + "; expected one of them")
    if has_p:
        return Selector(ids=parse_point_ids(d["points"], "points", settings, unique=False))
    return Selector(filter=parse_filter(d["filter"], max_items=settings.max_batch))


def parse_selector(v: Any, settings: Settings, what: str) -> Selector:
    """A PointsSelector body ({"points": [...]} or {"filter": {...}}): points/delete, points/payload/clear."""
    d = obj(v)
    no_unknown(d, {"points", "filter", "shard_key"}, what)
    _no_shard_key(d, what)
    return _selector(d, settings, what)


@dataclass(frozen=True)
class ScrollRequest:
    offset: PointId | None
    limit: int
    with_payload: PayloadSelector
    with_vector: bool
    filter: Filter | None


def parse_scroll(v: Any, settings: Settings) -> ScrollRequest:
    """Body of points/scroll: offset (first id, inclusive), limit, filter, with_payload, with_vector."""
    d = obj(v)
    no_unknown(d, {"offset", "limit", "filter", "with_payload", "with_vector", "order_by", "shard_key"},
               "scroll request")
    _no_shard_key(d, "scroll request")
    if d.get("order_by") is not None:
        raise ApiError(400, "order_by: scrolling in payload order is not supported by tqindex; points come in id order")
    off = d.get("offset")
    return ScrollRequest(
        None if off is None else parse_point_id(off, "offset"),
        check_int(d["limit"], "limit", 1, settings.max_batch, status_hi=413) if d.get("limit") is not None else 10,
        parse_with_payload(d["with_payload"]) if d.get("with_payload") is not None else True,
        parse_with_vector(d["with_vector"]) if d.get("with_vector") is not None else False,
        parse_filter(d.get("filter"), max_items=settings.max_batch),
    )


def parse_count(v: Any, settings: Settings) -> Filter | None:
    """Body of points/count: {"filter", "exact"} (counts are always exact)."""
    d = obj(v)
    no_unknown(d, {"filter", "exact", "shard_key"}, "count request")
    _no_shard_key(d, "count request")
    if d.get("exact") is not None:
        check_bool(d["exact"], "exact")
    return parse_filter(d.get("filter"), max_items=settings.max_batch)


# -- payload updates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PayloadRequest:
    """A payload update of the selected points: mode "set" (merge keys), "overwrite", "delete" (keys), "clear"."""

    selector: Selector
    mode: str
    payload: dict[str, Any] | None = None
    keys: tuple[str, ...] = ()


def parse_set_payload(v: Any, settings: Settings, *, overwrite: bool) -> PayloadRequest:
    """Body of POST (set) or PUT (overwrite) /collections/{name}/points/payload."""
    d = obj(v)
    no_unknown(d, {"payload", "points", "filter", "shard_key", "key"}, "payload request")
    _no_shard_key(d, "payload request")
    if d.get("key") is not None:
        raise ApiError(400, "key: setting a payload under a nested key is not supported by tqindex; expected the "
                            "payload's top-level keys")
    pl = d.get("payload")
    if not isinstance(pl, dict):
        raise ApiError(400, f"payload is {short(pl)} ({tname(pl)}); expected a JSON object")
    check_payload(pl, "payload", settings)
    return PayloadRequest(_selector(d, settings, "payload request"), "overwrite" if overwrite else "set", pl)


def parse_delete_payload(v: Any, settings: Settings) -> PayloadRequest:
    """Body of POST /collections/{name}/points/payload/delete: {"keys", "points" | "filter"}."""
    d = obj(v)
    no_unknown(d, {"keys", "points", "filter", "shard_key"}, "delete payload request")
    _no_shard_key(d, "delete payload request")
    keys = d.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ApiError(400, f"keys is {short(keys)}; expected an array of payload keys")
    return PayloadRequest(_selector(d, settings, "delete payload request"), "delete", keys=tuple(keys))

"""Qdrant payload filters: parsed from request JSON, written back to JSON (log records), evaluated to ids.

Supported: ``must`` / ``should`` / ``must_not`` / ``min_should`` with nested filters, field conditions
``match`` (``value``, ``any``, ``except``), ``range`` (numbers: ``lt``, ``gt``, ``gte``, ``lte``),
``is_empty``, ``is_null`` (as conditions or field flags) and ``has_id``. Keys are dotted paths into
nested objects ("meta.lang"); a list matches when any element does (as in Qdrant). Anything else
Qdrant has (full-text match, geo, values_count, nested array filters, has_vector, datetime ranges)
is a 400 naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from server.errors import ApiError
from server.ids import PointId, PointIds, external_json
from server.payloads import PayloadStore, scalar_key
from server.validation import no_unknown, obj, parse_point_id, short, tname

__all__ = ["Filter", "Match", "Range", "IsEmpty", "IsNull", "HasId", "parse_filter", "matching"]

_UNSUPPORTED_FIELD = {"geo_bounding_box": "geo filters", "geo_radius": "geo filters", "geo_polygon": "geo filters",
                      "values_count": "values_count conditions"}
_UNSUPPORTED_MATCH = {"text": "full-text match (match.text)", "text_any": "full-text match (match.text_any)",
                      "phrase": "phrase match (match.phrase)"}


@dataclass(frozen=True)
class Match:
    """``key`` holds one of ``values`` (match.value / match.any), or, with ``negate``, a value not among them
    (match.except; a point without the key does not match)."""

    key: str
    values: tuple[Any, ...]
    negate: bool = False


@dataclass(frozen=True)
class Range:
    """A number at ``key`` within the bounds that are not None."""

    key: str
    lt: float | None = None
    gt: float | None = None
    gte: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class IsEmpty:
    """``key`` is missing, null or an empty list (``negate``: it holds a value)."""

    key: str
    negate: bool = False


@dataclass(frozen=True)
class IsNull:
    """``key`` is present and null (``negate``: anything else)."""

    key: str
    negate: bool = False


@dataclass(frozen=True)
class HasId:
    ids: tuple[PointId, ...]


Condition = Union[Match, Range, IsEmpty, IsNull, HasId, "Filter"]


@dataclass(frozen=True)
class Filter:
    """All of ``must``, at least one of ``should`` (if any), none of ``must_not``, and at least
    ``min_should[0]`` of ``min_should[1]``."""

    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()
    min_should: tuple[int, tuple[Condition, ...]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The filter as Qdrant JSON (parse_filter(to_json()) gives it back)."""
        out: dict[str, Any] = {}
        for part in ("must", "should", "must_not"):
            conds = getattr(self, part)
            if conds:
                out[part] = [_cond_json(c) for c in conds]
        if self.min_should is not None:
            out["min_should"] = {"min_count": self.min_should[0], "conditions": [_cond_json(c) for c in self.min_should[1]]}
        return out


def _cond_json(c: Condition) -> dict[str, Any]:
    if isinstance(c, Filter):
        return c.to_json()
    if isinstance(c, HasId):
        return {"has_id": [external_json(i) for i in c.ids]}
    if isinstance(c, Match):
        m = {"except": list(c.values)} if c.negate else {"any": list(c.values)}
        return {"key": c.key, "match": m}
    if isinstance(c, Range):
        return {"key": c.key, "range": {k: getattr(c, k) for k in ("lt", "gt", "gte", "lte") if getattr(c, k) is not None}}
    flag = "is_empty" if isinstance(c, IsEmpty) else "is_null"
    return {"key": c.key, flag: not c.negate}


# -- parsing ----------------------------------------------------------------------------------------
def _key(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"{where} is {short(v)}; expected a non-empty string (a payload key, dotted for nested)")
    if "[" in v:
        raise ApiError(400, f"{where} is {short(v)}: array paths (key[]) are not supported by tqindex; expected a "
                            "dotted key")
    return v


def _scalar(v: Any, where: str) -> Any:
    if isinstance(v, (str, bool, int, float)):
        return v
    raise ApiError(400, f"{where} is {short(v)} ({tname(v)}); expected a string, number or boolean")


def _scalars(v: Any, where: str, max_items: int | None) -> tuple[Any, ...]:
    if not isinstance(v, list):
        raise ApiError(400, f"{where} is a JSON {tname(v)}; expected an array of strings, numbers or booleans")
    if max_items is not None and len(v) > max_items:
        raise ApiError(413, f"{where} holds {len(v)} values; expected at most {max_items} (--max-batch)")
    return tuple(_scalar(x, f"{where}[{i}]") for i, x in enumerate(v))


def _number(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):
        raise ApiError(400, f"{where} is {short(v)}: datetime ranges are not supported by tqindex; expected a number")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{where} is {short(v)} ({tname(v)}); expected a number")
    return float(v)


def _field(c: dict[str, Any], where: str, max_items: int | None) -> Condition:
    no_unknown(c, {"key", "match", "range", "is_empty", "is_null", *_UNSUPPORTED_FIELD}, where)
    for f, what in _UNSUPPORTED_FIELD.items():
        if c.get(f) is not None:
            raise ApiError(400, f"{where}.{f}: {what} are not supported by tqindex; expected match, range, "
                                "is_empty or is_null")
    key = _key(c.get("key"), f"{where}.key")
    given = [f for f in ("match", "range", "is_empty", "is_null") if c.get(f) is not None]
    if len(given) != 1:
        raise ApiError(400, f"{where} has {given or 'none'} of match / range / is_empty / is_null; expected exactly one")
    f = given[0]
    if f in ("is_empty", "is_null"):
        v = c[f]
        if not isinstance(v, bool):
            raise ApiError(400, f"{where}.{f} is {short(v)} ({tname(v)}); expected true or false")
        return (IsEmpty if f == "is_empty" else IsNull)(key, negate=not v)
    if f == "range":
        r = obj(c["range"], f"{where}.range")
        no_unknown(r, {"lt", "gt", "gte", "lte"}, f"{where}.range")
        return Range(key, *(_number(r.get(b), f"{where}.range.{b}") for b in ("lt", "gt", "gte", "lte")))
    m = obj(c["match"], f"{where}.match")
    for name, what in _UNSUPPORTED_MATCH.items():
        if name in m:
            raise ApiError(400, f"{where}.match: {what} is not supported by tqindex; expected value, any or except")
    if set(m) == {"value"}:
        return Match(key, (_scalar(m["value"], f"{where}.match.value"),))
    if set(m) == {"any"}:
        return Match(key, _scalars(m["any"], f"{where}.match.any", max_items))
    if set(m) == {"except"}:
        return Match(key, _scalars(m["except"], f"{where}.match.except", max_items), negate=True)
    raise ApiError(400, f"{where}.match is {short(m)}; expected {{\"value\": v}}, {{\"any\": [...]}} or "
                        "{\"except\": [...]}")


def _condition(c: Any, where: str, max_items: int | None, depth: int) -> Condition:
    c = obj(c, where)
    if any(k in c for k in ("must", "should", "must_not", "min_should")):
        return _filter(c, where, max_items, depth + 1)
    if "has_id" in c:
        no_unknown(c, {"has_id"}, where)
        ids = c["has_id"]
        if not isinstance(ids, list):
            raise ApiError(400, f"{where}.has_id is a JSON {tname(ids)}; expected an array of point ids")
        if max_items is not None and len(ids) > max_items:
            raise ApiError(413, f"{where}.has_id holds {len(ids)} ids; expected at most {max_items} (--max-batch)")
        return HasId(tuple(parse_point_id(x, f"{where}.has_id[{i}]") for i, x in enumerate(ids)))
    for flag, cls in (("is_empty", IsEmpty), ("is_null", IsNull)):
        if flag in c and "key" not in c:
            no_unknown(c, {flag}, where)
            f = obj(c[flag], f"{where}.{flag}")
            no_unknown(f, {"key"}, f"{where}.{flag}")
            return cls(_key(f.get("key"), f"{where}.{flag}.key"))
    for name, what in (("nested", "nested (array of objects) filters"), ("has_vector", "has_vector conditions")):
        if name in c:
            raise ApiError(400, f"{where}: {what} are not supported by tqindex")
    if "key" in c:
        return _field(c, where, max_items)
    raise ApiError(400, f"{where} has fields {sorted(c)}; expected a field condition (key + match / range / "
                        "is_empty / is_null), has_id, is_empty, is_null or a nested filter")


def _conditions(v: Any, where: str, max_items: int | None, depth: int) -> tuple[Condition, ...]:
    if v is None:
        return ()
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise ApiError(400, f"{where} is a JSON {tname(v)}; expected an array of conditions")
    return tuple(_condition(c, f"{where}[{i}]", max_items, depth) for i, c in enumerate(v))


def _filter(v: Any, where: str, max_items: int | None, depth: int) -> Filter:
    if depth > 32:
        raise ApiError(400, f"{where} nests filters {depth} levels deep; expected at most 32")
    d = obj(v, where)
    no_unknown(d, {"must", "should", "must_not", "min_should"}, where)
    ms = None
    if d.get("min_should") is not None:
        m = obj(d["min_should"], f"{where}.min_should")
        no_unknown(m, {"conditions", "min_count"}, f"{where}.min_should")
        n = m.get("min_count")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ApiError(400, f"{where}.min_should.min_count is {short(n)}; expected an integer >= 0")
        ms = (n, _conditions(m.get("conditions"), f"{where}.min_should.conditions", max_items, depth))
    return Filter(*(_conditions(d.get(p), f"{where}.{p}", max_items, depth) for p in ("must", "should", "must_not")),
                  min_should=ms)


def parse_filter(v: Any, where: str = "filter", max_items: int | None = None) -> Filter | None:
    """Qdrant filter JSON (or null) -> Filter; ApiError(400) naming the field for anything else.

    ``max_items``: most ids / values in one has_id / any / except list (413 above it); None for log replay."""
    if v is None:
        return None
    return _filter(v, where, max_items, 0)


# -- evaluation -------------------------------------------------------------------------------------
def _values(payload: dict[str, Any] | None, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    cur: Any = payload
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _elements(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _scan(store: PayloadStore, test: Any) -> set[int]:
    return {pid for pid, p in store.items() if test(p)}


def _in_range(c: Range, v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return ((c.lt is None or v < c.lt) and (c.gt is None or v > c.gt) and (c.gte is None or v >= c.gte)
            and (c.lte is None or v <= c.lte))


def _empty(payload: dict[str, Any] | None, key: str) -> bool:
    present, v = _values(payload, key)
    return not present or v is None or v == []


def _cond_ids(c: Condition, store: PayloadStore, ids: PointIds) -> set[int]:
    if isinstance(c, Filter):
        return _filter_ids(c, store, ids)
    if isinstance(c, HasId):
        return {i for i in ids.internals(c.ids) if i in store}
    if isinstance(c, Match) and not c.negate:
        return store.equal(c.key, c.values)
    if isinstance(c, Match):
        banned = {scalar_key(v) for v in c.values}

        def other(p: Any) -> bool:
            present, v = _values(p, c.key)
            return present and any(scalar_key(e) not in banned for e in _elements(v) if scalar_key(e) is not None)

        return _scan(store, other)
    if isinstance(c, Range):
        return _scan(store, lambda p: any(_in_range(c, e) for e in _elements(_values(p, c.key)[1])))
    if isinstance(c, IsEmpty):
        return _scan(store, lambda p: _empty(p, c.key) != c.negate)
    present_null = lambda p: _values(p, c.key) == (True, None)  # noqa: E731
    return _scan(store, lambda p: present_null(p) != c.negate)


def _filter_ids(flt: Filter, store: PayloadStore, ids: PointIds) -> set[int]:
    result: set[int] | None = None
    for c in flt.must:
        s = _cond_ids(c, store, ids)
        result = s if result is None else result & s
        if not result:
            return set()
    if flt.should:
        any_s: set[int] = set()
        for c in flt.should:
            any_s |= _cond_ids(c, store, ids)
        result = any_s if result is None else result & any_s
    if flt.min_should is not None:
        need, conds = flt.min_should
        counts: dict[int, int] = {}
        for c in conds:
            for i in _cond_ids(c, store, ids):
                counts[i] = counts.get(i, 0) + 1
        enough = {i for i, n in counts.items() if n >= need} if need > 0 else store.id_set()
        result = enough if result is None else result & enough
    if result is None:
        result = store.id_set()
    for c in flt.must_not:
        result = result - _cond_ids(c, store, ids)
    return result


def matching(flt: Filter, store: PayloadStore, ids: PointIds) -> np.ndarray:
    """(n,) int64 ascending internal ids of the stored points that satisfy ``flt``."""
    s = _filter_ids(flt, store, ids)
    return np.sort(np.fromiter(s, dtype=np.int64, count=len(s)))

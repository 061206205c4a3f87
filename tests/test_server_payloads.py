"""Payload store, filters and request validation: inverted index upkeep, messages naming given and expected."""

from __future__ import annotations

import numpy as np
import pytest

from server.config import Settings
from server.errors import ApiError
from server.filters import Filter, HasId, Match, matching, parse_filter
from server.ids import PointIds
from server.payloads import PayloadStore
from server.requests import parse_query, parse_upsert
from server.validation import parse_collection, parse_json

S = Settings(max_batch=10, max_k=100)


def _store() -> PayloadStore:
    s = PayloadStore()
    s.set(1, {"color": "red", "n": 1, "tags": ["a", "b"], "meta": {"lang": "en"}})
    s.set(2, {"color": "blue", "n": 2, "flag": True})
    s.set(3, {"color": "red", "n": 1.0, "flag": 1})
    s.set(4, None)
    return s


def _m(s: PayloadStore, flt: Filter) -> list[int]:
    return matching(flt, s, PointIds()).tolist()


def test_filters():
    s = _store()
    eq = lambda k, v: Match(k, (v,))  # noqa: E731
    assert _m(s, Filter(must=(eq("color", "red"),))) == [1, 3]
    assert _m(s, Filter(must=(eq("n", 1),))) == [1, 3]  # 1 == 1.0
    assert _m(s, Filter(must=(eq("flag", True),))) == [2]  # booleans never equal numbers
    assert _m(s, Filter(must=(eq("flag", 1),))) == [3]
    assert _m(s, Filter(must=(eq("tags", "b"),))) == [1]  # any element of a list
    assert _m(s, Filter(must=(eq("meta.lang", "en"),))) == [1]  # dotted nested key
    assert _m(s, Filter(must_not=(eq("color", "red"),))) == [2, 4]
    assert _m(s, Filter(should=(eq("color", "blue"), eq("tags", "a")))) == [1, 2]
    assert _m(s, Filter(must=(HasId((1, 2, 99)),), must_not=(eq("color", "blue"),))) == [1]
    assert _m(s, Filter(must=(Match("color", ("red", "blue")),))) == [1, 2, 3]
    assert _m(s, Filter(must=(eq("color", "green"),))) == []
    assert _m(s, Filter(must=(Match("color", ("red",), negate=True),))) == [2]  # except: 4 has no color


def test_filter_json_round_trip():
    raw = {"must": [{"key": "a", "match": {"value": 1}}, {"has_id": [3, "5c56c793-69f3-4fbf-87e6-c4bf54c28c26"]}],
           "should": [{"key": "b", "range": {"gte": 1, "lt": 2.5}}, {"is_empty": {"key": "c"}}],
           "must_not": [{"must": [{"key": "d", "match": {"except": ["x"]}}]}, {"key": "e", "is_null": True}],
           "min_should": {"min_count": 1, "conditions": [{"key": "f", "match": {"any": [True]}}]}}
    flt = parse_filter(raw)
    assert parse_filter(flt.to_json()) == flt


def test_replace_and_delete_keep_the_index_exact():
    s = _store()
    s.set(1, {"color": "blue"})
    s.delete(2)
    assert _m(s, Filter(must=(Match("color", ("red",)),))) == [3]
    assert _m(s, Filter(must=(Match("color", ("blue",)),))) == [1]
    assert s.sorted_ids().tolist() == [1, 3, 4] and len(s) == 3
    assert not s.delete(2)


def test_snapshot_lines_round_trip():
    s = _store()
    t = PayloadStore.from_lines(list(s.dump_lines()))
    assert dict(t.items()) == dict(s.items()) and t.nbytes == s.nbytes > 0


@pytest.mark.parametrize("body, status, words", [
    (b"", 400, "empty"),
    (b"{", 400, "malformed JSON"),
    (b'{"a": NaN}', 400, "NaN"),
    (b'{"a": -Infinity}', 400, "Infinity"),
    (b"\xff\xfe", 400, "UTF-8"),
])
def test_parse_json_errors(body, status, words):
    with pytest.raises(ApiError) as e:
        parse_json(body)
    assert e.value.status_code == status and words in e.value.message


def _err(fn, *a):
    with pytest.raises(ApiError) as e:
        fn(*a)
    return e.value


@pytest.mark.parametrize("points, words", [
    ([{"id": 1, "vector": [1, 2]}], "has 2 dimensions, but this collection expects 3"),
    ([{"id": 1, "vector": [1, "x", 2]}], "points[0].vector[1] is 'x' (string); expected a number"),
    ([{"id": 1, "vector": [1, True, 2]}], "(boolean); expected a number"),
    ([{"id": 1, "vector": [1, None, 2]}], "(null); expected a number"),
    ([{"id": 1, "vector": [1, 1e39, 2]}], "not a finite float32"),
    ([{"id": 1, "vector": [1, 10**400, 2]}], "not a finite float32"),
    ([{"id": 2**63, "vector": [1, 2, 3]}], "outside tqindex's integer ids"),
    ([{"id": -1, "vector": [1, 2, 3]}], "expected an integer in 0.."),
    ([{"id": 1.5, "vector": [1, 2, 3]}], "(number); expected an unsigned integer or a UUID"),
    ([{"id": "1", "vector": [1, 2, 3]}], "'1', not a UUID"),
    ([{"id": 1, "vector": [1, 2, 3]}, {"id": 1, "vector": [1, 2, 3]}], "duplicate ids [1]"),
    ([{"id": 1, "vector": [1, 2, 3], "payload": [1]}], "payload is a JSON array; expected an object or null"),
    ([{"id": 1, "vector": [1, 2, 3], "extra": 1}], "unknown field(s) ['extra']"),
    ([{"vector": [1, 2, 3]}], "expected 'id' and 'vector'"),
])
def test_upsert_validation(points, words):
    e = _err(parse_upsert, {"points": points}, 3, S)
    assert e.status_code == 400 and words in e.message, e.message


def test_upsert_batch_limit_and_good_batch():
    e = _err(parse_upsert, {"points": [{"id": i, "vector": [0, 0, 0]} for i in range(11)]}, 3, S)
    assert e.status_code == 413 and "at most 10" in e.message
    req = parse_upsert({"points": [{"id": 5, "vector": [1, 2.5, -3]}]}, 3, S)
    assert req.ids == [5] and req.vectors.dtype == np.float32 and req.payloads == [None]


@pytest.mark.parametrize("body, words", [
    ({"query": [1, 2, 3], "limit": 0}, "limit is 0; expected an integer in 1..100"),
    ({"query": [1, 2, 3], "limit": -3}, "limit is -3"),
    ({"query": [1, 2, 3], "limit": 101}, "limit is 101; expected an integer in 1..100"),
    ({"query": [1, 2, 3], "limit": "5"}, "expected an integer"),
    ({"query": [1, 2, 3], "limit": 2.0}, "expected an integer"),
    ({"query": [1, 2, 3], "offset": -1}, "offset is -1"),
    ({"limit": 3}, "no 'query'"),
    ({"query": [[1, 2, 3]], "limit": 3}, "multivectors"),
    ({"query": [1, 2], "limit": 3}, "has 2 dimensions, but this collection expects 3"),
    ({"query": [1, 2, 3], "params": {"quantization": {"oversampling": 0.5}}}, "oversampling is 0.5"),
    ({"query": [1, 2, 3], "params": {"hnsw_ef": 0}}, "params.hnsw_ef is 0"),
    ({"query": [1, 2, 3], "params": {"fast": True}}, "unknown field(s) ['fast']"),
    ({"query": [1, 2, 3], "filter": {"must": [{"key": "c"}]}}, "expected exactly one"),
    ({"query": [1, 2, 3], "filter": {"must": [{"key": "c", "match": {"value": [1]}}]}}, "expected a string"),
    ({"query": [1, 2, 3], "filter": {"maybe": []}}, "unknown field(s) ['maybe']"),
    ({"query": [1, 2, 3], "with_payload": "yes"}, "expected true, false, a list of keys"),
])
def test_query_validation(body, words):
    e = _err(parse_query, body, 3, S)
    assert e.status_code == 400 and words in e.message, e.message


def test_search_params_map_to_rerank_nprobe_exact():
    q = parse_query({"query": [1, 2, 3], "params": {"hnsw_ef": 8, "quantization": {"oversampling": 2.5}}}, 3, S)
    assert (q.rerank, q.nprobe, q.exact) == (3, 8, False)
    q = parse_query({"query": [1, 2, 3], "params": {"quantization": {"rescore": False}}}, 3, S)
    assert q.rerank == 0
    assert parse_query({"query": [1, 2, 3], "params": {"exact": True}}, 3, S).exact
    assert parse_query({"query": [1, 2, 3], "params": {"quantization": {"ignore": True}}}, 3, S).exact


@pytest.mark.parametrize("name, body, words", [
    ("a b", {"vectors": {"size": 4, "distance": "Dot"}}, "collection name 'a b' is invalid"),
    ("x" * 65, {"vectors": {"size": 4, "distance": "Dot"}}, "is invalid"),
    ("a", {"vectors": {"size": 1, "distance": "Dot"}}, "vectors.size is 1; expected an integer in 2.."),
    ("a", {"vectors": {"size": 4, "distance": "dot"}}, "expected one of ['Cosine', 'Dot', 'Euclid']"),
    ("a", {"vectors": {"size": 4, "distance": "Dot"}, "metadata": {"tqindex": {"codec": "pq"}}},
     "expected one of ['prod', 'mse']"),
    ("a", {"vectors": {"size": 4, "distance": "Dot"}, "metadata": {"tqindex": {"codec": "mse", "bits": 9}}},
     "bits (codec mse) is 9; expected an integer in 1..8"),
    ("a", {"vectors": {"size": 4}}, "expected 'size' and 'distance'"),
    ("a", [1], "request body is a JSON array; expected a JSON object"),
])
def test_collection_validation(name, body, words):
    e = _err(parse_collection, name, body, S)
    assert e.status_code == 400 and words in e.message, e.message


def test_collection_config_forms():
    spec = parse_collection("a", {"vectors": {"size": 8, "distance": "Euclid"}, "metadata": {
        "tqindex": {"bits": 3, "codec": "prod", "rerank": 0, "index": {"type": "ivf", "nlist": 4}}}}, S)
    assert (spec.dim, spec.metric, spec.bits, spec.codec, spec.rerank) == (8, "l2", 3, "prod", 0)
    assert spec.index_spec == {"type": "ivf", "nlist": 4, "nprobe": 4, "train_at": 1000}
    spec = parse_collection("a", {"vectors": {"": {"size": 8, "distance": "Cosine"}}}, S)
    assert (spec.metric, spec.codec, spec.bits, spec.rerank) == ("cosine", "mse", 4, 4)

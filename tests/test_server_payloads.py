"""Payload store and request validation: filters, inverted index upkeep, messages naming given and expected."""

from __future__ import annotations

import numpy as np
import pytest

from server.config import Settings
from server.errors import ApiError
from server.payloads import Condition, Filter, PayloadStore
from server.validation import parse_collection, parse_json, parse_search, parse_upsert

S = Settings(max_batch=10, max_k=100)


def _store() -> PayloadStore:
    s = PayloadStore()
    s.set(1, {"color": "red", "n": 1, "tags": ["a", "b"], "meta": {"lang": "en"}})
    s.set(2, {"color": "blue", "n": 2, "flag": True})
    s.set(3, {"color": "red", "n": 1.0, "flag": 1})
    s.set(4, None)
    return s


def test_filters():
    s = _store()
    eq = lambda k, v: Condition(key=k, values=(v,))  # noqa: E731
    assert s.matching(Filter(must=(eq("color", "red"),))).tolist() == [1, 3]
    assert s.matching(Filter(must=(eq("n", 1),))).tolist() == [1, 3]  # 1 == 1.0
    assert s.matching(Filter(must=(eq("flag", True),))).tolist() == [2]  # booleans never equal numbers
    assert s.matching(Filter(must=(eq("flag", 1),))).tolist() == [3]
    assert s.matching(Filter(must=(eq("tags", "b"),))).tolist() == [1]  # any element of a list
    assert s.matching(Filter(must=(eq("meta.lang", "en"),))).tolist() == [1]  # dotted nested key
    assert s.matching(Filter(must_not=(eq("color", "red"),))).tolist() == [2, 4]
    assert s.matching(Filter(should=(eq("color", "blue"), eq("tags", "a")))).tolist() == [1, 2]
    assert s.matching(Filter(must=(Condition(ids=(1, 2, 99)),), must_not=(eq("color", "blue"),))).tolist() == [1]
    assert s.matching(Filter(must=(Condition(key="color", values=("red", "blue")),))).tolist() == [1, 2, 3]
    assert s.matching(Filter(must=(eq("color", "green"),))).size == 0


def test_replace_and_delete_keep_the_index_exact():
    s = _store()
    s.set(1, {"color": "blue"})
    s.delete(2)
    assert s.matching(Filter(must=(Condition(key="color", values=("red",)),))).tolist() == [3]
    assert s.matching(Filter(must=(Condition(key="color", values=("blue",)),))).tolist() == [1]
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
    ([{"id": 2**63, "vector": [1, 2, 3]}], "outside int64"),
    ([{"id": -1, "vector": [1, 2, 3]}], "expected an integer in 0.."),
    ([{"id": 1.5, "vector": [1, 2, 3]}], "(number); expected an integer id"),
    ([{"id": "1", "vector": [1, 2, 3]}], "(string); expected an integer id"),
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
    assert req.ids.tolist() == [5] and req.vectors.dtype == np.float32 and req.payloads == [None]


@pytest.mark.parametrize("body, words", [
    ({"vector": [1, 2, 3], "k": 0}, "k is 0; expected an integer in 1..100"),
    ({"vector": [1, 2, 3], "k": -3}, "k is -3"),
    ({"vector": [1, 2, 3], "k": 101}, "k is 101; expected an integer in 1..100"),
    ({"vector": [1, 2, 3], "k": "5"}, "expected an integer"),
    ({"vector": [1, 2, 3], "k": 2.0}, "expected an integer"),
    ({"vector": [1, 2, 3]}, "no 'k'"),
    ({"k": 3}, "neither 'vector' nor 'vectors'"),
    ({"vector": [1, 2, 3], "vectors": [[1, 2, 3]], "k": 3}, "both 'vector' and 'vectors'"),
    ({"vectors": [], "k": 3}, "non-empty array"),
    ({"vector": [1, 2], "k": 3}, "has 2 dimensions, but this collection expects 3"),
    ({"vector": [1, 2, 3], "k": 3, "rerank": -1}, "rerank is -1"),
    ({"vector": [1, 2, 3], "k": 3, "filter": {"must": [{"key": "c"}]}}, "filter.must[0].match is a JSON null"),
    ({"vector": [1, 2, 3], "k": 3, "filter": {"must": [{"key": "c", "match": {"value": [1]}}]}}, "expected a string"),
    ({"vector": [1, 2, 3], "k": 3, "filter": {"maybe": []}}, "unknown field(s) ['maybe']"),
    ({"vector": [1, 2, 3], "k": 3, "with_payload": "yes"}, "expected true or false"),
])
def test_search_validation(body, words):
    e = _err(parse_search, body, 3, S)
    assert e.status_code == 400 and words in e.message, e.message


@pytest.mark.parametrize("body, words", [
    ({"name": "a b", "dim": 4}, "collection name 'a b' is invalid"),
    ({"name": "x" * 65, "dim": 4}, "is invalid"),
    ({"name": "a", "dim": 1}, "dim is 1; expected an integer in 2.."),
    ({"name": "a", "dim": 4, "metric": "dot"}, "expected one of ['ip', 'cosine', 'l2']"),
    ({"name": "a", "dim": 4, "codec": "pq"}, "expected one of ['prod', 'mse']"),
    ({"name": "a", "dim": 4, "codec": "mse", "bits": 9}, "bits (codec mse) is 9; expected an integer in 1..8"),
    ({"dim": 4}, "expected at least 'name' and 'dim'"),
    ([1], "request body is a JSON array; expected a JSON object"),
])
def test_collection_validation(body, words):
    e = _err(parse_collection, body, S)
    assert e.status_code == 400 and words in e.message, e.message

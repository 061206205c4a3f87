"""Fuzz of the REST API (hypothesis): no request gets a 5xx, and a request answered 4xx changes nothing.

Bodies are drawn from arbitrary JSON, from valid requests with fields replaced by arbitrary JSON, and
from raw bytes. Bounded for CI (derandomised, a fixed number of examples per route); set
TQINDEX_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_server_api import _app  # noqa: E402

EXAMPLES = int(os.environ.get("TQINDEX_FUZZ_EXAMPLES", "300"))
DIM = 4
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 3e38, 3.5e38, 1e300, 1e-45, 0.0, -0.0]),
    st.text(max_size=12),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=20)
vector = st.one_of(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=DIM, max_size=DIM),
                   st.lists(scalars, max_size=6), json_values)
ident = st.one_of(st.integers(-2, 60), scalars, st.uuids().map(str), st.sampled_from(["not-a-uuid", 2**62]))
point = st.fixed_dictionaries({"id": ident, "vector": st.one_of(vector, st.dictionaries(st.text(max_size=3), vector,
                                                                                      max_size=2))},
                              optional={"payload": json_values, "extra": json_values})
conditions = st.one_of(
    st.fixed_dictionaries({"key": json_values, "match": json_values}),
    st.fixed_dictionaries({"key": st.sampled_from(["i", "tag", "x.y"]),
                           "match": st.fixed_dictionaries({}, optional={"value": scalars, "any": json_values,
                                                                        "except": json_values})}),
    st.fixed_dictionaries({"key": st.sampled_from(["i", "tag"]), "range": st.dictionaries(
        st.sampled_from(["lt", "gt", "gte", "lte", "eq"]), scalars, max_size=3)}),
    st.fixed_dictionaries({"has_id": st.lists(ident, max_size=3)}),
    st.fixed_dictionaries({"is_empty": json_values}),
    json_values,
)
filters = st.one_of(json_values, st.dictionaries(st.sampled_from(["must", "should", "must_not", "min_should"]),
                                                 st.one_of(st.lists(conditions, max_size=2), conditions), max_size=3))
selector = st.one_of(st.fixed_dictionaries({"points": st.lists(ident, max_size=5)}),
                     st.fixed_dictionaries({"filter": filters}), json_values)
bodies = {
    "upsert": st.one_of(st.fixed_dictionaries({"points": st.lists(point, max_size=4)}),
                        st.fixed_dictionaries({"batch": st.fixed_dictionaries(
                            {"ids": st.lists(ident, max_size=3), "vectors": st.lists(vector, max_size=3)},
                            optional={"payloads": json_values})}), json_values),
    "query": st.one_of(st.fixed_dictionaries(
        {"query": st.one_of(vector, st.fixed_dictionaries({"nearest": vector}), json_values)},
        optional={"limit": st.one_of(st.integers(-2, 200), scalars), "offset": st.one_of(st.integers(-1, 200), scalars),
                  "params": st.one_of(json_values, st.fixed_dictionaries({}, optional={
                      "exact": json_values, "hnsw_ef": json_values,
                      "quantization": st.dictionaries(st.sampled_from(["rescore", "oversampling", "ignore"]),
                                                      scalars, max_size=2)})),
                  "with_payload": json_values, "with_vector": json_values, "score_threshold": json_values,
                  "using": json_values, "filter": filters}), json_values),
    "retrieve": st.one_of(st.fixed_dictionaries({"ids": st.lists(ident, max_size=5)},
                                                optional={"with_vector": json_values, "with_payload": json_values}),
                          json_values),
    "delete": selector,
    "scroll": st.one_of(st.fixed_dictionaries({}, optional={
        "offset": ident, "limit": st.one_of(st.integers(-1, 200), scalars),
        "with_vector": json_values, "with_payload": json_values, "filter": filters}), json_values),
    "count": st.one_of(st.fixed_dictionaries({}, optional={"filter": filters, "exact": json_values}), json_values),
    "set_payload": st.one_of(st.fixed_dictionaries({"payload": json_values}, optional={
        "points": st.lists(ident, max_size=3), "filter": filters, "key": json_values}), json_values),
    "delete_payload": st.one_of(st.fixed_dictionaries({"keys": json_values}, optional={
        "points": st.lists(ident, max_size=3), "filter": filters}), json_values),
    "create": st.one_of(st.fixed_dictionaries(
        {"vectors": st.one_of(st.fixed_dictionaries({"size": st.one_of(st.integers(-1, 70), scalars),
                                                     "distance": st.one_of(st.sampled_from(["Dot", "Cosine", "Euclid",
                                                                                            "Manhattan"]), scalars)}),
                              json_values)},
        optional={"metadata": st.one_of(json_values, st.fixed_dictionaries({"tqindex": st.fixed_dictionaries({}, optional={
            "bits": st.one_of(st.integers(-1, 10), scalars), "codec": st.one_of(st.just("mse"), scalars),
            "rerank": json_values, "index": json_values})})),
            "hnsw_config": json_values, "sparse_vectors": json_values, "shard_number": json_values}), json_values),
}
ROUTES = {"upsert": ("PUT", "/collections/f/points"), "query": ("POST", "/collections/f/points/query"),
          "retrieve": ("POST", "/collections/f/points"), "delete": ("POST", "/collections/f/points/delete"),
          "scroll": ("POST", "/collections/f/points/scroll"), "count": ("POST", "/collections/f/points/count"),
          "set_payload": ("POST", "/collections/f/points/payload"),
          "delete_payload": ("POST", "/collections/f/points/payload/delete"),
          "create": ("PUT", "/collections/g")}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(_app(tmp_path_factory.mktemp("fuzz"), max_k=100, max_batch=40, max_rerank=16, max_dim=128,
                         max_results=500, max_payload_depth=8, max_payload_bytes=4096)) as c:
        r = c.put("/collections/f", json={"vectors": {"size": DIM, "distance": "Euclid"}})
        assert r.status_code == 200, r.text
        pts = [{"id": i, "vector": [float(i), 1.0, -0.5 * i, 0.25], "payload": {"i": i, "tag": ["a", "b"][i % 2]}}
               for i in range(30)]
        assert c.put("/collections/f/points", json={"points": pts}).status_code == 200
        yield c


def _state(c: TestClient) -> Any:
    store = c.app.state.store
    names = store.names()
    coll = store.get("f")
    return names, coll.lsn, len(coll.index), sorted(coll.payloads.items(), key=lambda kv: kv[0]), \
        coll.index.ids.tolist(), coll.ids.to_json()


def _check(c: TestClient, route: str, body: bytes) -> None:
    before = _state(c)
    method, path = ROUTES[route]
    r = c.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (route, body[:300], r.text[:500])
    env = r.json()
    if r.status_code >= 400:
        assert set(env) == {"status", "time"} and isinstance(env["status"]["error"], str), env
        assert _state(c) == before, (route, body[:300], r.text[:300])
    else:
        assert env["status"] == "ok", env
    if route == "create" and r.status_code == 200:  # keep the set of collections small
        assert c.delete("/collections/g").status_code == 200


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzz_json_bodies(client, route):
    @FUZZ
    @given(bodies[route])
    def run(body: Any) -> None:
        _check(client, route, json.dumps(body).encode())

    run()


@pytest.mark.parametrize("route", ["upsert", "query"])
def test_fuzz_raw_bytes(client, route):
    @FUZZ
    @given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.sampled_from([b"[" * 3000, b'{"points": ' + b"[" * 3000, b"1e400", b'{"k": 1e999}',
                                      b'{"query": [NaN, 1, 2, 3], "limit": 1}', b"\xff\xfe"])))
    def run(body: bytes) -> None:
        _check(client, route, body)

    run()


def test_fuzz_collection_names(client):
    @FUZZ
    @given(st.text(min_size=1, max_size=80).filter(lambda s: s != "f" and not set(s) & set("/?#")))
    def run(name: str) -> None:
        for method in ("GET", "DELETE"):
            before = _state(client)
            r = client.request(method, f"/collections/{quote(name, safe='')}")
            assert r.status_code < 500, (name, r.text[:300])
            if r.status_code >= 400:
                assert _state(client) == before

    run()

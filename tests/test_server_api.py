"""REST API in-process (TestClient): Qdrant routes, envelopes, every bad input -> 4xx and no state change, auth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings

DIM = 8
LIMITS = dict(max_body_bytes=64 * 1024, max_batch=50, max_k=100, max_rerank=16)


def _app(tmp_path, **kw):
    return create_app(Settings(data_dir=tmp_path / "data", **{**LIMITS, **kw}), recover_in_background=False)


@pytest.fixture()
def client(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        yield c


def _vecs(n, seed=0, dim=DIM):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


DISTANCE = {"l2": "Euclid", "ip": "Dot", "cosine": "Cosine"}


def _create(c, name, dim=DIM, metric="l2", **tq):
    """PUT /collections/{name} with Qdrant's vectors config; ``tq``: metadata.tqindex settings."""
    body = {"vectors": {"size": dim, "distance": DISTANCE[metric]}}
    if tq:
        body["metadata"] = {"tqindex": tq}
    return c.put(f"/collections/{name}", json=body)


def _fill(c, name="c", n=40, metric="l2", seed=0):
    r = _create(c, name, metric=metric, bits=4, codec="prod")
    assert r.status_code == 200, r.text
    x = _vecs(n, seed)
    pts = [{"id": i, "vector": x[i].tolist(), "payload": {"color": ["red", "blue"][i % 2], "i": i}} for i in range(n)]
    r = c.put(f"/collections/{name}/points", json={"points": pts})
    assert r.status_code == 200, r.text
    return x


def _state(c, name="c"):
    info = c.get(f"/collections/{name}").json()["result"]
    pts = c.post(f"/collections/{name}/points/scroll", json={"limit": 50, "with_vector": True}).json()["result"]
    return info["points_count"], info["tqindex"]["lsn"], pts


def _query(c, name, vector, limit, **kw):
    """POST .../points/query -> the hits."""
    return _ok(c.post(f"/collections/{name}/points/query", json={"query": vector, "limit": limit, **kw}))["points"]


def _ranked(results):
    """Search results with hits of equal score in id order: ties have no defined order (point 99 of
    the restart test is a copy of point 0), anything else must keep its rank."""
    out = []
    for hits in results:
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True), scores  # cosine: best first
        out.append(sorted(hits, key=lambda h: (-h["score"], str(h["id"]))))
    return out


def _ok(r):
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and isinstance(body["time"], float)
    return body["result"]


def _bad(r, status, words):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"status", "time"}, body
    assert words in body["status"]["error"], body["status"]["error"]


def test_collections_lifecycle(client):
    c = client
    assert _ok(_create(c, "docs", dim=4, metric="cosine", bits=3, codec="mse", rerank=2)) is True
    info = _ok(c.get("/collections/docs"))
    assert info["config"]["params"]["vectors"] == {"size": 4, "distance": "Cosine"}
    assert info["config"]["metadata"]["tqindex"] == {"bits": 3, "codec": "mse", "rerank": 2, "seed": 0,
                                                     "index": {"type": "flat"}}
    assert info["tqindex"]["config"] == {"name": "docs", "dim": 4, "metric": "cosine", "bits": 3, "codec": "mse",
                                         "rerank": 2, "seed": 0, "metadata": {"tqindex": {"bits": 3, "codec": "mse",
                                                                                          "rerank": 2}}}
    assert info["points_count"] == 0 and info["status"] == "green"
    assert set(info["tqindex"]["memory"]) >= {"codes", "originals", "ids", "payloads", "total"}
    assert _ok(c.get("/collections/docs/exists")) == {"exists": True}
    assert _ok(c.get("/collections/nope/exists")) == {"exists": False}
    _bad(_create(c, "docs", dim=4), 409, "already exists")
    assert _ok(c.get("/collections")) == {"collections": [{"name": "docs"}]}
    assert _ok(c.delete("/collections/docs")) is True
    _bad(c.get("/collections/docs"), 404, "'docs' does not exist")
    _bad(c.delete("/collections/docs"), 404, "does not exist")
    assert _ok(c.get("/collections")) == {"collections": []}
    _ok(_create(c, "docs", dim=6))  # the name can be used again
    info = _ok(c.get("/collections/docs"))
    assert info["config"]["params"]["vectors"]["size"] == 6
    assert info["config"]["metadata"]["tqindex"]["codec"] == "mse"  # the defaults


def test_root_reports_the_qdrant_api_version(client):
    root = client.get("/").json()
    assert root["version"].count(".") == 2 and root["title"].startswith("tqindex")


@pytest.mark.parametrize("body, words", [
    ({"vectors": {"size": 4, "distance": "Manhattan"}}, "Manhattan is not supported"),
    ({"vectors": {"a": {"size": 4, "distance": "Dot"}, "b": {"size": 4, "distance": "Dot"}}}, "named vectors"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "sparse_vectors": {"s": {}}}, "sparse vectors"),
    ({"vectors": {"size": 4, "distance": "Dot", "multivector_config": {"comparator": "max_sim"}}}, "multivectors"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "quantization_config": {"scalar": {"type": "int8"}}},
     "Qdrant quantization is not supported"),
    ({"vectors": {"size": 4, "distance": "Dot", "datatype": "uint8"}}, "datatype"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "init_from": {"collection": "x"}}, "init_from"),
    ({"vectors": {"size": 1, "distance": "Dot"}}, "vectors.size is 1"),
    ({}, "no 'vectors'"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "metadata": {"tqindex": {"codec": "pq"}}}, "expected one of"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "metadata": {"tqindex": {"bits": 9, "codec": "mse"}}},
     "bits (codec mse) is 9"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "metadata": {"tqindex": {"nlist": 4}}}, "unknown field(s) ['nlist']"),
    ({"vectors": {"size": 4, "distance": "Dot"}, "colour": 1}, "unknown field(s) ['colour']"),
])
def test_unsupported_or_bad_collection_configs_are_400(client, body, words):
    _bad(client.put("/collections/x", json=body), 400, words)
    assert _ok(client.get("/collections")) == {"collections": []}


def test_ignored_qdrant_settings_and_unnamed_vector_map(client):
    body = {"vectors": {"": {"size": 4, "distance": "Dot", "on_disk": True, "hnsw_config": {"m": 32}}},
            "sparse_vectors": {}, "shard_number": 2, "replication_factor": 1, "hnsw_config": {"ef_construct": 64},
            "optimizers_config": {"indexing_threshold": 0}, "wal_config": {"wal_capacity_mb": 8},
            "on_disk_payload": True, "metadata": {"owner": "me"}}
    _ok(client.put("/collections/x", json=body))
    info = _ok(client.get("/collections/x"))
    assert info["config"]["params"]["vectors"] == {"size": 4, "distance": "Dot"}
    assert info["config"]["metadata"]["owner"] == "me"


def test_upsert_retrieve_query_delete(client):
    c = client
    x = _fill(c)
    got = _ok(c.post("/collections/c/points", json={"ids": [3, 999, 1], "with_vector": True}))
    assert [p["id"] for p in got] == [3, 1]
    assert got[0]["payload"] == {"color": "blue", "i": 3}
    np.testing.assert_array_equal(np.array(got[0]["vector"], dtype=np.float32), x[3])
    one = _ok(c.get("/collections/c/points/3"))
    assert one["id"] == 3 and one["payload"]["i"] == 3 and len(one["vector"]) == DIM
    _bad(c.get("/collections/c/points/999"), 404, "point 999 does not exist")
    hits = _query(c, "c", x[5].tolist(), 5, with_payload=True)
    assert len(hits) == 5 and hits[0]["id"] == 5 and hits[0]["score"] == pytest.approx(0.0, abs=1e-3)
    assert hits[0]["payload"]["i"] == 5 and all(hits[i]["score"] <= hits[i + 1]["score"] for i in range(4))
    d2 = float(((x[7] - x[5]) ** 2).sum())  # Euclid scores are distances, not squared distances
    ex = _query(c, "c", x[5].tolist(), 40, params={"exact": True})
    assert {h["id"]: h["score"] for h in ex}[7] == pytest.approx(d2 ** 0.5, rel=1e-5)
    assert "payload" not in hits[1] or hits[1]["payload"] is not None
    batch = _ok(c.post("/collections/c/points/query/batch", json={"searches": [
        {"query": x[1].tolist(), "limit": 3}, {"query": {"nearest": x[2].tolist()}, "limit": 3}]}))
    assert [b["points"][0]["id"] for b in batch] == [1, 2] and all(len(b["points"]) == 3 for b in batch)
    legacy = _ok(c.post("/collections/c/points/search", json={"vector": x[4].tolist(), "limit": 2}))
    assert legacy[0]["id"] == 4 and len(legacy) == 2
    assert len(_ok(c.post("/collections/c/points/search/batch", json={"searches": [
        {"vector": x[4].tolist(), "limit": 2}] * 3}))) == 3
    # limit larger than the collection: every point, no padding
    assert len(_query(c, "c", x[0].tolist(), 100)) == 40
    page2 = _query(c, "c", x[0].tolist(), 5, offset=5)
    assert [h["id"] for h in page2] == [h["id"] for h in _query(c, "c", x[0].tolist(), 10)][5:]
    far = _query(c, "c", x[0].tolist(), 40, score_threshold=3.0)
    assert far and all(h["score"] <= 3.0 for h in far) and len(far) < 40
    _ok(c.post("/collections/c/points/delete", json={"points": [5, 5, 6, 12345]}))
    assert _ok(c.post("/collections/c/points/count", json={}))["count"] == 38
    hits = _query(c, "c", x[5].tolist(), 38)
    assert 5 not in {h["id"] for h in hits} and len(hits) == 38


def test_upsert_replaces_existing_ids(client):
    c = client
    x = _fill(c)
    new = _vecs(1, seed=9)[0]
    _ok(c.put("/collections/c/points?wait=true", json={"points": [{"id": 7, "vector": new.tolist(), "payload": {"v": 2}}]}))
    assert _ok(c.get("/collections/c"))["points_count"] == 40
    p = _ok(c.post("/collections/c/points", json={"ids": [7], "with_vector": True}))[0]
    assert p["payload"] == {"v": 2}
    np.testing.assert_array_equal(np.array(p["vector"], dtype=np.float32), new)
    assert _query(c, "c", new.tolist(), 1)[0]["id"] == 7
    hits = _query(c, "c", x[7].tolist(), 40)
    assert [h["id"] for h in hits].count(7) == 1  # the old vector is gone, no duplicate


def test_batch_upsert_and_uuid_ids(client):
    c = client
    _ok(_create(c, "u", metric="cosine"))
    x = _vecs(6, seed=3)
    ids = ["5c56c793-69f3-4fbf-87e6-c4bf54c28c26", "{12345678-1234-5678-1234-567812345678}", 3,
           "0f0e0d0c0b0a09080706050403020100", 2, "urn:uuid:a8098c1a-f86e-11da-bd1a-00112475e7b8"]
    _ok(c.put("/collections/u/points", json={"batch": {"ids": ids, "vectors": x.tolist(),
                                                       "payloads": [{"k": i} for i in range(6)]}}))
    canon = ["5c56c793-69f3-4fbf-87e6-c4bf54c28c26", "12345678-1234-5678-1234-567812345678", 3,
             "0f0e0d0c-0b0a-0908-0706-050403020100", 2, "a8098c1a-f86e-11da-bd1a-00112475e7b8"]
    got = _ok(c.post("/collections/u/points", json={"ids": ids}))
    assert [p["id"] for p in got] == canon and [p["payload"]["k"] for p in got] == list(range(6))
    scrolled = _ok(c.post("/collections/u/points/scroll", json={"limit": 10}))["points"]
    # Qdrant's order: integers ascending, then UUIDs by value
    assert [p["id"] for p in scrolled] == [2, 3] + sorted(canon[i] for i in (0, 1, 3, 5))
    page = _ok(c.post("/collections/u/points/scroll", json={"limit": 3}))
    assert page["next_page_offset"] == sorted(canon[i] for i in (0, 1, 3, 5))[1]
    rest = _ok(c.post("/collections/u/points/scroll", json={"limit": 3, "offset": page["next_page_offset"]}))
    assert [p["id"] for p in page["points"] + rest["points"]] == [p["id"] for p in scrolled]
    assert _query(c, "u", x[0].tolist(), 1)[0]["id"] == canon[0]
    flt = {"must": [{"has_id": [canon[1], 2, "00000000-0000-0000-0000-000000000000"]}]}
    assert sorted(map(str, [h["id"] for h in _query(c, "u", x[0].tolist(), 6, filter=flt)])) == sorted([canon[1], "2"])
    _ok(c.post("/collections/u/points/delete", json={"points": [canon[0].upper()]}))  # any spelling of the UUID
    assert _ok(c.post("/collections/u/points/count", json={}))["count"] == 5
    _ok(c.put("/collections/u/points", json={"batch": {"ids": [canon[0]], "vectors": {"": [x[1].tolist()]}}}))  # re-added
    assert _ok(c.get("/collections/u"))["tqindex"]["uuid_points"] == 4
    _bad(c.put("/collections/u/points", json={"points": [{"id": "nope", "vector": x[1].tolist()}]}), 400, "not a UUID")
    _bad(c.put("/collections/u/points", json={"points": [{"id": 2**62, "vector": x[1].tolist()}]}), 400,
         "outside tqindex's integer ids")
    _bad(c.put("/collections/u/points", json={"points": [{"id": canon[1], "vector": x[1].tolist()},
                                                         {"id": canon[1].upper(), "vector": x[2].tolist()}]}),
         400, "duplicate ids")


def test_filtered_query_returns_k_hits_when_k_match(client):
    c = client
    x = _fill(c, n=40)
    flt = {"must": [{"key": "color", "match": {"value": "red"}}]}  # even ids: 20 of them
    for k in (1, 10, 20):
        hits = _query(c, "c", x[1].tolist(), k, with_payload=True, filter=flt)
        assert len(hits) == k and all(h["payload"]["color"] == "red" for h in hits)
    assert len(_query(c, "c", x[1].tolist(), 30, filter=flt)) == 20  # only 20 match
    flt2 = {"must": [{"key": "color", "match": {"value": "blue"}}], "must_not": [{"has_id": [1, 3]}]}
    hits = _query(c, "c", x[1].tolist(), 40, filter=flt2)
    assert len(hits) == 18 and not {1, 3} & {h["id"] for h in hits}
    none = {"must": [{"key": "color", "match": {"value": "green"}}]}
    assert _query(c, "c", x[1].tolist(), 5, filter=none) == []


def test_filter_conditions(client):
    c = client
    _ok(_create(c, "f", dim=2))
    pls = [{"n": 1, "tag": ["a", "b"], "m": {"lang": "en"}}, {"n": 2.5, "tag": "c", "z": None}, {"n": 7, "tag": []},
           {"s": "x"}, None]
    _ok(c.put("/collections/f/points", json={"points": [{"id": i, "vector": [1.0, float(i)], "payload": p}
                                                        for i, p in enumerate(pls)]}))

    def ids(flt):
        return sorted(p["id"] for p in _ok(c.post("/collections/f/points/scroll", json={"filter": flt}))["points"])

    def cnt(flt):
        return _ok(c.post("/collections/f/points/count", json={"filter": flt, "exact": True}))["count"]

    cases = [
        ({"must": [{"key": "n", "range": {"gte": 2}}]}, [1, 2]),
        ({"must": [{"key": "n", "range": {"gt": 1, "lt": 7}}]}, [1]),
        ({"must": [{"key": "tag", "match": {"any": ["b", "c"]}}]}, [0, 1]),
        ({"must": [{"key": "tag", "match": {"except": ["a", "b"]}}]}, [1]),
        ({"must": [{"is_empty": {"key": "tag"}}]}, [2, 3, 4]),
        ({"must": [{"key": "tag", "is_empty": False}]}, [0, 1]),
        ({"must": [{"is_null": {"key": "z"}}]}, [1]),
        ({"must": [{"key": "m.lang", "match": {"value": "en"}}]}, [0]),
        ({"should": [{"key": "s", "match": {"value": "x"}}, {"has_id": [4]}]}, [3, 4]),
        ({"must_not": [{"must": [{"key": "n", "range": {"lte": 3}}]}]}, [2, 3, 4]),  # a nested filter
        ({"min_should": {"min_count": 2, "conditions": [{"key": "n", "range": {"gte": 1}},
                                                         {"key": "tag", "match": {"value": "c"}},
                                                         {"has_id": [1, 2]}]}}, [1, 2]),
        ({"must": {"key": "n", "match": {"value": 7}}}, [2]),  # a single condition, not a list
    ]
    for flt, want in cases:
        assert ids(flt) == want, flt
        assert cnt(flt) == len(want), flt
    for flt, words in [({"must": [{"key": "t", "match": {"text": "hi"}}]}, "full-text match"),
                       ({"must": [{"key": "g", "geo_radius": {"center": {"lon": 0, "lat": 0}, "radius": 1}}]}, "geo"),
                       ({"must": [{"key": "d", "range": {"gt": "2024-01-01T00:00:00Z"}}]}, "datetime ranges"),
                       ({"must": [{"nested": {"key": "a", "filter": {}}}]}, "nested (array of objects)"),
                       ({"must": [{"key": "a[].b", "match": {"value": 1}}]}, "array paths"),
                       ({"must": [{"key": "n", "values_count": {"gt": 1}}]}, "values_count"),
                       ({"must": [{"key": "n"}]}, "expected exactly one")]:
        _bad(c.post("/collections/f/points/scroll", json={"filter": flt}), 400, words)


def test_delete_by_filter_and_payload_updates(client):
    c = client
    x = _fill(c, n=10)
    lsn = _ok(c.get("/collections/c"))["tqindex"]["lsn"]
    _ok(c.post("/collections/c/points/payload", json={"payload": {"x": 1, "i": -1}, "points": [1, 2]}))
    _ok(c.put("/collections/c/points/payload", json={"payload": {"only": True}, "points": [3]}))
    _ok(c.post("/collections/c/points/payload/delete", json={"keys": ["color"], "filter": {
        "must": [{"has_id": [4, 5]}]}}))
    _ok(c.post("/collections/c/points/payload/clear", json={"points": [6]}))
    got = {p["id"]: p["payload"] for p in _ok(c.post("/collections/c/points", json={"ids": [1, 2, 3, 4, 6]}))}
    assert got == {1: {"color": "blue", "i": -1, "x": 1}, 2: {"color": "red", "i": -1, "x": 1}, 3: {"only": True},
                   4: {"i": 4}, 6: {}}
    _ok(c.post("/collections/c/points/payload", json={"payload": {"x": 9}, "points": [777]}))  # absent: no write
    assert _ok(c.get("/collections/c"))["tqindex"]["lsn"] == lsn + 4
    _ok(c.post("/collections/c/points/delete", json={"filter": {"must": [{"key": "color", "match": {"value": "red"}}]}}))
    left = sorted(p["id"] for p in _ok(c.post("/collections/c/points/scroll", json={}))["points"])
    assert left == [1, 3, 4, 5, 6, 7, 9]  # 0, 2, 8 were red (2 kept its color); 4, 6 have none now
    assert {h["id"] for h in _query(c, "c", x[0].tolist(), 10)} == set(left)
    sel = _ok(c.post("/collections/c/points", json={"ids": [1], "with_payload": ["x"]}))[0]["payload"]
    assert sel == {"x": 1}
    sel = _ok(c.post("/collections/c/points", json={"ids": [1], "with_payload": {"exclude": ["x"]}}))[0]["payload"]
    assert sel == {"color": "blue", "i": -1}
    assert "payload" not in _ok(c.post("/collections/c/points", json={"ids": [1], "with_payload": False}))[0]


def test_scroll_pages(client):
    c = client
    _fill(c, n=25)
    seen, offset = [], None
    while True:
        res = _ok(c.post("/collections/c/points/scroll", json={"offset": offset, "limit": 7, "with_payload": False}))
        seen += [p["id"] for p in res["points"]]
        offset = res["next_page_offset"]
        if offset is None:
            break
    assert seen == list(range(25))


BAD_UPSERTS = [
    ({"points": [{"id": 100, "vector": [0.0] * (DIM - 1)}]}, 400, f"has {DIM - 1} dimensions, but this collection expects {DIM}"),
    ({"points": [{"id": 100, "vector": [0.0] * DIM}, {"id": 101, "vector": ["a"] * DIM}]}, 400, "expected a number"),
    ({"points": [{"id": 100, "vector": [0.0] * DIM}, {"id": 100, "vector": [1.0] * DIM}]}, 400, "duplicate ids [100]"),
    ({"points": [{"id": 2**63, "vector": [0.0] * DIM}]}, 400, "outside tqindex's integer ids"),
    ({"points": [{"id": 2**64 + 5, "vector": [0.0] * DIM}]}, 400, "outside tqindex's integer ids"),
    ({"points": [{"id": 100, "vector": [0.0] * (DIM - 1) + [1e39]}]}, 400, "not a finite float32"),
    ({"points": [{"id": i, "vector": [0.0] * DIM} for i in range(100, 151)]}, 413, "at most 50"),
    ({"points": "nope"}, 400, "expected an array"),
    ({"pts": []}, 400, "unknown field(s) ['pts']"),
    ({"points": [{"id": 1, "vector": {"image": [0.0] * DIM}}]}, 400, "named vectors are not supported"),
    ({"points": [{"id": 1, "vector": {"indices": [1], "values": [0.5]}}]}, 400, "sparse vectors are not supported"),
    ({"points": [{"id": 1, "vector": [[0.0] * DIM]}]}, 400, "multivectors are not supported"),
    ({"points": [], "shard_key": "a"}, 400, "shard keys"),
    ({"batch": {"ids": [1, 2], "vectors": [[0.0] * DIM]}}, 400, "expected an array of 2 vectors"),
]


@pytest.mark.parametrize("body, status, words", BAD_UPSERTS)
def test_bad_upserts_change_nothing(client, body, status, words):
    c = client
    _fill(c)
    before = _state(c)
    _bad(c.put("/collections/c/points", json=body), status, words)
    assert _state(c) == before


@pytest.mark.parametrize("raw, words", [
    (b'{"points": [{"id": 1, "vector": [NaN, 0, 0, 0, 0, 0, 0, 0]}]}', "NaN is not valid JSON"),
    (b'{"points": [{"id": 1, "vector": [Infinity, 0, 0, 0, 0, 0, 0, 0]}]}', "Infinity is not valid JSON"),
    (b'{"points": [{"id": 1, "vector": [1e400, 0, 0, 0, 0, 0, 0, 0]}]}', "beyond the range of a double"),
    (b'{"points": [', "malformed JSON"),
    (b"", "empty"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_malformed_bodies_change_nothing(client, raw, words):
    c = client
    _fill(c)
    before = _state(c)
    _bad(c.put("/collections/c/points", content=raw), 400, words)
    assert _state(c) == before


def test_body_size_limits(client):
    c = client
    _fill(c)
    before = _state(c)
    big = json.dumps({"points": [{"id": 1, "vector": [0.0] * DIM, "payload": {"s": "x" * 70000}}]}).encode()
    _bad(c.put("/collections/c/points", content=big), 413, "expected at most 65536")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    _bad(c.put("/collections/c/points", content=chunks()), 413, "exceeds 65536 bytes")
    assert _state(c) == before


@pytest.mark.parametrize("body, status, words", [
    ({"query": [0.0] * DIM, "limit": 0}, 400, "limit is 0"),
    ({"query": [0.0] * DIM, "limit": -1}, 400, "limit is -1"),
    ({"query": [0.0] * DIM, "limit": 101}, 400, "limit is 101; expected an integer in 1..100"),
    ({"query": [0.0] * DIM, "limit": 60, "offset": 60}, 400, "expected at most 100 (--max-k)"),
    ({"query": [0.0] * DIM, "params": {"quantization": {"oversampling": 17}}}, 400, "oversampling is 17"),
    ({"query": [0.0] * 3, "limit": 5}, 400, "has 3 dimensions"),
    ({"query": [0.0] * DIM, "using": "image"}, 400, "named vectors"),
    ({"query": 3}, 400, "queries by point id are not supported"),
    ({"query": {"recommend": {"positive": [1]}}}, 400, "recommend queries are not supported"),
    ({"query": [0.0] * DIM, "prefetch": [{"query": [0.0] * DIM}]}, 400, "prefetch"),
    ({"query": {"indices": [1], "values": [1.0]}}, 400, "sparse vectors"),
    ({"limit": 3}, 400, "no 'query'"),
    ({"query": [0.0] * DIM, "with_vector": ["image"]}, 400, "named vectors"),
    ({"query": [0.0] * DIM, "score_threshold": "high"}, 400, "score_threshold is 'high'"),
])
def test_bad_queries(client, body, status, words):
    _fill(client)
    _bad(client.post("/collections/c/points/query", json=body), status, words)


def test_bad_batches(client):
    _fill(client)
    _bad(client.post("/collections/c/points/query/batch", json={"searches": [{"query": [0.0] * DIM}] * 51}), 413,
         "at most 50")
    _bad(client.post("/collections/c/points/search", json={"vector": [0.0] * DIM}), 400, "no 'limit'")


def test_unknown_collection_route_and_method(client):
    c = client
    _bad(c.put("/collections/nope/points", json={"points": []}), 404, "'nope' does not exist")
    _bad(c.post("/collections/nope/points/query", json={"query": [1, 2], "limit": 1}), 404, "does not exist")
    _bad(c.post("/collections/nope/points", json={"ids": [1]}), 404, "does not exist")
    _bad(c.get("/collections/bad%20name"), 400, "is invalid")
    _bad(c.get("/nowhere"), 404, "no route GET /nowhere")
    _bad(c.get("/collections/x/points/query"), 404, "does not exist")
    _bad(c.patch("/collections/x"), 405, "method PATCH is not allowed")


def test_ids_requests_validation(client):
    c = client
    _fill(c)
    before = _state(c)
    _bad(c.post("/collections/c/points/delete", json={"points": [1, "2"]}), 400, "points[1] is '2', not a UUID")
    _bad(c.post("/collections/c/points/delete", json={"points": [-4]}), 400, "points[0] is -4")
    _bad(c.post("/collections/c/points/delete", json={"points": list(range(51))}), 413, "at most 50")
    _bad(c.post("/collections/c/points/delete", json={"id": [1]}), 400, "unknown field(s) ['id']")
    _bad(c.post("/collections/c/points/delete", json={}), 400, "neither 'points' nor 'filter'")
    _bad(c.post("/collections/c/points/delete", json={"points": [1], "filter": {}}), 400, "both 'points' and 'filter'")
    _bad(c.post("/collections/c/points", json={"ids": [1], "with_vector": 1}), 400, "expected true or false")
    _bad(c.post("/collections/c/points/payload", json={"payload": {"a": 1}, "points": [1], "key": "a.b"}), 400,
         "nested key")
    _bad(c.post("/collections/c/points/payload", json={"payload": [1], "points": [1]}), 400, "expected a JSON object")
    _bad(c.post("/collections/c/points/payload/delete", json={"keys": "color", "points": [1]}), 400,
         "expected an array of payload keys")
    _bad(c.post("/collections/c/points/scroll", json={"order_by": "i"}), 400, "order_by")
    assert _state(c) == before


def test_snapshot_and_restart_in_process(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        x = _fill(c, metric="cosine")
        assert _ok(c.get("/collections/c/snapshots")) == []
        snap = _ok(c.post("/collections/c/snapshots"))
        assert snap["name"].startswith("snap-") and snap["points"] == 40 and snap["size"] > 0
        assert [s["name"] for s in _ok(c.get("/collections/c/snapshots"))] == [snap["name"]]
        _bad(c.delete(f"/collections/c/snapshots/{snap['name']}"), 400, "cannot be deleted")
        assert _ok(c.get("/collections/c"))["tqindex"]["wal_bytes"] == 0  # log truncated after the snapshot
        u = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
        _ok(c.put("/collections/c/points", json={"points": [{"id": 99, "vector": x[0].tolist(), "payload": {"z": 1}},
                                                            {"id": u, "vector": x[1].tolist(), "payload": {"z": 2}}]}))
        _ok(c.post("/collections/c/points/delete", json={"points": [4]}))
        _ok(c.post("/collections/c/points/payload", json={"payload": {"w": 3}, "filter": {
            "must": [{"key": "z", "match": {"any": [1, 2]}}]}}))
        before = [_query(c, "c", q.tolist(), 10, with_payload=True) for q in x[:5]]
        state = _state(c)
        _ok(c.post("/collections/c/snapshots"))
        _ok(c.put("/collections/c/points", json={"points": [{"id": "8c9e6679-7425-40de-944b-e07fc1f90ae7",
                                                             "vector": x[2].tolist()}]}))
        _ok(c.post("/collections/c/points/delete", json={"points": ["8c9e6679-7425-40de-944b-e07fc1f90ae7"]}))
    with TestClient(_app(tmp_path)) as c:  # snapshot (with the UUID mapping) + log replay
        after = _state(c)
        assert after[0] == state[0] and after[2] == state[2] and after[1] == state[1] + 2
        assert _ranked([_query(c, "c", q.tolist(), 10, with_payload=True) for q in x[:5]]) == _ranked(before)
        assert _ok(c.post("/collections/c/points", json={"ids": [u]}))[0]["payload"] == {"z": 2, "w": 3}


def test_metrics(client):
    c = client
    _fill(c)
    c.post("/collections/c/points/query", json={"query": [0.0] * DIM, "limit": 3})
    c.post("/collections/c/points/query", json={"query": [0.0] * DIM, "limit": 0})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    t = r.text
    route = "/collections/{name}/points/query"
    assert f'tqindex_requests_total{{method="POST",route="{route}",status="200"}} 1' in t
    assert f'tqindex_requests_total{{method="POST",route="{route}",status="400"}} 1' in t
    assert f'tqindex_request_duration_seconds_bucket{{method="POST",route="{route}",le="+Inf"}} 2' in t
    assert 'tqindex_collection_points{collection="c"} 40' in t
    assert 'tqindex_collection_bytes{collection="c",kind="codes"}' in t


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ["/collections", "/collections/{name}", "/collections/{name}/exists", "/collections/{name}/points",
                 "/collections/{name}/points/delete", "/collections/{name}/points/query",
                 "/collections/{name}/points/search", "/collections/{name}/points/scroll",
                 "/collections/{name}/points/count", "/collections/{name}/points/payload",
                 "/collections/{name}/snapshots", "/healthz", "/readyz", "/metrics"]:
        assert path in spec["paths"], path
    assert "requestBody" in spec["paths"]["/collections/{name}/points/query"]["post"]
    for old in ["/collections/{name}/search", "/collections/{name}/points/get", "/collections/{name}/snapshot"]:
        assert old not in spec["paths"], old  # one API: the old routes are gone


def test_api_key(tmp_path):
    with TestClient(_app(tmp_path, api_key="s3cret")) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        _bad(c.get("/collections"), 401, "missing api key")
        _bad(c.get("/collections", headers={"api-key": "wrong"}), 401, "wrong api key")
        _bad(c.put("/collections/a", json={"vectors": {"size": 4, "distance": "Dot"}}, headers={"api-key": "s3cre"}),
             401, "wrong api key")
        _bad(c.get("/metrics"), 401, "missing api key")
        _bad(c.get("/docs"), 401, "missing api key")
        assert c.get("/collections", headers={"api-key": "s3cret"}).status_code == 200
        assert c.get("/collections", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/collections", headers={"api-key": "s3cret"}).json()["result"] == {"collections": []}


def test_empty_upsert_and_delete_write_nothing(client):
    c = client
    _fill(c)
    before = _state(c)
    _ok(c.put("/collections/c/points", json={"points": []}))
    _ok(c.post("/collections/c/points/delete", json={"points": [777]}))
    _ok(c.post("/collections/c/points/delete", json={"filter": {"must": [{"key": "color", "match": {"value": "x"}}]}}))
    assert _state(c) == before  # same lsn: nothing logged

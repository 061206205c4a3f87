"""REST API in-process (TestClient): endpoints, envelopes, every bad input -> 4xx and no state change, auth."""

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


def _fill(c, name="c", n=40, metric="l2", seed=0):
    r = c.post("/collections", json={"name": name, "dim": DIM, "metric": metric, "bits": 4})
    assert r.status_code == 200, r.text
    x = _vecs(n, seed)
    pts = [{"id": i, "vector": x[i].tolist(), "payload": {"color": ["red", "blue"][i % 2], "i": i}} for i in range(n)]
    r = c.put(f"/collections/{name}/points", json={"points": pts})
    assert r.status_code == 200, r.text
    return x


def _state(c, name="c"):
    info = c.get(f"/collections/{name}").json()["result"]
    pts = c.post(f"/collections/{name}/points/scroll", json={"limit": 50, "with_vector": True}).json()["result"]
    return info["points"], info["lsn"], pts


def _ranked(results):
    """Search results with hits of equal score in id order: ties have no defined order (point 99 of
    the restart test is a copy of point 0), anything else must keep its rank."""
    out = []
    for hits in results:
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True), scores  # cosine: best first
        out.append(sorted(hits, key=lambda h: (-h["score"], h["id"])))
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
    info = _ok(c.post("/collections", json={"name": "docs", "dim": 4, "metric": "cosine", "bits": 3, "codec": "mse",
                                            "rerank": 2}))
    assert info["config"] == {"name": "docs", "dim": 4, "metric": "cosine", "bits": 3, "codec": "mse", "rerank": 2,
                              "seed": 0}
    assert info["points"] == 0 and set(info["memory"]) >= {"codes", "originals", "ids", "payloads", "total"}
    _bad(c.post("/collections", json={"name": "docs", "dim": 4}), 409, "already exists")
    assert _ok(c.get("/collections")) == {"collections": [{"name": "docs"}]}
    assert _ok(c.delete("/collections/docs")) is True
    _bad(c.get("/collections/docs"), 404, "'docs' does not exist")
    _bad(c.delete("/collections/docs"), 404, "does not exist")
    assert _ok(c.get("/collections")) == {"collections": []}
    _ok(c.post("/collections", json={"name": "docs", "dim": 6}))  # the name can be used again
    assert _ok(c.get("/collections/docs"))["config"]["dim"] == 6


def test_upsert_get_search_delete(client):
    c = client
    x = _fill(c)
    got = _ok(c.post("/collections/c/points/get", json={"ids": [3, 999, 1], "with_vector": True}))
    assert [p["id"] for p in got] == [3, 1]
    assert got[0]["payload"] == {"color": "blue", "i": 3}
    np.testing.assert_array_equal(np.array(got[0]["vector"], dtype=np.float32), x[3])
    hits = _ok(c.post("/collections/c/search", json={"vector": x[5].tolist(), "k": 5, "with_payload": True}))
    assert len(hits) == 5 and hits[0]["id"] == 5 and hits[0]["score"] == pytest.approx(0.0, abs=1e-5)
    assert hits[0]["payload"]["i"] == 5 and all(hits[i]["score"] <= hits[i + 1]["score"] for i in range(4))
    batch = _ok(c.post("/collections/c/search", json={"vectors": [x[1].tolist(), x[2].tolist()], "k": 3}))
    assert [b[0]["id"] for b in batch] == [1, 2] and all(len(b) == 3 for b in batch)
    # k larger than the collection: every point, no padding
    assert len(_ok(c.post("/collections/c/search", json={"vector": x[0].tolist(), "k": 100}))) == 40
    res = _ok(c.post("/collections/c/points/delete", json={"ids": [5, 5, 6, 12345]}))
    assert res["deleted"] == 2
    assert _ok(c.get("/collections/c"))["points"] == 38
    hits = _ok(c.post("/collections/c/search", json={"vector": x[5].tolist(), "k": 38}))
    assert 5 not in {h["id"] for h in hits} and len(hits) == 38


def test_upsert_replaces_existing_ids(client):
    c = client
    x = _fill(c)
    new = _vecs(1, seed=9)[0]
    _ok(c.put("/collections/c/points", json={"points": [{"id": 7, "vector": new.tolist(), "payload": {"v": 2}}]}))
    assert _ok(c.get("/collections/c"))["points"] == 40
    p = _ok(c.post("/collections/c/points/get", json={"ids": [7], "with_vector": True}))[0]
    assert p["payload"] == {"v": 2}
    np.testing.assert_array_equal(np.array(p["vector"], dtype=np.float32), new)
    hits = _ok(c.post("/collections/c/search", json={"vector": new.tolist(), "k": 1}))
    assert hits[0]["id"] == 7
    hits = _ok(c.post("/collections/c/search", json={"vector": x[7].tolist(), "k": 40}))
    assert [h["id"] for h in hits].count(7) == 1  # the old vector is gone, no duplicate


def test_filtered_search_returns_k_hits_when_k_match(client):
    c = client
    x = _fill(c, n=40)
    flt = {"must": [{"key": "color", "match": {"value": "red"}}]}  # even ids: 20 of them
    for k in (1, 10, 20):
        hits = _ok(c.post("/collections/c/search", json={"vector": x[1].tolist(), "k": k, "with_payload": True,
                                                          "filter": flt}))
        assert len(hits) == k and all(h["payload"]["color"] == "red" for h in hits)
    hits = _ok(c.post("/collections/c/search", json={"vector": x[1].tolist(), "k": 30, "filter": flt}))
    assert len(hits) == 20  # only 20 match
    flt2 = {"must": [{"key": "color", "match": {"value": "blue"}}], "must_not": [{"has_id": [1, 3]}]}
    hits = _ok(c.post("/collections/c/search", json={"vector": x[1].tolist(), "k": 40, "filter": flt2}))
    assert len(hits) == 18 and not {1, 3} & {h["id"] for h in hits}
    none = {"must": [{"key": "color", "match": {"value": "green"}}]}
    assert _ok(c.post("/collections/c/search", json={"vector": x[1].tolist(), "k": 5, "filter": none})) == []


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
    ({"points": [{"id": 2**63, "vector": [0.0] * DIM}]}, 400, "outside int64"),
    ({"points": [{"id": 2**64 + 5, "vector": [0.0] * DIM}]}, 400, "outside int64"),
    ({"points": [{"id": 100, "vector": [0.0] * (DIM - 1) + [1e39]}]}, 400, "not a finite float32"),
    ({"points": [{"id": i, "vector": [0.0] * DIM} for i in range(100, 151)]}, 413, "at most 50"),
    ({"points": "nope"}, 400, "expected an array"),
    ({"pts": []}, 400, "unknown field(s) ['pts']"),
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
    ({"vector": [0.0] * DIM, "k": 0}, 400, "k is 0"),
    ({"vector": [0.0] * DIM, "k": -1}, 400, "k is -1"),
    ({"vector": [0.0] * DIM, "k": 101}, 400, "k is 101; expected an integer in 1..100"),
    ({"vector": [0.0] * DIM, "k": 5, "rerank": 17}, 400, "rerank is 17"),
    ({"vector": [0.0] * 3, "k": 5}, 400, "has 3 dimensions"),
    ({"vectors": [[0.0] * DIM] * 51, "k": 5}, 413, "at most 50"),
])
def test_bad_searches(client, body, status, words):
    _fill(client)
    _bad(client.post("/collections/c/search", json=body), status, words)


def test_unknown_collection_route_and_method(client):
    c = client
    _bad(c.put("/collections/nope/points", json={"points": []}), 404, "'nope' does not exist")
    _bad(c.post("/collections/nope/search", json={"vector": [1, 2], "k": 1}), 404, "does not exist")
    _bad(c.post("/collections/nope/points/get", json={"ids": [1]}), 404, "does not exist")
    _bad(c.get("/collections/bad%20name"), 400, "is invalid")
    _bad(c.get("/nowhere"), 404, "no route GET /nowhere")
    _bad(c.get("/collections/x/search"), 405, "method GET is not allowed")


def test_ids_requests_validation(client):
    c = client
    _fill(c)
    before = _state(c)
    _bad(c.post("/collections/c/points/delete", json={"ids": [1, "2"]}), 400, "ids[1] is '2' (string)")
    _bad(c.post("/collections/c/points/delete", json={"ids": [-4]}), 400, "ids[0] is -4")
    _bad(c.post("/collections/c/points/delete", json={"ids": list(range(51))}), 413, "at most 50")
    _bad(c.post("/collections/c/points/delete", json={"id": [1]}), 400, "unknown field(s) ['id']")
    _bad(c.post("/collections/c/points/get", json={"ids": [1], "with_vector": 1}), 400, "expected true or false")
    assert _state(c) == before


def test_snapshot_and_restart_in_process(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        x = _fill(c, metric="cosine")
        snap = _ok(c.post("/collections/c/snapshot"))
        assert snap["name"].startswith("snap-") and snap["points"] == 40 and snap["size"] > 0
        assert _ok(c.get("/collections/c"))["wal_bytes"] == 0  # log truncated after the snapshot
        _ok(c.put("/collections/c/points", json={"points": [{"id": 99, "vector": x[0].tolist(), "payload": {"z": 1}}]}))
        _ok(c.post("/collections/c/points/delete", json={"ids": [4]}))
        q = {"vectors": x[:5].tolist(), "k": 10, "with_payload": True}
        before = _ok(c.post("/collections/c/search", json=q))
        state = _state(c)
    with TestClient(_app(tmp_path)) as c:  # snapshot + log replay
        assert _state(c) == state
        after = _ok(c.post("/collections/c/search", json=q))
        assert _ranked(after) == _ranked(before)


def test_metrics(client):
    c = client
    _fill(c)
    c.post("/collections/c/search", json={"vector": [0.0] * DIM, "k": 3})
    c.post("/collections/c/search", json={"vector": [0.0] * DIM, "k": 0})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    t = r.text
    assert 'tqindex_requests_total{method="POST",route="/collections/{name}/search",status="200"} 1' in t
    assert 'tqindex_requests_total{method="POST",route="/collections/{name}/search",status="400"} 1' in t
    assert 'tqindex_request_duration_seconds_bucket{method="POST",route="/collections/{name}/search",le="+Inf"} 2' in t
    assert 'tqindex_collection_points{collection="c"} 40' in t
    assert 'tqindex_collection_bytes{collection="c",kind="codes"}' in t


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ["/collections", "/collections/{name}", "/collections/{name}/points", "/collections/{name}/points/get",
                 "/collections/{name}/points/delete", "/collections/{name}/search", "/collections/{name}/snapshot",
                 "/healthz", "/readyz", "/metrics"]:
        assert path in spec["paths"], path
    assert "requestBody" in spec["paths"]["/collections/{name}/search"]["post"]


def test_api_key(tmp_path):
    with TestClient(_app(tmp_path, api_key="s3cret")) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        _bad(c.get("/collections"), 401, "missing api key")
        _bad(c.get("/collections", headers={"api-key": "wrong"}), 401, "wrong api key")
        _bad(c.post("/collections", json={"name": "a", "dim": 4}, headers={"api-key": "s3cre"}), 401, "wrong api key")
        _bad(c.get("/metrics"), 401, "missing api key")
        _bad(c.get("/docs"), 401, "missing api key")
        assert c.get("/collections", headers={"api-key": "s3cret"}).status_code == 200
        assert c.get("/collections", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/collections", headers={"api-key": "s3cret"}).json()["result"] == {"collections": []}


def test_empty_upsert_and_delete_write_nothing(client):
    c = client
    _fill(c)
    before = _state(c)
    assert _ok(c.put("/collections/c/points", json={"points": []}))["upserted"] == 0
    assert _ok(c.post("/collections/c/points/delete", json={"ids": [777]}))["deleted"] == 0
    assert _state(c) == before  # same lsn: nothing logged

"""REST collections with an inverted-file index: flat until train_at points, then trained lists; durable."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient
from test_server_api import _app, _bad, _ok, _query, _ranked, _state

DIM = 8


def _pts(ids, seed=0):
    x = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
    return [{"id": int(i), "vector": x[j].tolist(), "payload": {"i": int(i)}} for j, i in enumerate(ids)]


def test_ivf_collection_trains_at_train_at_and_survives_restart(tmp_path):
    index = {"type": "ivf", "nlist": 4, "nprobe": 2, "train_at": 50}
    spec = {"vectors": {"size": DIM, "distance": "Cosine"}, "metadata": {"tqindex": {"bits": 4, "index": index}}}
    qs = [p["vector"] for p in _pts(range(5), seed=2)]

    def search(c):  # hnsw_ef is the nprobe of an ivf collection
        return [_query(c, "v", q, 5, params={"hnsw_ef": 4}, with_payload=True) for q in qs]

    with TestClient(_app(tmp_path)) as c:
        _ok(c.put("/collections/v", json=spec))
        assert _ok(c.get("/collections/v"))["config"]["metadata"]["tqindex"]["index"] == index
        _ok(c.put("/collections/v/points", json={"points": _pts(range(40))}))
        assert _ok(c.get("/collections/v"))["tqindex"]["index"]["trained"] is False
        _ok(c.post("/collections/v/snapshots"))  # a flat snapshot, then the switch happens in the log
        _ok(c.put("/collections/v/points", json={"points": _pts(range(40, 60), seed=1)}))
        assert _ok(c.get("/collections/v"))["tqindex"]["index"]["trained"] is True
        _ok(c.post("/collections/v/points/delete", json={"points": [3, 41]}))
        before = search(c)
        assert all(len(r) == 5 for r in before)
        state = _state(c, "v")
    with TestClient(_app(tmp_path)) as c:  # flat snapshot + replay: trained at the same record
        assert _ok(c.get("/collections/v"))["tqindex"]["index"]["trained"] is True
        assert _state(c, "v") == state
        assert _ranked(search(c)) == _ranked(before)
        _ok(c.post("/collections/v/snapshots"))  # an ivf snapshot
    with TestClient(_app(tmp_path)) as c:
        assert _state(c, "v") == state
        assert _ranked(search(c)) == _ranked(before)


def test_index_spec_validation(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        for index, words in [({"type": "hnsw"}, "expected 'flat' or 'ivf'"), ({"type": "ivf"}, "no 'nlist'"),
                             ({"type": "ivf", "nlist": 4, "nprobe": 5}, "index.nprobe is 5"),
                             ({"type": "ivf", "nlist": 8, "train_at": 3}, "index.train_at is 3"),
                             ({"type": "ivf", "nlist": 4, "extra": 1}, "unknown field"), ("ivf", "expected a JSON object")]:
            _bad(c.put("/collections/x", json={"vectors": {"size": DIM, "distance": "Dot"},
                                               "metadata": {"tqindex": {"index": index}}}), 400, words)
        assert _ok(c.get("/collections")) == {"collections": []}
        _ok(c.put("/collections/f", json={"vectors": {"size": DIM, "distance": "Dot"},
                                          "metadata": {"tqindex": {"index": {"type": "flat"}}}}))
        assert "index" not in _ok(c.get("/collections/f"))["tqindex"]["config"]

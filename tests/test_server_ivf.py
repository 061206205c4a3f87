"""REST collections with an inverted-file index: flat until train_at points, then trained lists; durable."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient
from test_server_api import _app, _bad, _ok, _ranked, _state

DIM = 8


def _pts(ids, seed=0):
    x = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
    return [{"id": int(i), "vector": x[j].tolist(), "payload": {"i": int(i)}} for j, i in enumerate(ids)]


def test_ivf_collection_trains_at_train_at_and_survives_restart(tmp_path):
    spec = {"name": "v", "dim": DIM, "metric": "cosine", "bits": 4, "index": {"type": "ivf", "nlist": 4, "nprobe": 2,
                                                                           "train_at": 50}}
    with TestClient(_app(tmp_path)) as c:
        info = _ok(c.post("/collections", json=spec))
        assert info["config"]["index"] == {"type": "ivf", "nlist": 4, "nprobe": 2, "train_at": 50}
        _ok(c.put("/collections/v/points", json={"points": _pts(range(40))}))
        assert _ok(c.get("/collections/v"))["index"]["trained"] is False
        _ok(c.post("/collections/v/snapshot"))  # a flat snapshot, then the switch happens in the log
        _ok(c.put("/collections/v/points", json={"points": _pts(range(40, 60), seed=1)}))
        assert _ok(c.get("/collections/v"))["index"]["trained"] is True
        _ok(c.post("/collections/v/points/delete", json={"ids": [3, 41]}))
        q = {"vectors": [p["vector"] for p in _pts(range(5), seed=2)], "k": 5, "nprobe": 4, "with_payload": True}
        before = _ok(c.post("/collections/v/search", json=q))
        assert all(len(r) == 5 for r in before)
        state = _state(c, "v")
    with TestClient(_app(tmp_path)) as c:  # flat snapshot + replay: trained at the same record
        assert _ok(c.get("/collections/v"))["index"]["trained"] is True
        assert _state(c, "v") == state
        assert _ranked(_ok(c.post("/collections/v/search", json=q))) == _ranked(before)
        _ok(c.post("/collections/v/snapshot"))  # an ivf snapshot
    with TestClient(_app(tmp_path)) as c:
        assert _state(c, "v") == state
        assert _ranked(_ok(c.post("/collections/v/search", json=q))) == _ranked(before)


def test_index_spec_validation(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        for index, words in [({"type": "hnsw"}, "expected 'flat' or 'ivf'"), ({"type": "ivf"}, "no 'nlist'"),
                             ({"type": "ivf", "nlist": 4, "nprobe": 5}, "index.nprobe is 5"),
                             ({"type": "ivf", "nlist": 8, "train_at": 3}, "index.train_at is 3"),
                             ({"type": "ivf", "nlist": 4, "extra": 1}, "unknown field"), ("ivf", "expected a JSON object")]:
            _bad(c.post("/collections", json={"name": "x", "dim": DIM, "index": index}), 400, words)
        assert _ok(c.get("/collections")) == {"collections": []}
        _ok(c.post("/collections", json={"name": "f", "dim": DIM, "index": {"type": "flat"}}))
        assert "index" not in _ok(c.get("/collections/f"))["config"]

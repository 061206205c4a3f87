"""The service as a real uvicorn process on 127.0.0.1: HTTP round trip, auth, limits, consistency under
concurrent writes, bounded mixed load with no 5xx, and the SIGKILL crash test (5 cycles)."""

from __future__ import annotations

import signal
import threading

import httpx
import numpy as np
import pytest

from bench.crash import failures, run_crash_test
from bench.load import preload, run_load
from server.process import ServerProcess

KEY = "test-key-123"
DIM = 16


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    s = ServerProcess(root / "data", api_key=KEY, args=["--max-body-bytes", str(1 << 20), "--max-batch", "2000"])
    s.start()
    yield s
    code = s.stop(timeout=30)
    # Graceful shutdown on SIGTERM: uvicorn finishes, then re-raises the signal (exit -15), never SIGKILL (-9).
    assert code in (0, -signal.SIGTERM), (code, s.tail())


def _c(srv, key=KEY):
    return httpx.Client(base_url=srv.url, headers={"api-key": key} if key else {}, timeout=60.0)


def test_health_auth_and_round_trip(srv):
    with _c(srv, key=None) as anon:
        assert anon.get("/healthz").json()["result"] == "alive"
        assert anon.get("/readyz").json()["result"]["ready"] is True
        r = anon.get("/collections")
        assert r.status_code == 401 and "missing api key" in r.json()["status"]["error"]
    with _c(srv, key="nope") as bad:
        assert bad.put("/collections/x", json={"vectors": {"size": 4, "distance": "Dot"}}).status_code == 401
    with _c(srv) as c:
        assert c.put("/collections/rt", json={"vectors": {"size": DIM, "distance": "Dot"}}).status_code == 200
        x = np.random.default_rng(0).standard_normal((100, DIM)).astype(np.float32)
        pts = [{"id": 1000 + i, "vector": x[i].tolist(), "payload": {"i": i}} for i in range(100)]
        assert c.put("/collections/rt/points", json={"points": pts}).json()["result"]["status"] == "completed"
        hits = c.post("/collections/rt/points/query", json={"query": x[3].tolist(), "limit": 4,
                                                             "with_payload": True}).json()
        assert hits["status"] == "ok" and len(hits["result"]["points"]) == 4
        assert 1003 in {h["id"] for h in hits["result"]["points"]}
        assert "tqindex_collection_points{collection=\"rt\"} 100" in c.get("/metrics").text


def test_body_limit_over_http(srv):
    with _c(srv) as c:
        c.put("/collections/lim", json={"vectors": {"size": DIM, "distance": "Dot"}})
        big = b'{"points": [' + b" " * (1 << 20) + b"]}"
        r = c.put("/collections/lim/points", content=big)
        assert r.status_code == 413 and "at most 1048576" in r.json()["status"]["error"]
        r = c.put("/collections/lim/points", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))
        assert r.status_code == 413
        r = c.put("/collections/lim/points", content=b'{"points": [{"id": 1, "vector": [NaN]}]}')
        assert r.status_code == 400 and "NaN" in r.json()["status"]["error"]
        assert c.get("/collections/lim").json()["result"]["points_count"] == 0


def test_second_server_on_same_data_dir_refused(srv):
    other = ServerProcess(srv.data_dir, log_path=srv.data_dir.parent / "second.log")
    with pytest.raises(RuntimeError, match="in use by another process"):
        other.start(timeout=60)


def test_readers_see_whole_upserts(srv):
    """Each upsert rewrites all 60 points with generation g: a search sees one generation, never a mix."""
    n, rounds = 60, 15
    with _c(srv) as c:
        c.put("/collections/cons", json={"vectors": {"size": DIM, "distance": "Euclid"}})

        def batch(g):
            x = np.random.default_rng(g).standard_normal((n, DIM)).astype(np.float32)
            return {"points": [{"id": i, "vector": x[i].tolist(), "payload": {"g": g}} for i in range(n)]}

        assert c.put("/collections/cons/points", json=batch(0)).status_code == 200
    problems: list[str] = []
    stop = threading.Event()

    def reader(seed):
        rng = np.random.default_rng(seed)
        with _c(srv) as rc:
            while not stop.is_set():
                r = rc.post("/collections/cons/points/query", json={"query": rng.standard_normal(DIM).tolist(),
                                                                     "limit": n, "with_payload": True})
                if r.status_code != 200:
                    problems.append(f"search {r.status_code}: {r.text[:200]}")
                    return
                hits = r.json()["result"]["points"]
                gens = {h["payload"]["g"] for h in hits}
                if len(hits) != n or len(gens) != 1 or len({h["id"] for h in hits}) != n:
                    problems.append(f"{len(hits)} hits, generations {sorted(gens)}")

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in readers:
        t.start()
    try:
        with _c(srv) as c:
            for g in range(1, rounds + 1):
                r = c.put("/collections/cons/points", json=batch(g))
                assert r.status_code == 200, r.text
    finally:
        stop.set()
        for t in readers:
            t.join(60)
    assert not problems, problems[:5]


def test_bounded_mixed_load_has_no_5xx(srv):
    n0, dim = 600, 32
    preload(srv.url, {"api-key": KEY}, n0, dim, seed=3, batch=300)
    res = run_load(srv.url, {"api-key": KEY}, concurrency=8, requests=240, dim=dim, n0=n0, upsert_share=0.3,
                   batch=8, k=10, seed=4, max_seconds=120)
    assert res["n5xx"] == 0, res["errors"]
    assert set(res["codes"]) == {"200"}, res["codes"]
    assert not res["errors"], res["errors"][:5]
    assert sum(r["count"] for r in res["rows"]) == 240


@pytest.mark.parametrize("index", [None, {"type": "ivf", "nlist": 4, "nprobe": 2, "train_at": 150}])
def test_crash_cycles(tmp_path, index):
    """SIGKILL at random moments x5: every acknowledged point is back with its payload and vector
    (an ivf collection too: it switches from flat to trained lists during the run)."""
    rows = run_crash_test(5, seed=1234, dim=8, min_run=0.3, max_run=1.0, work_dir=tmp_path, index=index)
    assert failures(rows) == 0, [r.get("examples") for r in rows]
    assert sum(r.get("ops_acked", 0) for r in rows) > 0
    assert rows[-1]["points"] > 0

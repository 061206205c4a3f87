"""Requests and files that must not poison the log, fail other writers, exhaust the server or go unseen.

One test (or more) per finding of the adversarial run: each failed before the fix it names.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_server_api import _app, _bad, _create, _ok, _state

import tqindex
from server import app as app_module
from server.app import create_app
from server.collection import Collection
from server.config import Settings
from server.errors import ApiError
from server.ops import Upsert, encode_op
from server.requests import UpsertRequest
from server.validation import CollectionSpec

BIG = [3e38, 3e38, 3e38, 3e38]


def create_app_default(tmp_path):
    """The app with the shipped default limits (not the small test limits of test_server_api)."""
    return create_app(Settings(data_dir=tmp_path / "data"), recover_in_background=False)  # finite float32, but its squared norm is not


def _coll(c, name="p", dim=4, metric="ip"):
    _ok(_create(c, name, dim=dim, metric=metric, bits=4, codec="prod"))


def _pts(ids, dim=4, seed=0, payload=None):
    x = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    return [{"id": i, "vector": x[j].tolist(), "payload": payload} for j, i in enumerate(ids)]


# 1. one valid-looking upsert bricked a collection (mean overflowed to inf after the log record was written)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_huge_vectors_are_refused_before_the_log_and_nothing_changes(tmp_path, metric):
    with TestClient(_app(tmp_path)) as c:
        _coll(c, metric=metric)
        before = _state(c, "p")
        _bad(c.put("/collections/p/points", json={"points": [{"id": 1, "vector": BIG}, {"id": 2, "vector": BIG}]}),
             400, "above 1e+18")
        assert _state(c, "p") == before and _ok(c.get("/collections/p"))["tqindex"]["wal_bytes"] == 0
        _bad(c.post("/collections/p/points/query", json={"query": [1e30] * 4, "limit": 3}), 400, "L2 norm")
        _ok(c.put("/collections/p/points", json={"points": _pts([1, 2, 3])}))  # the collection still works
        assert _ok(c.get("/collections/p"))["points_count"] == 3
    with TestClient(_app(tmp_path)) as c:  # and restarts
        assert _ok(c.get("/readyz"))["quarantined"] == {} and _ok(c.get("/collections/p"))["points_count"] == 3


def test_huge_vectors_work_with_cosine(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        _coll(c, metric="cosine")
        _ok(c.put("/collections/p/points", json={"points": [{"id": 1, "vector": BIG}, {"id": 2, "vector": [0, 1, 0, 0]}]}))
        hits = _ok(c.post("/collections/p/points/query", json={"query": [1, 1, 1, 1], "limit": 2}))["points"]
        assert [h["id"] for h in hits] == [1, 2] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rejected_add_changes_no_state(metric):
    ix = tqindex.Index(4, metric=metric, device="cpu")
    with pytest.raises(ValueError, match="above 1e"):
        ix.add(np.full((2, 4), 3e38, np.float32))
    assert ix.mean is None and len(ix) == 0  # before: mean = inf, and every later add failed
    ix.add(np.eye(4, dtype=np.float32))
    assert len(ix) == 4 and bool(ix.mean.isfinite().all())


def test_mean_of_large_but_valid_vectors_is_finite():
    ix = tqindex.Index(4, metric="ip", device="cpu", rerank=2)
    x = np.full((1000, 4), 4.9e17, np.float32)  # norm 9.8e17 <= MAX_NORM; a float32 sum would reach 2e21 (fine)
    x[0, 0] = -4.9e17
    ix.add(x)
    D, I = ix.search(x[:1] * 0 + np.float32(1e17), 3)
    assert np.isfinite(D).all() and (I >= 0).all()


# 6. overflowing scores dropped results: now no accepted input can overflow, and large ones rank right
def test_scores_near_the_limit_rank_in_place():
    ix = tqindex.Index(3, metric="ip", device="cpu", rerank=4)
    x = np.array([[5e17, 0, 0], [1e17, 0, 0], [0, 1, 0], [-5e17, 0, 0], [0, 0, 1]], np.float32)
    ix.add(x)
    D, I = ix.search(np.array([[5e17, 0, 0]], np.float32), 5)
    order = I[0].tolist()  # scores 2.5e35, 5e34, 0, 0 (a tie), -2.5e35
    assert order[:2] == [0, 1] and set(order[2:4]) == {2, 4} and order[4] == 3
    assert np.isfinite(D).all() and D[0, 0] == pytest.approx(2.5e35, rel=1e-3)
    l2 = tqindex.Index(3, metric="l2", device="cpu", rerank=4)
    l2.add(x)
    with pytest.raises(ValueError, match="queries row 0 has L2 norm 1.73e\\+30"):
        l2.search(np.full((1, 3), 1e30, np.float32), 5)  # before: every result came back -1 / inf
    D, I = l2.search(np.array([[-5e17, 0, 0]], np.float32), 5)
    assert I[0, 0] == 3 and np.isfinite(D).all()


def test_add_after_the_largest_id_is_a_clear_error():
    ix = tqindex.Index(4, device="cpu")
    ix.add_with_ids(np.ones((1, 4), np.float32), [2**63 - 1])
    with pytest.raises(ValueError, match="largest int64 id"):  # before: a raw OverflowError
        ix.add(np.ones((1, 4), np.float32))
    assert len(ix) == 1


# 2. one bad payload failed other clients' good writes (group commit encoded every record in one go)
def test_overflowing_json_number_is_400(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        _coll(c)
        body = b'{"points": [{"id": 1, "vector": [1, 0, 0, 0], "payload": {"x": 1e400}}]}'
        _bad(c.put("/collections/p/points", content=body), 400, "beyond the range of a double")
        assert _ok(c.get("/collections/p"))["points_count"] == 0


def test_a_bad_write_fails_only_its_own_writer(tmp_path):
    s = Settings(data_dir=tmp_path, snapshot_wal_bytes=0)
    coll = Collection.create(CollectionSpec("g", 4, "ip"), tmp_path, s)
    good_errors: list[BaseException] = []
    bad_status: list[int] = []
    gate = threading.Barrier(8)

    def good(w):
        gate.wait()
        for j in range(25):
            try:
                coll.upsert(UpsertRequest([w * 100 + j], np.ones((1, 4), np.float32), [{"w": w}]))
            except BaseException as e:  # pragma: no cover - the assertion below reports it
                good_errors.append(e)

    def bad(w):
        gate.wait()
        for j in range(25):  # an upsert that validation would stop, sent straight to the collection
            try:
                coll.upsert(UpsertRequest([9000 + w * 100 + j], np.ones((1, 4), np.float32),
                                          [{"x": float("inf")}]))
            except ApiError as e:
                bad_status.append(e.status_code)

    threads = [threading.Thread(target=good, args=(w,)) for w in range(6)]
    threads += [threading.Thread(target=bad, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not good_errors, good_errors[:3]
    assert bad_status == [400] * 50 and len(coll.payloads) == 150 and coll.quarantined is None
    coll.wal.close()
    assert len(Collection.open(tmp_path / "g", s).payloads) == 150


# 3. a payload that could be stored but never read back; deep bodies were 500
def _nested(depth):
    v: object = 1
    for _ in range(depth - 1):
        v = {"a": v}
    return {"a": v}


def test_payload_depth_and_size_limits(tmp_path):
    with TestClient(_app(tmp_path, max_payload_depth=32, max_payload_bytes=2000, max_body_bytes=1 << 20)) as c:
        _coll(c)
        _bad(c.put("/collections/p/points", json={"points": _pts([1], payload=_nested(33))}), 400,
             "nested 33 levels deep; expected at most 32 (--max-payload-depth)")
        for depth in (985, 986):  # before: 985 was acknowledged and could never be read back, 986 was a 500
            body = b'{"points": [{"id": 1, "vector": [1, 0, 0, 0], "payload": ' + b'{"a": ' * depth + b"1" + \
                b"}" * depth + b"}]}"
            _bad(c.put("/collections/p/points", content=body), 400, "nested")
        _bad(c.put("/collections/p/points", json={"points": _pts([1], payload={"s": "x" * 3000})}), 413,
             "--max-payload-bytes")
        _bad(c.put("/collections/p/points", content=b"[" * 100_000), 400, "nested too deeply")
        _bad(c.put("/collections/p/points", content=b'{"points": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400,
             "nested too deeply")
        assert _ok(c.get("/collections/p"))["points_count"] == 0
        deep = _nested(32)  # the deepest allowed payload is answered by every read
        _ok(c.put("/collections/p/points", json={"points": _pts([1], payload=deep)}))
        assert _ok(c.post("/collections/p/points", json={"ids": [1]}))[0]["payload"] == deep
        assert _ok(c.post("/collections/p/points/scroll", json={}))["points"][0]["payload"] == deep
        hits = _ok(c.post("/collections/p/points/query", json={"query": [1, 0, 0, 0], "limit": 1,
                                                                "with_payload": True}))["points"]
        assert hits[0]["payload"] == deep


# a 40-byte request could ask for a 65,536-dimensional collection: a 16 GiB rotation (found by the fuzz test)
def test_default_max_dim_bounds_the_rotation(tmp_path):
    with TestClient(create_app_default(tmp_path)) as c:
        _bad(c.put("/collections/big", json={"vectors": {"size": 40_000, "distance": "Dot"}}), 400,
             "expected an integer in 2..4096")
        assert _ok(c.get("/collections")) == {"collections": []}


# 4. one 12 KB search took 4.2 GB; answers had no bound
def test_results_per_request_are_limited_before_any_work(tmp_path):
    with TestClient(_app(tmp_path, max_k=10_000, max_batch=10_000, max_body_bytes=1 << 22,
                         max_results=100_000)) as c:
        _coll(c, dim=2)
        _ok(c.put("/collections/p/points", json={"points": _pts(range(50), dim=2)}))
        q = {"query": [1, 0.5], "limit": 10_000, "params": {"quantization": {"rescore": False}}}
        _bad(c.post("/collections/p/points/query/batch", json={"searches": [q] * 1000}), 413, "--max-results")
        assert len(_ok(c.post("/collections/p/points/query/batch", json={"searches": [q] * 10}))) == 10


def test_answer_size_limit(tmp_path):
    with TestClient(_app(tmp_path, max_response_bytes=4000)) as c:
        _coll(c, dim=32)
        _ok(c.put("/collections/p/points", json={"points": _pts(range(40), dim=32)}))
        _bad(c.post("/collections/p/points", json={"ids": list(range(40)), "with_vector": True}), 413,
             "--max-response-bytes")  # refused from its size estimate, before the vectors are read
        _bad(c.post("/collections/p/points/scroll", json={"limit": 40, "with_vector": True}), 413, "without vectors")
        _bad(c.post("/collections/p/points/query", json={"query": [0.1] * 32, "limit": 40, "with_vector": True}), 413,
             "--max-response-bytes")
        _ok(c.put("/collections/p/points", json={"points": _pts([99], dim=32, payload={"s": "y" * 5000})}))
        _bad(c.post("/collections/p/points", json={"ids": [99]}), 413, "the answer is")  # measured after
        assert len(_ok(c.post("/collections/p/points", json={"ids": [1, 2]}))) == 2


# 5. large answers were serialised on the event loop, freezing every other request
def test_answers_are_serialised_off_the_event_loop(tmp_path, monkeypatch):
    seen: list[tuple[str, int]] = []
    real = app_module._render

    def spy(content):
        seen.append((str(content.get("result"))[:20], threading.get_ident()))
        return real(content)

    monkeypatch.setattr(app_module, "_render", spy)
    with TestClient(_app(tmp_path)) as c:
        _coll(c)
        _ok(c.put("/collections/p/points", json={"points": _pts(range(20))}))
        seen.clear()
        c.get("/healthz")  # rendered on the event loop (tiny)
        loop_thread = seen[-1][1]
        c.post("/collections/p/points/query/batch", json={"searches": [{"query": [1, 0, 0, 0], "limit": 20,
                                                                         "with_payload": True}] * 5})
        c.post("/collections/p/points/scroll", json={"limit": 20, "with_vector": True})
        assert len(seen) == 3 and all(t != loop_thread for _, t in seen[1:]), seen


# minor: after a 500 the server dropped the connection (the exception reached the server)
def test_unexpected_error_is_answered_not_raised(tmp_path, monkeypatch):
    with TestClient(_app(tmp_path)) as c:  # raise_server_exceptions=True: a propagating error fails here
        _coll(c)
        monkeypatch.setattr(Collection, "info", lambda self: 1 / 0)
        _bad(c.get("/collections/p"), 500, "ZeroDivisionError")
        assert c.get("/healthz").status_code == 200


# replay that meets a record it cannot apply quarantines that collection, never the whole server
def test_unreplayable_record_quarantines_one_collection(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        _coll(c, "p")
        _coll(c, "q")
        _ok(c.put("/collections/p/points", json={"points": _pts([1, 2])}))
        _ok(c.put("/collections/q/points", json={"points": _pts([5])}))
        coll = c.app.state.store.get("p")
        # A record validation would never let through (3-d vectors in a 4-d collection), written as a
        # broken or older build might have: the log holds it, applying it fails.
        coll.wal.append(coll.lsn + 1, encode_op(Upsert(np.asarray([3]), np.ones((1, 3), np.float32), [None])))
    with TestClient(_app(tmp_path)) as c:
        ready = _ok(c.get("/readyz"))
        assert ready["failed"] == {} and list(ready["quarantined"]) == ["p"] and "record 2" in ready["quarantined"]["p"]
        assert _ok(c.get("/collections/q"))["points_count"] == 1  # the other collection is untouched
        _ok(c.put("/collections/q/points", json={"points": _pts([6])}))
        info = _ok(c.get("/collections/p"))
        assert info["points_count"] == 2 and info["tqindex"]["quarantined"] and info["status"] == "red"
        assert [h["id"] for h in _ok(c.post("/collections/p/points", json={"ids": [1, 2, 3]}))] == [1, 2]
        _bad(c.put("/collections/p/points", json={"points": _pts([7])}), 503, "quarantined")
        _bad(c.post("/collections/p/points/delete", json={"points": [1]}), 503, "quarantined")
        _bad(c.post("/collections/p/points/payload", json={"payload": {"a": 1}, "points": [1]}), 503, "quarantined")
        _bad(c.post("/collections/p/snapshots"), 503, "quarantined")
        assert _ok(c.delete("/collections/p")) is True
        _coll(c, "p")
        assert _ok(c.get("/collections/p"))["points_count"] == 0


# 7. Index.load trusted its files (snapshots load through it)
@pytest.fixture()
def saved(tmp_path):
    ix = tqindex.Index(8, metric="l2", codec="prod", bits=4, device="cpu")
    ix.add(np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32))
    path = tmp_path / "ix"
    ix.save(path)
    return path


def _file(path, name):
    return path / json.loads((path / "manifest.json").read_text())["files"][name]


def test_flipped_byte_is_found_by_its_checksum(saved):
    f = _file(saved, "norms")
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{f.name} is damaged"):
        tqindex.Index.load(saved)


def _without_checksums(path):
    man = json.loads((path / "manifest.json").read_text())
    man.pop("sha256")  # as a format-v1 directory written before checksums
    (path / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("name,bad", [
    ("norms", lambda a: a[:50]),            # before: loaded, and answered differently
    ("originals", lambda a: a[:50]),        # before: loaded, then search raised IndexError
    ("mse", lambda a: a[:, :-1]),           # before: a raw RuntimeError
    ("qjl", lambda a: a[:10]),
    ("ids", lambda a: a.astype(np.int32)),
    ("originals", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a).astype(np.float32)),
    ("ids", lambda a: np.concatenate([a[:-1], a[:1]])),  # a repeated id
])
def test_inconsistent_files_are_clear_errors(saved, name, bad):
    _without_checksums(saved)
    f = _file(saved, name)
    np.save(f, bad(np.load(f)))
    with pytest.raises(ValueError, match=f.name):
        tqindex.Index.load(saved)


def test_missing_and_unreadable_files(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    _file(copy, "gammas").unlink()
    with pytest.raises(ValueError, match="is missing"):
        tqindex.Index.load(copy)
    _without_checksums(saved)
    f = _file(saved, "mse")
    f.write_bytes(f.read_bytes()[:60])  # a truncated .npy
    with pytest.raises(ValueError, match=f.name):
        tqindex.Index.load(saved)


def test_damaged_snapshot_fails_one_collection_which_can_be_deleted(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        _coll(c, "p")
        _coll(c, "q")
        _ok(c.put("/collections/p/points", json={"points": _pts(range(10))}))
        snap = _ok(c.post("/collections/p/snapshots"))["name"]
    idx = tmp_path / "data" / "collections" / "p" / "snapshots" / snap / "index"
    f = _file(idx, "originals")
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with TestClient(_app(tmp_path)) as c:
        ready = _ok(c.get("/readyz"))  # the server is ready; the damaged collection is named
        assert "p" in ready["failed"] and "damaged" in ready["failed"]["p"]
        _bad(c.get("/collections/p"), 503, "failed to load")
        assert _ok(c.get("/collections/p/exists")) == {"exists": True}  # so a create would be refused (409)
        assert _ok(c.get("/collections/q"))["points_count"] == 0
        assert _ok(c.delete("/collections/p")) is True
        _coll(c, "p")
        assert _ok(c.get("/readyz"))["failed"] == {}

"""Collection: group commit under concurrent writers, replay after reopen, snapshot covering the log."""

from __future__ import annotations

import threading

import numpy as np

from server.collection import Collection
from server.config import Settings
from server.requests import UpsertRequest
from server.validation import CollectionSpec


def _req(ids, seed):
    x = np.random.default_rng(seed).standard_normal((len(ids), 8)).astype(np.float32)
    return UpsertRequest(list(ids), x, [{"s": seed} for _ in ids])


def test_group_commit_concurrent_writers(tmp_path):
    s = Settings(data_dir=tmp_path, snapshot_wal_bytes=0)
    c = Collection.create(CollectionSpec("g", 8, "l2"), tmp_path, s)
    calls = []
    orig = c.wal.append_many

    def counting(records):
        calls.append(len(records))
        orig(records)

    c.wal.append_many = counting  # type: ignore[method-assign]
    results: list[dict] = []
    errors: list[BaseException] = []

    def writer(w):
        try:
            for j in range(15):
                results.append(c.upsert(_req([w * 1000 + j, w * 1000 + j + 500], w * 100 + j)))
                if j % 5 == 4:
                    results.append(c.delete(np.asarray([w * 1000 + j], dtype=np.int64)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    lsns = [r["operation_id"] for r in results]
    assert len(set(lsns)) == len(lsns) == 6 * 18 and sum(calls) == len(lsns)
    assert len(c.payloads) == len(c.index) == 6 * (30 - 3)
    c.wal.close()
    again = Collection.open(tmp_path / "g", s)  # replay of the grouped records gives the same state
    assert dict(again.payloads.items()) == dict(c.payloads.items())
    np.testing.assert_array_equal(np.sort(again.index.ids), np.sort(c.index.ids))
    assert again.lsn == max(lsns)


def test_snapshot_then_replay(tmp_path):
    s = Settings(data_dir=tmp_path, snapshot_wal_bytes=0)
    c = Collection.create(CollectionSpec("s", 8, "ip"), tmp_path, s)
    c.upsert(_req(range(10), 1))
    info = c.snapshot()
    assert info.lsn == 1 and c.wal.size == 0
    c.upsert(_req([3, 20], 2))
    c.delete(np.asarray([4], dtype=np.int64))
    want = dict(c.payloads.items())
    c.wal.close()
    again = Collection.open(tmp_path / "s", s)
    assert dict(again.payloads.items()) == want and again.lsn == 3 and len(again.index) == 10

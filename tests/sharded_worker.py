"""The rank side of tests/test_sharded.py: gloo processes run named scenarios against a single index over the union.

Each scenario runs its collectives first and checks afterwards, so a failed check on one rank does not
leave the others waiting; every rank writes {scenario: "ok" | traceback} to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import tqindex

D = 16
N = 900
NQ = 12
K = 10


def _data(seed: int, n: int = N, nq: int = NQ) -> tuple[np.ndarray, np.ndarray]:
    """Clustered (n, D) vectors and (nq, D) queries, the same on every rank."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((12, D)).astype(np.float32) * 3
    x = c[rng.integers(0, 12, n)] + rng.standard_normal((n, D)).astype(np.float32)
    q = c[rng.integers(0, 12, nq)] + rng.standard_normal((nq, D)).astype(np.float32)
    return x + 0.5, q + 0.5  # off the origin: the centring mean matters


def _parts(n: int, world: int, seed: int) -> np.ndarray:
    """Which rank passes each row (a seeded split unlike the owners': routing must move rows)."""
    return np.random.default_rng(seed + 100).integers(0, world, n)


def _same(a: tuple[Any, Any], b: tuple[Any, Any], what: str) -> None:
    Da, Ia = (np.asarray(v) for v in a)
    Db, Ib = (np.asarray(v) for v in b)
    assert Da.shape == Db.shape and Ia.shape == Ib.shape, (what, Da.shape, Db.shape)
    np.testing.assert_allclose(Da, Db, rtol=1e-5, atol=1e-5, err_msg=what)
    for i, j in zip(*np.nonzero(Ia != Ib)):  # ties aside: an id may swap places with one of equal score
        tied = np.abs(Db[i] - Da[i, j]) <= 1e-5 * (1 + abs(Da[i, j]))
        assert Ia[i, j] in Ib[i][tied] or tied[-1], (what, i, j, Ia[i], Ib[i], Da[i], Db[i])


def _raises(fn: Callable[[], Any], exc: type[BaseException], text: str) -> str:
    try:
        fn()
    except exc as e:
        assert text in str(e), (text, str(e))
        return str(e)
    raise AssertionError(f"expected {exc.__name__} containing {text!r}")


def _factory(kind: str, metric: str, **kw: Any) -> Callable[[], tqindex.Index]:
    where = kw.get("originals", "host")  # "device": tensors beside the codes (the GPU layout), gathered there
    if kind == "ivf":
        return lambda: tqindex.IVFIndex(D, 8, nprobe=3, metric=metric, bits=4, codec=kw.get("codec", "mse"),
                                        rerank=kw.get("rerank", 4), seed=3, device="cpu", originals=where)
    return lambda: tqindex.Index(D, metric=metric, bits=4, codec=kw.get("codec", "prod"), rerank=kw.get("rerank", 4),
                                 seed=3, device="cpu", center=kw.get("center", True), originals=where)


def equal_to_union(kind: str, metric: str, *, train: bool, **kw: Any) -> None:
    """Two adds (the second with an empty part on rank 0), searches with and without rescoring, a filter."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, q = _data(seed=len(metric) + (kind == "ivf"))
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    part = _parts(N, world, 1)
    fac = _factory(kind, metric, **kw)
    sh = tqindex.ShardedIndex(fac)
    ref = fac()
    if train:
        sample = x[:400] if rank == 0 else x[400:800]  # other ranks' samples are ignored
        sh.train(sample)
        ref.train(x[:400])
    first = np.arange(N) < 600
    mine = (part == rank) & first
    sh.add_with_ids(x[mine], ids[mine])
    mine2 = (part == rank) & ~first & (rank != 0)
    sh.add_with_ids(torch.from_numpy(x[mine2]), torch.from_numpy(ids[mine2]))
    kept = first | (part != 0)
    ref.add_with_ids(x[first], ids[first])  # the same two batches: the first sets the centring mean
    ref.add_with_ids(x[kept & ~first], ids[kept & ~first])
    got = sh.search(q if rank == 0 else None, K)
    got0 = sh.search(q, K, rerank=0)
    allowed = ids[::3]
    gotf = sh.search(q, K, filter_ids=allowed if rank == 0 else None)
    big = sh.search(torch.from_numpy(q[:3]), 2000)  # k past every shard: padding
    extra = sh.search(q, K, nprobe=8) if kind == "ivf" else None
    assert len(sh) == len(ref) == int(kept.sum()), (len(sh), len(ref))
    assert sum(np.asarray(dist_sizes(sh))) == len(ref)
    _same(got, ref.search(q, K), "search")
    _same(got0, ref.search(q, K, rerank=0), "rerank 0")
    _same(gotf, ref.search(q, K, filter_ids=allowed), "filter")
    assert isinstance(big[0], torch.Tensor)
    _same((big[0].numpy(), big[1].numpy()), ref.search(q[:3], 2000), "k > n")
    if extra is not None:
        _same(extra, ref.search(q, K, nprobe=8), "nprobe 8")
        assert torch.equal(sh.local.quantizer.centroids, ref.quantizer.centroids)
    else:
        assert (sh.local.mean is None) == (ref.mean is None)
        if ref.mean is not None:
            torch.testing.assert_close(sh.local.mean, ref.mean, rtol=0, atol=1e-6)
    owners = tqindex.sharded.shard_of(sh.local.ids, world)
    assert (owners == rank).all()


def dist_sizes(sh: tqindex.ShardedIndex) -> list[int]:
    t = torch.tensor([len(sh.local)])
    out = [torch.zeros_like(t) for _ in range(sh.world_size)]
    dist.all_gather(out, t)
    return [int(v) for v in out]


def _built(kind: str = "ivf", metric: str = "l2", **kw: Any) -> tuple[tqindex.ShardedIndex, tqindex.Index, np.ndarray,
                                                             np.ndarray, np.ndarray]:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, q = _data(seed=11)
    ids = np.arange(N, dtype=np.int64)
    fac = _factory(kind, metric, **kw)
    sh, ref = tqindex.ShardedIndex(fac), fac()
    sh.train(x[:300])
    ref.train(x[:300])
    part = _parts(N, world, 2)
    sh.add_with_ids(x[part == rank], ids[part == rank])
    ref.add_with_ids(x, ids)
    return sh, ref, x, q, ids


def removal() -> None:
    rank = dist.get_rank()
    for kind, metric, where in (("ivf", "l2", "host"), ("flat", "cosine", "device"), ("ivf", "ip", "device")):
        sh, ref, x, q, ids = _built(kind, metric, originals=where)
        before = sh.search(q, K)  # builds the id -> slot map of device originals, which removal must renew
        gone = ids[::4]
        # rank 0 passes half of them, rank 1 all of them (an id on two ranks is removed once), absent ids too
        mine = gone[: len(gone) // 2] if rank == 0 else gone if rank == 1 else np.array([10**9], dtype=np.int64)
        n = sh.remove_ids(mine)
        n_again = sh.remove_ids(gone[:5] if rank == 0 else [])
        got = sh.search(q, K)
        added = sh.add(x[:5]) if rank == 0 else sh.add(np.zeros((0, D), np.float32))  # sequential ids after N
        after_add = sh.search(q, K)
        assert n == len(gone) and n_again == 0, (n, n_again)
        assert len(sh) == N - len(gone) + 5
        _same(before, ref.search(q, K), f"before removal {kind}")
        ref.remove_ids(gone)
        _same(got, ref.search(q, K), f"after removal {kind}")
        ref.add_with_ids(x[:5], np.arange(N, N + 5))
        _same(after_add, ref.search(q, K), f"after add {kind}")
        if rank == 0:
            assert added.tolist() == list(range(N, N + 5)), added
        else:
            assert added.size == 0


def save_load(tmp: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    sh, ref, x, q, ids = _built("ivf", "cosine")
    path = Path(tmp) / f"sharded-w{world}"
    sh.save(path)
    sh.remove_ids(ids[:100])
    sh.save(path)  # a second generation replaces the first
    back = tqindex.ShardedIndex.load(path)
    got = back.search(q, K)
    back.add_with_ids(x[:1] if rank == 0 else x[:0], [10**6] if rank == 0 else [])
    flat = tqindex.ShardedIndex(_factory("flat", "ip"))
    flat.add_with_ids(x[part_of(ids, rank, world)], ids[part_of(ids, rank, world)])
    fpath = Path(tmp) / f"flat-w{world}"
    flat.save(fpath)
    fback = tqindex.ShardedIndex.load(fpath)
    fgot, fwant = fback.search(q, K), flat.search(q, K)
    ref.remove_ids(ids[:100])
    assert len(back) == N - 99
    _same(got, ref.search(q, K), "loaded")
    _same(fgot, fwant, "flat loaded")
    man = json.loads((path / "manifest.json").read_text())
    assert man["shards"] == world and man["generation"] == 2 and man["n"] == N - 100
    assert sorted(p.name for p in path.iterdir()) == ["g2", "manifest.json"]


def part_of(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    return ids % world == rank


def bad_input(tmp: str) -> None:
    """Bad input on one rank: every rank raises the same type, nothing changes, the group stays usable."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sh, ref, x, q, ids = _built("ivf", "ip")
    last = world - 1
    bad = x[:4].copy()
    bad[2, 1] = np.nan
    e1 = _raises(lambda: sh.add_with_ids(bad if rank == last else x[:0], np.arange(4) + 10**6 if rank == last else []),
                 ValueError, "NaN")
    e2 = _raises(lambda: sh.add_with_ids(x[:2], [10**6 + rank, 10**6 + rank + 1]), ValueError, "duplicate ids")
    e3 = _raises(lambda: sh.add_with_ids(x[:1] if rank == last else x[:0], [5] if rank == last else []),
                 ValueError, "already in the index")
    e4 = _raises(lambda: sh.add_with_ids(x[:, :3] if rank == last else x[:0], ids[:N] if rank == last else []),
                 ValueError, "dimensions")
    e5 = _raises(lambda: sh.search(q, "10" if rank == 0 else 10), TypeError, "k must be an int")
    e6 = _raises(lambda: sh.search(q, K + (rank == last)), ValueError, "search arguments differ")
    e7 = _raises(lambda: sh.remove_ids([-1] if rank == last else []), ValueError, ">= 0")
    e8 = _raises(lambda: sh.train(x[:300]), ValueError, "before the first add")
    e9 = _raises(lambda: sh.search(q[:, :4] if rank == 0 else None, K), ValueError, "dimensions")
    e10 = _raises(lambda: tqindex.ShardedIndex(_factory("ivf", "ip") if rank != last else _factory("ivf", "l2")),
                  ValueError, "different index")
    fresh = tqindex.ShardedIndex(_factory("ivf", "ip"))
    e11 = _raises(lambda: fresh.add_with_ids(x[:3], np.arange(3) + 3 * rank), ValueError, "train()")
    e12 = _raises(lambda: tqindex.ShardedIndex.load(Path(tmp) / "nothing-here"), ValueError, "no manifest.json")
    got = sh.search(q, K)
    assert len(sh) == N
    _same(got, ref.search(q, K), "after refusals")
    for e in (e1, e3, e4, e9, e12):  # the rank that refused is named in the message
        assert e.startswith("rank "), e
    del e2, e5, e6, e7, e8, e10, e11


def wrong_world(tmp: str) -> None:
    """An index saved by a sub-group of world - 1 ranks does not load on world ranks (nor the other way)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sub = dist.new_group(list(range(world - 1)))
    path = Path(tmp) / f"sub-w{world}"
    x, _ = _data(seed=5, n=200)
    if rank < world - 1:
        sh = tqindex.ShardedIndex(_factory("flat", "l2"), group=sub)
        assert sh.world_size == world - 1
        part = np.arange(200) % (world - 1) == rank
        sh.add_with_ids(x[part], np.arange(200)[part])
        sh.save(path)
        back = tqindex.ShardedIndex.load(path, group=sub)
        assert len(back) == 200
    dist.barrier()
    msg = _raises(lambda: tqindex.ShardedIndex.load(path), ValueError, f"holds {world - 1} shards")
    assert f"has {world} ranks" in msg, msg


def adopt_and_fail() -> None:
    """Rank 0's codec and training win when the ranks' bits differ; a failing local search fails everywhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, q = _data(seed=21)

    def factory() -> tqindex.Index:
        ix = tqindex.IVFIndex(D, 8, nprobe=8, metric="l2", bits=4, codec="prod", seed=3, device="cpu")
        ix.train(x[rank * 100 : rank * 100 + 300])  # other centroids on every rank
        ix.codec.rotation.matrix += 1e-7 * rank  # and other rotation bits (as another LAPACK might give)
        return ix

    sh = tqindex.ShardedIndex(factory)
    ref = factory() if rank == 0 else None
    gathered = [torch.zeros(8, D) for _ in range(world)]
    dist.all_gather(gathered, sh.local.quantizer.centroids)
    rot = [torch.zeros(D, D) for _ in range(world)]
    dist.all_gather(rot, sh.local.codec.rotation.matrix.contiguous())
    part = _parts(N, world, 3)
    ids = np.arange(N)
    sh.add_with_ids(x[part == rank], ids[part == rank])
    got = sh.search(q, K)
    empty = sh.search(q[:0], K)
    if rank == world - 1:
        sh.local.search = lambda *a, **kw: (_ for _ in ()).throw(MemoryError("a shard ran out of memory"))
    failed = _raises(lambda: sh.search(q, K), RuntimeError, "local search failed")
    if rank == world - 1:
        del sh.local.search
    again = sh.search(q, K)
    assert all(torch.equal(g, gathered[0]) for g in gathered) and all(torch.equal(r, rot[0]) for r in rot)
    assert f"rank {world - 1} of {world}" in failed, failed
    assert empty[0].shape == (0, K) and empty[1].shape == (0, K)
    _same(got, again, "after a failed search")
    if rank == 0:
        ref.add_with_ids(x, ids)
        _same(got, ref.search(q, K), "adopted")


def nearly_empty() -> None:
    """One vector in all: the other shards are empty (device originals), results padded with -1 / +inf."""
    rank = dist.get_rank()
    x, q = _data(seed=31, n=1)
    for kind in ("flat", "ivf"):
        fac = _factory(kind, "l2", originals="device")
        sh, ref = tqindex.ShardedIndex(fac), fac()
        if kind == "ivf":
            sample = np.concatenate([x, x + 1, x - 1, x * 2, x * 3, x * 4, x * 5, x * 6])
            sh.train(sample if rank == 0 else None)
            ref.train(sample)
        empty = sh.search(q, 3)
        sh.add_with_ids(x if rank == 0 else x[:0], [42] if rank == 0 else [])
        got = sh.search(q, 3)
        ref.add_with_ids(x, [42])
        assert len(sh) == 1 and (np.asarray(empty[1]) == -1).all() and np.isinf(np.asarray(empty[0])).all()
        _same(got, ref.search(q, 3), f"one vector {kind}")


SCENARIOS: dict[str, Callable[[str], None]] = {
    "flat_ip": lambda tmp: equal_to_union("flat", "ip", train=False),
    "flat_cosine": lambda tmp: equal_to_union("flat", "cosine", train=True, codec="mse", originals="device"),
    "flat_l2": lambda tmp: equal_to_union("flat", "l2", train=False, center=False),
    "ivf_ip": lambda tmp: equal_to_union("ivf", "ip", train=True),
    "ivf_cosine": lambda tmp: equal_to_union("ivf", "cosine", train=True, codec="prod"),
    "ivf_l2": lambda tmp: equal_to_union("ivf", "l2", train=True, rerank=2, originals="device"),
    "removal": lambda tmp: removal(),
    "save_load": save_load,
    "bad_input": bad_input,
    "wrong_world": wrong_world,
    "adopt_and_fail": lambda tmp: adopt_and_fail(),
    "nearly_empty": lambda tmp: nearly_empty(),
}


def run(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    """torch.multiprocessing.spawn target: join the gloo group, run ``names``, write the outcomes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results: dict[str, str] = {}
    try:
        for name in names:
            try:
                SCENARIOS[name](out)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()  # realign; a scenario that left a rank behind times out here
    except Exception:
        results["_group"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()

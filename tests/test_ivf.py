"""IVFIndex: the compiled CPU scan equals the reference, exhaustive probing is exact, API edge cases, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_interpreted
import torch
from test_index import _exact, _recall

import tqindex
from tqindex.kernels.ivf_scan import ivf_scan_reference, ivf_topk

GOLDEN = Path(__file__).parent / "golden"


def _clustered(n=3000, d=24, nq=30, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((40, d)).astype(np.float32) * spread
    x = c[rng.integers(0, 40, n)] + rng.standard_normal((n, d)).astype(np.float32)
    q = c[rng.integers(0, 40, nq)] + rng.standard_normal((nq, d)).astype(np.float32)
    return x, q


def _built(metric="l2", codec="mse", bits=4, nlist=32, nprobe=8, n=3000, d=24, spread=3.0, **kw):
    x, q = _clustered(n, d, spread=spread)
    ix = tqindex.IVFIndex(d, nlist, nprobe=nprobe, metric=metric, codec=codec, bits=bits, device="cpu", **kw)
    ix.train(x)
    ix.add(x)
    return ix, x, q


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("codec,bits", [("mse", 2), ("mse", 4), ("mse", 5), ("mse", 8), ("prod", 1), ("prod", 3),
                                        ("prod", 4)])
def test_compiled_scan_topk_equals_topk_of_the_reference(metric, codec, bits):
    ix, x, q = _built(metric, codec, bits)
    ix.remove_ids(np.arange(0, 3000, 4))
    ix._settle()
    allowed = torch.from_numpy(np.random.default_rng(2).random(len(ix)) > 0.3)
    lc, pq = ix._bind(ix._normalise(torch.from_numpy(q)), 8, allowed)
    ref = ivf_scan_reference(lc, pq)
    for m in (1, 40, 5000):  # 5000: more than the probed lists hold, -inf padded
        rv, rc = torch.topk(ref, min(m, ref.shape[1]), dim=1)
        fin = torch.isfinite(rv)
        if m == 5000:  # every probed, allowed code: the whole buffer's finite scores
            assert fin.sum() > 1000 and fin.sum() == torch.isfinite(ref).sum()
        j = (torch.searchsorted(pq.cum, rc, right=True) - 1).clamp(0, 7)
        rslot = lc.offsets[pq.lists.gather(1, j)] + (rc - pq.cum.gather(1, j))
        for impl in ("cpu", "reference"):
            v, slot = ivf_topk(lc, pq, m, impl=impl)
            assert v.shape == rv.shape and slot.shape == rv.shape
            assert torch.equal(torch.isfinite(v), fin)
            torch.testing.assert_close(v[fin], rv[fin], rtol=1e-4, atol=1e-4)
            assert bool((slot[~fin] == 0).all())
            for a, b, f in zip(slot, rslot, fin):  # the same codes (as sets: equal scores may swap places)
                assert set(a[f].tolist()) == set(b[f].tolist())


def test_triton_ivf_scan_matches_reference_interpreter():
    pytest.importorskip("triton")
    script = Path(__file__).parent / "ivf_scan_check.py"
    assert "OK" in run_interpreted(script)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_probing_every_list_with_full_rescoring_is_exact(metric):
    ix, x, q = _built(metric, "prod", 3, nlist=16)
    D, I = ix.search(q, 10, nprobe=16, rerank=300)  # every vector is a candidate, rescored exactly
    De, Ie = _exact(x, q, 10, metric)
    assert _recall(I, Ie) == 1.0
    np.testing.assert_allclose(D, De, rtol=1e-4, atol=1e-3)
    D2, I2 = ix.search(q, 10, nprobe=10_000, rerank=300)  # nprobe above nlist: clamped to every list
    assert (I2 == I).all()


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_recall_grows_with_nprobe(metric):
    ix, x, q = _built(metric, "mse", 4, nlist=32, spread=0.3)  # clusters that overlap: probing matters
    gt = _exact(x, q, 10, metric)[1]
    r = [_recall(ix.search(q, 10, nprobe=p, rerank=4)[1], gt) for p in (1, 4, 32)]
    assert r[0] < r[1] < r[2] and r[2] >= 0.9, r


def test_train_add_order_and_bad_input():
    x, q = _clustered()
    ix = tqindex.IVFIndex(24, 16, device="cpu")
    with pytest.raises(ValueError, match="needs train\\(\\) before add"):
        ix.add(x)
    with pytest.raises(ValueError, match="got 10 vectors for nlist=16"):
        ix.train(x[:10])
    assert not ix.is_trained and len(ix) == 0
    ix.train(x)
    ix.add(x[:100])
    with pytest.raises(ValueError, match="before the first add"):
        ix.train(x)
    with pytest.raises(ValueError, match="has 23 dimensions"):
        ix.search(q[:, :23], 5)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        ix.search(q, 5, nprobe=0)
    with pytest.raises(TypeError, match="does not take 'center'"):
        tqindex.IVFIndex(24, 16, center=True)
    with pytest.raises(ValueError, match="nlist must be"):
        tqindex.IVFIndex(24, 0)
    bad = x[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ix.add(bad)
    assert len(ix) == 100  # nothing changed


def test_types_small_lists_empty_lists_and_padding():
    x, q = _clustered(n=400)
    ix = tqindex.IVFIndex(24, 64, nprobe=2, metric="ip", device="cpu", rerank=2)
    ix.train(x)
    ix.add(x[:5])  # most of the 64 lists stay empty
    assert (ix.list_sizes() == 0).sum() >= 59
    D, I = ix.search(q, 50)  # k far above what two small lists hold: -1 / -inf padding
    assert D.shape == I.shape == (30, 50) and (I[:, -1] == -1).all() and np.isneginf(D[I == -1]).all()
    assert set(I[I >= 0].tolist()) <= set(range(5))
    Dt, It = ix.search(torch.from_numpy(q), 3)
    assert isinstance(Dt, torch.Tensor) and It.dtype == torch.int64
    empty = tqindex.IVFIndex(24, 8, device="cpu")
    empty.train(x)
    D, I = empty.search(q[:2], 4)
    assert (I == -1).all() and np.isneginf(D).all()


def test_removal_filters_upserts_and_ids():
    ix, x, q = _built("l2", "mse", 4, nprobe=32)
    gt = _exact(x, q, 5, "l2")[1]
    gone = gt[:, 0]
    assert ix.remove_ids(gone) == len(set(gone.tolist()))
    D, I = ix.search(q, 5, rerank=8)
    assert not set(gone.tolist()) & set(I.flatten().tolist())
    assert all(i not in ix for i in gone.tolist()) and 1234 in ix or 1234 in gone
    allowed = np.arange(0, 3000, 3)
    _, I = ix.search(q, 10, filter_ids=allowed)
    assert set(I[I >= 0].tolist()) <= set(allowed.tolist()) and (I >= 0).all()
    ix.add_with_ids(x[:2] + 100, [10_000, 10_001])  # far away: their own answers
    _, I = ix.search(x[:2] + 100, 1)
    assert I[:, 0].tolist() == [10_000, 10_001]
    np.testing.assert_allclose(ix.reconstruct_batch([10_000]), x[:1] + 100, rtol=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_save_load_identity(tmp_path, keep):
    ix, x, q = _built("cosine", "prod", 4, keep_originals=keep, rerank=4 if keep else 0)
    ix.search(q, 1)
    ix.remove_ids([3, 4, 5])
    ix.add_with_ids(x[:7] * 2, np.arange(5000, 5007))
    ix.save(tmp_path / "ivf")  # saved with its lists out of order (reordered on save)
    D, I = ix.search(q, 10)
    for loaded in (tqindex.load(tmp_path / "ivf"), tqindex.IVFIndex.load(tmp_path / "ivf", mmap=True)):
        assert isinstance(loaded, tqindex.IVFIndex) and len(loaded) == len(ix) and loaded.nprobe == ix.nprobe
        D2, I2 = loaded.search(q, 10)
        assert (I2 == I).all()
        np.testing.assert_allclose(D2, D, rtol=1e-6, atol=1e-6)
    if not keep:
        np.testing.assert_allclose(loaded.reconstruct_batch([0]), ix.reconstruct_batch([0]), rtol=1e-5, atol=1e-6)


def test_memory_usage_counts_codes_and_lists():
    ix, x, q = _built("ip", "mse", 4)
    m = ix.memory_usage()
    assert m["codes"] == len(ix) * ix.code_size and m["lists"] >= len(ix) * 8 + 32 * 24 * 4
    assert m["total"] == m["codes"] + m["originals"] + m["ids"] + m["lists"]


def _golden_index():
    x, q = _clustered(n=200, d=12, nq=6, seed=3)
    ix = tqindex.IVFIndex(12, 8, nprobe=3, metric="l2", codec="prod", bits=3, device="cpu", rerank=2, seed=5)
    ix.train(x)
    ix.add_with_ids(x, np.arange(200) * 3 + 1)
    ix.remove_ids([4, 7])
    return ix, q


@pytest.mark.parametrize("kind", ["ivf_v2", "index_v2"])
def test_golden_format_v2_loads_forever(kind):
    """Written once by `python tests/test_ivf.py` (format version 2): must load and answer identically."""
    path = GOLDEN / kind
    expected = json.loads((path / "expected.json").read_text())
    ix = tqindex.load(path, device="cpu")
    assert type(ix).__name__ == expected["class"] and len(ix) == expected["n"]
    q = np.asarray(expected["queries"], dtype=np.float32)
    D, I = ix.search(q, expected["k"])
    assert I.tolist() == expected["I"]
    np.testing.assert_allclose(D, np.asarray(expected["D"]), rtol=1e-5, atol=1e-5)
    assert ix.search(q, expected["k"], rerank=0)[1].tolist() == expected["I_codes"]


@pytest.mark.gpu
@pytest.mark.parametrize("metric,codec", [("l2", "mse"), ("cosine", "prod"), ("ip", "mse")])
def test_ivf_cuda_matches_cpu(metric, codec):
    x, q = _clustered(n=20000, d=64, nq=64)
    res = {}
    for dev in ("cpu", "cuda"):
        ix = tqindex.IVFIndex(64, 64, nprobe=8, metric=metric, codec=codec, bits=4, device=dev, rerank=4)
        ix.train(x) if dev == "cpu" else None
        if dev == "cuda":
            ix.quantizer.set_centroids(res["cpu"][2])
            ix._set_rotated_centroids()
        ix.add(x)
        D, I = ix.search(q, 10)
        res[dev] = (D, I, ix.quantizer.centroids.cpu())
    assert _recall(res["cuda"][1], res["cpu"][1]) >= 0.99
    np.testing.assert_allclose(np.sort(res["cuda"][0], 1), np.sort(res["cpu"][0], 1), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("metric,rr", [("cosine", 4), ("l2", 0), ("ip", 2)])
def test_cuda_graph_replay_equals_plain_launches(metric, rr):
    from tqindex.kernels.ivf_scan import _use_groups

    x, q = _clustered(n=20000, d=64, nq=160)
    assert _use_groups(160 * 16, 64, 64) and not _use_groups(8 * 16, 64, 64)  # both pass-1 kernels run below
    res = {}
    for graphs in (True, False):
        ix = tqindex.IVFIndex(64, 64, nprobe=8, metric=metric, codec="prod", bits=4, device="cuda", rerank=rr,
                              originals="device", cuda_graphs=graphs, seed=3)
        ix.train(x)
        ix.add(x[:15000])
        out = [ix.search(q[:1], 10), ix.search(q[:1], 10), ix.search(q[:8], 5, nprobe=16), ix.search(q, 5, nprobe=16)]
        ix.add(x[15000:])  # graphs captured before must not read the old arrays
        out.append(ix.search(q[:1], 10))
        ix.remove_ids(np.arange(0, 20000, 3))
        out.append(ix.search(q[:8], 5, nprobe=16))
        out.append(ix.search(q, 5, nprobe=16))
        res[graphs] = out
        if graphs:  # the graph path really ran, for every shape (the grouped scan's too)
            assert (160, 5, rr, 16) in ix._graphs and (8, 5, rr, 16) in ix._graphs and not ix._graphs_failed
    for (Dg, Ig), (Dp, Ip) in zip(res[True], res[False]):
        assert (Ig == Ip).all()
        np.testing.assert_allclose(Dg, Dp, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":  # writes the golden files (once; committed)
    for kind in ("ivf_v2", "index_v2"):
        ix, q = _golden_index()
        if kind == "index_v2":
            x, _ = _clustered(n=200, d=12, nq=6, seed=3)
            ix = tqindex.Index(12, metric="ip", codec="mse", bits=4, device="cpu", rerank=3, seed=2)
            ix.add_with_ids(x, np.arange(200) + 10)
        path = GOLDEN / kind
        ix.save(path)
        D, I = ix.search(q, 5)
        _, I0 = ix.search(q, 5, rerank=0)
        (path / "expected.json").write_text(json.dumps({
            "class": type(ix).__name__, "n": len(ix), "k": 5, "queries": q.tolist(), "D": D.tolist(),
            "I": I.tolist(), "I_codes": I0.tolist()}, indent=1))
        print("wrote", path)


def test_spherical_lists_go_by_cosine_to_the_centroid(tmp_path):
    """lists="spherical": assignment and probing use <x, c> / ||c|| (spherical k-means), not the euclidean
    distance; "auto" picks it for cosine from 512 dimensions; other metrics refuse it."""
    assert tqindex.IVFIndex(512, 4, metric="cosine").quantizer.spherical
    assert not tqindex.IVFIndex(511, 4, metric="cosine").quantizer.spherical
    assert not tqindex.IVFIndex(512, 4, metric="ip").quantizer.spherical
    with pytest.raises(ValueError, match="spherical.*cosine"):
        tqindex.IVFIndex(16, 4, metric="l2", lists="spherical")
    with pytest.raises(ValueError, match="lists must be one of"):
        tqindex.IVFIndex(16, 4, lists="round")
    ix, x, q = _built("cosine", "mse", 4, lists="spherical")
    ix.save(tmp_path / "s.tqi")
    back = tqindex.load(tmp_path / "s.tqi")
    assert back.lists == "spherical" and back.quantizer.spherical
    c = ix.quantizer.centroids
    cu = c / c.norm(dim=1, keepdim=True)
    xn = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    qn = torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))
    assert torch.equal(ix.quantizer.assign(xn), (xn @ cu.T).argmax(1))
    lists, bias = ix.quantizer.probe(qn, 5)
    assert torch.equal(lists, (qn @ cu.T).topk(5, dim=1).indices)
    torch.testing.assert_close(bias, (qn @ c.T).gather(1, lists))  # the exact part stays <q, c>
    l2_lists = (2 * qn @ c.T - (c * c).sum(1)).topk(5, dim=1).indices
    assert not torch.equal(lists, l2_lists)  # the rules differ on this data
    assert np.array_equal(back.search(q, 5)[1], ix.search(q, 5)[1])
    eu, _, _ = _built("cosine", "mse", 4)  # 24 dims: "auto" is euclidean
    assert torch.equal(eu.quantizer.probe(qn, 5)[0], (2 * qn @ eu.quantizer.centroids.T
                                                      - (eu.quantizer.centroids ** 2).sum(1)).topk(5, dim=1).indices)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_compiled_scan_odd_dim_4bit(metric):
    """25 dims at 4 bits: the last byte holds one coordinate (its padding nibble must not be read); the
    compiled top m equals the reference's."""
    ix, x, q = _built(metric, "mse", 4, d=25)
    ix._settle()
    lc, pq = ix._bind(ix._normalise(torch.from_numpy(q)), 8, None)
    v, slot = ivf_topk(lc, pq, 40, impl="cpu")
    rv, rslot = ivf_topk(lc, pq, 40, impl="reference")
    torch.testing.assert_close(v, rv, rtol=1e-4, atol=1e-4)
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(slot, rslot))

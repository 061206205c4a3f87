"""Tests of tqindex.Index: search contract, ids, removal, filters, rescoring, save/load, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_interpreted
import torch

from tqindex import Index

GOLDEN = Path(__file__).parent / "golden" / "index_v1"


def _data(n: int = 3000, d: int = 32, nq: int = 40, shift: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) + shift
    q = rng.standard_normal((nq, d)).astype(np.float32) + shift
    return x, q


def _exact(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
        i = np.argsort(d, axis=1)[:, :k]
        return np.take_along_axis(d, i, 1), i
    s = q @ x.T
    i = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, i, 1), i


def _recall(i: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(i, gt)]))


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("codec", ["prod", "mse"])
def test_recall_and_exact_scores_with_rescoring(metric: str, codec: str) -> None:
    x, q = _data(shift=1.0)
    idx = Index(32, metric=metric, bits=4, codec=codec, rerank=8, device="cpu")
    ids = idx.add(x)
    assert np.array_equal(ids, np.arange(len(x)))
    D, I = idx.search(q, 10)
    gD, gI = _exact(x, q, 10, metric)
    assert D.shape == I.shape == (len(q), 10) and D.dtype == np.float32 and I.dtype == np.int64
    assert _recall(I, gI) >= 0.95
    # Rescored distances are exact for the ids returned.
    Dx, _ = _exact(x, q, len(x), metric)
    full = q @ x.T if metric == "ip" else None
    if full is not None:
        np.testing.assert_allclose(D, np.take_along_axis(full, I, 1), rtol=1e-4, atol=1e-4)
    # Sorted best-first.
    assert np.all(np.diff(D, axis=1) <= 1e-6) if metric != "l2" else np.all(np.diff(D, axis=1) >= -1e-6)


def test_codes_only_recall_and_centering_helps_off_centre_data() -> None:
    x, q = _data(shift=3.0)
    _, gI = _exact(x, q, 10, "l2")
    r = {}
    for center in (False, True):
        idx = Index(32, metric="l2", bits=4, codec="mse", rerank=0, center=center, device="cpu")
        idx.add(x)
        r[center] = _recall(idx.search(q, 10)[1], gI)
    assert r[True] > r[False] + 0.2
    assert r[True] >= 0.6


def test_estimated_scores_approximate_true_ones() -> None:
    x, q = _data(shift=0.5)
    idx = Index(32, metric="ip", bits=6, codec="prod", rerank=0, device="cpu")
    idx.add(x)
    D, I = idx.search(q, 5)
    true = np.take_along_axis(q @ x.T, I, 1)
    assert np.abs(D - true).mean() < 0.1 * np.abs(true).mean()


def test_padding_when_fewer_than_k() -> None:
    x, q = _data(n=5)
    for metric, pad in (("ip", -np.inf), ("l2", np.inf)):
        idx = Index(32, metric=metric, bits=3, device="cpu")
        idx.add(x)
        D, I = idx.search(q[:3], 8)
        assert (I[:, 5:] == -1).all() and np.all(D[:, 5:] == pad)
        assert sorted(I[0, :5].tolist()) == list(range(5))
    empty = Index(32, device="cpu")
    D, I = empty.search(q[:2], 3)
    assert (I == -1).all() and np.isneginf(D).all()


def test_ids_remove_contains_len_and_filter() -> None:
    x, q = _data(n=500)
    idx = Index(32, metric="ip", bits=4, device="cpu")
    ids = np.arange(1000, 1500, dtype=np.int64)
    idx.add_with_ids(x, ids)
    assert len(idx) == 500 and 1000 in idx and 5 not in idx and "a" not in idx
    with pytest.raises(ValueError, match="already in the index"):
        idx.add_with_ids(x[:2], np.array([1000, 7]))
    assert len(idx) == 500 and 7 not in idx  # nothing half-done
    with pytest.raises(ValueError, match="duplicate ids"):
        idx.add_with_ids(x[:2], np.array([3, 3]))
    with pytest.raises(ValueError, match="one id per vector"):
        idx.add_with_ids(x[:2], np.array([3]))
    with pytest.raises(ValueError, match=">= 0"):
        idx.add_with_ids(x[:1], np.array([-5]))
    _, I = idx.search(q, 3)
    top = int(I[0, 0])
    assert idx.remove_ids(np.array([top, 99999])) == 1
    assert len(idx) == 499 and top not in idx
    _, I2 = idx.search(q, 3)
    assert top not in I2[0]
    assert idx.remove_ids([]) == 0
    # sequential ids continue after the largest id
    new = idx.add(x[:2])
    assert new.tolist() == [1500, 1501]
    # filter: only allowed ids come back, and k of them when k match
    allowed = np.arange(1000, 1500, 3)
    _, If = idx.search(q, 10, filter_ids=allowed)
    valid = If[If >= 0]
    assert np.isin(valid, allowed).all() and (If >= 0).all()
    _, If2 = idx.search(q, 10, filter_ids=np.array([1001, 1004]))
    assert set(If2[0, :2].tolist()) == {1001, 1004} and (If2[:, 2:] == -1).all()
    np.testing.assert_allclose(idx.reconstruct_batch(np.array([1001])), x[1:2])


def test_torch_in_torch_out_and_memory_usage() -> None:
    x, q = _data(n=300)
    idx = Index(32, metric="cosine", bits=3, codec="prod", rerank=2, device="cpu")
    ids = idx.add(torch.from_numpy(x))
    assert isinstance(ids, torch.Tensor)
    D, I = idx.search(torch.from_numpy(q), 4)
    assert isinstance(D, torch.Tensor) and isinstance(I, torch.Tensor) and I.dtype == torch.int64
    mu = idx.memory_usage()
    assert mu["codes"] == 300 * idx.code_size == 300 * (idx.codec.mse_bytes + idx.codec.qjl_bytes + 8)
    assert mu["originals"] == 300 * 32 * 4 and mu["ids"] == 300 * 8
    assert mu["total"] == mu["codes"] + mu["originals"] + mu["ids"]


def test_keep_originals_false_requires_rerank_zero() -> None:
    with pytest.raises(ValueError, match="keep_originals=False"):
        Index(16, keep_originals=False, rerank=4)
    x, q = _data(n=200, d=16)
    idx = Index(16, keep_originals=False, rerank=0, device="cpu")
    idx.add(x)
    assert idx.memory_usage()["originals"] == 0
    with pytest.raises(ValueError, match="needs the original vectors"):
        idx.search(q, 3, rerank=2)
    assert idx.search(q, 3)[1].shape == (len(q), 3)


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (np.zeros((3, 31), np.float32), ValueError, "31 dimensions, but this codec expects 32"),
        (np.zeros(32, np.float32), ValueError, "2-D"),
        (np.zeros((2, 3, 32), np.float32), ValueError, "2-D"),
        (np.zeros((3, 32), np.int32), TypeError, "float"),
        (np.full((3, 32), np.nan, np.float32), ValueError, "NaN or Inf"),
        ([[0.0] * 32], TypeError, "numpy.ndarray or torch.Tensor"),
    ],
)
def test_bad_vectors_change_nothing(bad: object, exc: type, msg: str) -> None:
    x, q = _data(n=50)
    idx = Index(32, device="cpu")
    idx.add(x)
    with pytest.raises(exc, match=msg):
        idx.add(bad)
    with pytest.raises(exc, match=msg):
        idx.search(bad, 3)
    assert len(idx) == 50


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="metric"):
        Index(8, metric="dot")
    with pytest.raises(ValueError, match="codec"):
        Index(8, codec="pq")
    with pytest.raises(ValueError, match="bits"):
        Index(8, codec="mse", bits=9)
    idx = Index(8, device="cpu")
    idx.add(np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        idx.search(np.ones((1, 8), np.float32), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        idx.search(np.ones((1, 8), np.float32), 2.5)
    with pytest.raises(TypeError, match="ids must"):
        idx.add_with_ids(np.ones((1, 8), np.float32), np.array([1.5]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_save_load_round_trip_identical(tmp_path: Path, metric: str) -> None:
    x, q = _data(n=400)
    idx = Index(32, metric=metric, bits=3, codec="prod", rerank=2, device="cpu")
    idx.add_with_ids(x, np.arange(400) * 3)
    idx.remove_ids(np.arange(0, 60, 3))
    D, I = idx.search(q, 7)
    D0, I0 = idx.search(q, 7, rerank=0)
    idx.save(tmp_path / "ix")
    idx.save(tmp_path / "ix")  # a second save replaces the first generation atomically
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if p.name.startswith("g1.")) == []
    for mmap in (False, True):
        j = Index.load(tmp_path / "ix", device="cpu", mmap=mmap)
        D2, I2 = j.search(q, 7)
        assert np.array_equal(I, I2) and np.array_equal(D, D2)
        D3, I3 = j.search(q, 7, rerank=0)
        assert np.array_equal(I0, I3) and np.array_equal(D0, D3)
        assert len(j) == len(idx) and j.config() == idx.config()
    j.add(x[:3])  # a loaded (memory-mapped) index stays writable
    assert len(j) == len(idx) + 3


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        Index.load(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="manifest.json"):
        Index.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"format": "tqindex.Index", "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        Index.load(tmp_path / "d")


def test_golden_format_v1_loads_forever() -> None:
    """A version-1 index written by tests/golden/make_golden.py must load and search identically."""
    expected = json.loads((GOLDEN / "expected.json").read_text())
    idx = Index.load(GOLDEN, device="cpu")
    q = np.asarray(expected["queries"], dtype=np.float32)
    D, I = idx.search(q, expected["k"])
    assert I.tolist() == expected["I"]
    np.testing.assert_allclose(D, np.asarray(expected["D"]), rtol=1e-5, atol=1e-5)
    D0, I0 = idx.search(q, expected["k"], rerank=0)
    assert I0.tolist() == expected["I_codes"]


def test_triton_scan_matches_reference_interpreter() -> None:
    """The fused scan+top-k kernel equals the torch reference (Triton interpreter on the CPU)."""
    pytest.importorskip("triton")
    script = Path(__file__).parent / "scan_topk_check.py"
    assert "OK" in run_interpreted(script)


@pytest.mark.gpu
def test_index_cuda_matches_cpu() -> None:
    x, q = _data(n=20000, d=64, nq=100, shift=0.5)
    res = {}
    for dev in ("cpu", "cuda"):
        idx = Index(64, metric="ip", bits=4, codec="prod", rerank=4, device=dev)
        idx.add(x)
        res[dev] = idx.search(q, 10)
    assert _recall(res["cuda"][1], res["cpu"][1]) >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("scan", ["fused", "gemm"])
@pytest.mark.parametrize("codec,metric,bits", [("mse", "l2", 8), ("prod", "ip", 3), ("mse", "cosine", 2)])
def test_cuda_scans_match_cpu_codes_only(scan: str, codec: str, metric: str, bits: int) -> None:
    x, q = _data(n=30000, d=200, nq=64, shift=0.5)
    keep = np.arange(0, 30000, 3)
    out = {}
    for dev in ("cpu", "cuda"):
        idx = Index(200, metric=metric, bits=bits, codec=codec, rerank=0, device=dev, scan=scan, block_size=8192)
        idx.add(x)
        out[dev] = idx.search(q, 20), idx.search(q, 20, filter_ids=keep)
    for (Dc, Ic), (Dg, Ig) in zip(out["cpu"], out["cuda"]):
        assert _recall(Ig, Ic) >= 0.99
        np.testing.assert_allclose(Dg, Dc, rtol=1e-3, atol=1e-3 * np.abs(Dc).max())
    assert np.isin(out["cuda"][1][1], keep).all()


def test_originals_on_device_same_results(tmp_path: Path) -> None:
    x, q = _data(n=400)
    a = Index(32, metric="l2", bits=3, rerank=4, device="cpu")
    b = Index(32, metric="l2", bits=3, rerank=4, device="cpu", originals="device")
    for ix in (a, b):
        ix.add(x)
        ix.remove_ids(np.arange(0, 400, 5))
    Da, Ia = a.search(q, 5)
    Db, Ib = b.search(q, 5)
    assert np.array_equal(Ia, Ib) and np.allclose(Da, Db)
    b.save(tmp_path / "b")
    c = Index.load(tmp_path / "b", device="cpu")
    assert c.originals == "device" and np.array_equal(c.search(q, 5)[1], Ib)
    np.testing.assert_allclose(b.reconstruct_batch(np.array([1])), x[1:2])

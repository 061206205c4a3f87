"""Tests for bench.datasets: file-format round trips on tiny synthetic files, clear errors, ground truth."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from bench import datasets as ds


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_fvecs_round_trip(tmp_path: Path) -> None:
    x = _rng().standard_normal((7, 5)).astype(np.float32)
    p = tmp_path / "a.fvecs"
    ds.write_fvecs(p, x)
    assert p.stat().st_size == 7 * (4 + 5 * 4)
    y = ds.read_fvecs(p)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_array_equal(x, y)


def test_ivecs_round_trip(tmp_path: Path) -> None:
    x = _rng().integers(-(2**31), 2**31 - 1, size=(4, 3)).astype(np.int32)
    p = tmp_path / "a.ivecs"
    ds.write_ivecs(p, x)
    np.testing.assert_array_equal(ds.read_ivecs(p), x)


def test_bvecs_read(tmp_path: Path) -> None:
    x = _rng().integers(0, 256, size=(3, 6)).astype(np.uint8)
    raw = b"".join(struct.pack("<i", 6) + row.tobytes() for row in x)
    p = tmp_path / "a.bvecs"
    p.write_bytes(raw)
    np.testing.assert_array_equal(ds.read_bvecs(p), x)


def test_fvecs_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.fvecs"
    ds.write_fvecs(p, np.ones((3, 4), np.float32))
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match="not a multiple of the record size"):
        ds.read_fvecs(p)


def test_fvecs_inconsistent_dims(tmp_path: Path) -> None:
    p = tmp_path / "mixed.fvecs"
    rec = struct.pack("<i", 2) + np.ones(2, np.float32).tobytes()
    bad = struct.pack("<i", 3) + np.ones(2, np.float32).tobytes()  # same length, wrong dimension field
    p.write_bytes(rec + bad)
    with pytest.raises(ValueError, match="record 1 has dimension 3, expected 2"):
        ds.read_fvecs(p)


def test_fvecs_garbage_dimension(tmp_path: Path) -> None:
    p = tmp_path / "garbage.fvecs"
    p.write_bytes(struct.pack("<i", -5) + b"\0" * 16)
    with pytest.raises(ValueError, match="first dimension field is -5"):
        ds.read_fvecs(p)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ds.read_fvecs("/nonexistent/x.fvecs")


def test_hdf5_round_trip(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    rng = _rng()
    train = rng.standard_normal((50, 8)).astype(np.float32)
    test = rng.standard_normal((5, 8)).astype(np.float32)
    D, I = ds.exact_knn(train, test, 10, "cosine")
    p = tmp_path / "toy-8-angular.hdf5"
    with h5py.File(p, "w") as f:
        f.attrs["distance"] = "angular"
        f["train"], f["test"], f["neighbors"], f["distances"] = train, test, I, 1 - D
    d = ds.load_ann_hdf5(p)
    assert d.metric == "cosine" and d.name == "toy-8-angular"
    np.testing.assert_array_equal(d.base, train)
    np.testing.assert_array_equal(d.queries, test)
    np.testing.assert_array_equal(d.neighbors, I)
    assert ds.load_dataset(str(p)).metric == "cosine"


def test_hdf5_errors(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "nodist.hdf5"
    with h5py.File(p, "w") as f:
        f["train"], f["test"] = np.ones((3, 2), np.float32), np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match="no 'distance' attribute"):
        ds.load_ann_hdf5(p)
    assert ds.load_ann_hdf5(p, metric="l2").metric == "l2"
    q = tmp_path / "notrain.hdf5"
    with h5py.File(q, "w") as f:
        f["test"] = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"lacks datasets \['train'\]"):
        ds.load_ann_hdf5(q, metric="l2")
    r = tmp_path / "text.hdf5"
    r.write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        ds.load_ann_hdf5(r)


def test_texmex_set_via_load_dataset(tmp_path: Path) -> None:
    rng = _rng()
    base, query = rng.standard_normal((30, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    _, I = ds.exact_knn(base, query, 5, "l2")
    ds.write_fvecs(tmp_path / "toy_base.fvecs", base)
    ds.write_fvecs(tmp_path / "toy_query.fvecs", query)
    ds.write_ivecs(tmp_path / "toy_groundtruth.ivecs", I)
    d = ds.load_dataset(str(tmp_path / "toy_base.fvecs"))
    assert d.metric == "l2" and d.base.shape == (30, 4) and d.queries.shape == (3, 4)
    np.testing.assert_array_equal(d.neighbors, I)


def test_npy_loader_draws_and_removes_queries(tmp_path: Path) -> None:
    x = np.asfortranarray(_rng().standard_normal((100, 6)).astype(np.float32))
    p = tmp_path / "v.npy"
    np.save(p, x)
    d = ds.load_npy(p, n_queries=10, seed=3, metric="ip")
    assert d.base.shape == (90, 6) and d.queries.shape == (10, 6) and d.base.flags.c_contiguous
    again = ds.load_npy(p, n_queries=10, seed=3, metric="ip")
    np.testing.assert_array_equal(d.queries, again.queries)
    rows = {r.tobytes() for r in x}
    assert {r.tobytes() for r in d.queries} <= rows
    assert not ({r.tobytes() for r in d.queries} & {r.tobytes() for r in d.base})
    bad = tmp_path / "v3.npy"
    np.save(bad, np.ones((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\), expected 2-D"):
        ds.load_npy(bad)


def test_unknown_dataset_and_bad_metric() -> None:
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        ds.load_dataset("nope")
    with pytest.raises(ValueError, match="metric must be one of"):
        ds.Dataset("x", np.ones((2, 2)), np.ones((1, 2)), "hamming")
    with pytest.raises(ValueError, match="queries have 3 dimensions, but the base vectors have 2"):
        ds.Dataset("x", np.ones((2, 2)), np.ones((1, 3)), "l2")


def _write_idx(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + a.astype(np.uint8).tobytes())


def test_idx_and_fashion_mnist_layout(tmp_path: Path) -> None:
    rng = _rng()
    train = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
    test = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    np.testing.assert_array_equal(ds.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), train)
    d = ds.load_fashion_mnist(tmp_path)
    assert d.metric == "l2" and d.base.dtype == np.float32 and d.base.shape == (20, 784)
    np.testing.assert_array_equal(d.queries, test.reshape(4, -1).astype(np.float32))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ds.load_fashion_mnist(tmp_path / "empty")


def test_idx_bad_magic(tmp_path: Path) -> None:
    p = tmp_path / "x.idx"
    p.write_bytes(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        ds.read_idx(p)


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_exact_knn_matches_numpy(metric: str) -> None:
    rng = _rng()
    base, q = rng.standard_normal((200, 7)).astype(np.float32), rng.standard_normal((9, 7)).astype(np.float32)
    D, I = ds.exact_knn(base, q, 5, metric)
    if metric == "l2":
        s = -((q[:, None, :] - base[None]) ** 2).sum(-1)
    elif metric == "cosine":
        s = ds.normalize(q) @ ds.normalize(base).T
    else:
        s = q @ base.T
    ref = np.argsort(-s, axis=1)[:, :5]
    np.testing.assert_array_equal(I, ref)
    got = -D if metric == "l2" else D
    np.testing.assert_allclose(got, np.take_along_axis(s, ref, 1), rtol=1e-4, atol=1e-4)


def test_ground_truth_is_cached(tmp_path: Path) -> None:
    rng = _rng()
    d = ds.Dataset("toy", rng.standard_normal((100, 4)), rng.standard_normal((6, 4)), "l2")
    D1, I1 = ds.ground_truth(d, k=8, cache_dir=tmp_path)
    files = list(tmp_path.glob("gt_toy_*.npz"))
    assert len(files) == 1 and I1.shape == (6, 8)
    D2, I2 = ds.ground_truth(d, k=8, cache_dir=tmp_path)
    np.testing.assert_array_equal(I1, I2)
    sub = d.subset_queries(3, seed=0)
    assert sub.queries.shape == (3, 4)
    ds.ground_truth(sub, k=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("gt_toy_*.npz"))) == 2  # another query set, another cache entry


def test_glove_path_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOVE50_NPY", str(tmp_path / "absent.npy"))
    with pytest.raises(FileNotFoundError, match="GLOVE50_NPY"):
        ds.load_glove50()
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((10, 50), np.float32))
    monkeypatch.setenv("GLOVE50_NPY", str(small))
    with pytest.raises(ValueError, match=r"\(400000, 50\)"):
        ds.load_glove50()

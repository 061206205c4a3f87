"""Tests for bench.recall: metrics, exact rescoring, FAISS factory strings and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import recall
from bench.datasets import exact_knn


def test_recall_1_at_k() -> None:
    gt = np.array([[5, 1], [7, 2], [9, 3]])
    I = np.array([[5, 0, 1], [0, 7, 1], [0, 1, 2]])
    assert recall.recall_1_at_k(I, gt, ks=[1, 2, 3]) == pytest.approx([1 / 3, 2 / 3, 2 / 3])


def test_k_recall_at_k_ignores_padding() -> None:
    gt = np.array([[1, 2, 3, 4]])
    assert recall.k_recall_at_k(np.array([[4, 3, -1, 9]]), gt, k=4) == pytest.approx(0.5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rescore_is_exact_top_k(metric: str) -> None:
    rng = np.random.default_rng(0)
    base, q = rng.standard_normal((300, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    _, I = exact_knn(base, q, 20, metric)
    cand = I[:, ::-1].copy()  # true top 20, worst first
    cand[:, 0] = -1  # padding must never win
    _, I10 = exact_knn(base, q, 10, metric)
    got = recall.rescore(cand, base, q, metric, 10)
    np.testing.assert_array_equal(got, I10)


def test_faiss_specs_build_with_matching_code_sizes() -> None:
    faiss = pytest.importorskip("faiss")
    d = 50
    specs = recall.faiss_specs(d, "cosine", budgets=[17, 22], quick=True)
    factories = {s.factory for s in specs}
    assert {"Flat", "RR51,PQ17x8", "RR66,PQ22x8", "RR68,PQ34x4fs", "SQ8", "RaBitQ4", "EDEN2", "RR,SQtq4"} <= factories
    assert any("SQtqmse" in f for f in factories)
    assert not any("SQtqmse" in s.factory for s in recall.faiss_specs(d, "l2", [17], quick=True))
    for s in specs:
        index = faiss.index_factory(d, s.factory, faiss.METRIC_INNER_PRODUCT)
        if s.family == "faiss PQ x8":
            assert index.sa_code_size() == int(s.factory.split("PQ")[1].split("x")[0])


def test_end_to_end_tiny(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    pytest.importorskip("tqindex.index")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1500, 16)).astype(np.float32)
    np.save(tmp_path / "tiny.npy", x)
    out = tmp_path / "out"
    rc = recall.main([
        "--dataset", str(tmp_path / "tiny.npy"), "--metric", "cosine", "--quick", "--queries", "40",
        "--faiss-only", "SQ8", "RaBitQ4", "--out-dir", str(out), "--name", "t",
    ])
    assert rc == 0
    data = json.loads((out / "t.json").read_text())
    assert data["dataset"]["queries"] == 40 and data["dataset"]["metric"] == "cosine"
    rows = data["rows"]
    flat = [r for r in rows if r["method"] == "Flat" and r["rerank"] == 0][0]
    assert flat["recall10_at10"] == pytest.approx(1.0) and flat["recall_1_at_k"][0] == pytest.approx(1.0)
    assert flat["bytes_per_vector"] == 16 * 4
    tq = {(r["method"], r["rerank"]): r for r in rows if r["engine"] == "tqindex"}
    assert tq[("tqindex mse 8b", 0)]["recall10_at10"] > 0.85
    for (method, rr), r in tq.items():
        assert r["bytes_measured"] == r["bytes_per_vector"]  # memory_usage agrees with code_size
        if rr == recall.MEASURED_RERANK:  # Index.search(rerank=4) == exact rescoring of its top 40
            assert r["rerank_source"] == "measured"
            assert r["recall10_at10"] == pytest.approx(r["derived_recall10_at10"], abs=0.03)
    assert tq[("tqindex prod 2b", 0)]["bytes_per_vector"] == 2 + 2 + 8  # 1-bit idx + QJL signs + 2 floats
    assert tq[("tqindex mse 4b", 0)]["bytes_per_vector"] == 8 + 4
    for r in rows:
        if r["engine"] == "faiss":
            assert r["bytes_measured"] >= r["bytes_per_vector"]
        assert len(r.get("recall_1_at_k") or recall.KS) == len(recall.KS)
    md = (out / "t.md").read_text()
    assert "Headline" in md and "tqindex mse 8b" in md
    assert (out / "t_bytes.png").stat().st_size > 1000 and (out / "t_recall1k.png").stat().st_size > 1000


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        recall.main(["--quick", "--full"])
    with pytest.raises(SystemExit):
        recall.main(["--device", "tpu"])
    assert "--device must be cpu or cuda, got 'tpu'" in capsys.readouterr().err


def test_merge_keeps_other_engines_rows(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    pytest.importorskip("tqindex.index")
    x = np.random.default_rng(3).standard_normal((800, 8)).astype(np.float32)
    np.save(tmp_path / "m.npy", x)
    common = ["--dataset", str(tmp_path / "m.npy"), "--quick", "--queries", "20", "--bits", "4",
              "--out-dir", str(tmp_path), "--name", "m"]
    assert recall.main(common + ["--faiss-only", "SQ8"]) == 0
    assert recall.main(common + ["--no-faiss", "--merge"]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"tqindex mse 4b", "Flat", "SQ8"} <= methods
    assert "Merged: rows of faiss kept" in data["notes"]
    with pytest.raises(ValueError, match="cannot merge .* with 20 queries"):
        recall.main([a if a != "20" else "10" for a in common] + ["--no-faiss", "--merge"])

"""The KV benchmarks' CPU paths run: a prefill chunk over codes (bench.kv_speed --chunk) and one generate() row."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def test_kv_speed_chunk_rows_on_cpu() -> None:
    from bench.kv_speed import run_chunks

    rows = run_chunks([320], [1], ["tq4", "tq2.5"], 64, torch.device("cpu"), rep_ms=1)
    assert len(rows) == 1 and rows[0]["chunk"] == 64 and rows[0]["tq4_ms"] > 0 and rows[0]["tq2.5_ms"] > 0


def test_kv_generate_one_row_on_cpu() -> None:
    import argparse

    from bench.kv_generate import run_one

    args = argparse.Namespace(model="gemma3-tiny", context=300, batch=1, cache="tq4/4", variant="after", chunk=128,
                              new_tokens=3, device="cpu", threads=1)
    row = run_one(args)
    assert row["new_tokens"] == 3 and row["peak_mb"] >= 0 and row["kv_mb"] > 0


def test_kv_generate_merges_interleaved_repeats() -> None:
    from bench.kv_generate import merge_repeats

    key = dict(model="m", variant="after", context=8, batch=1, chunk=None)
    rows = [dict(key, cache=c, tpot_ms=t, prefill_s=p, peak_mb=m)
            for c, t, p, m in [("a", 3.0, 1.0, 10), ("b", 5.0, 2.0, 20), ("a", 1.0, 3.0, 12), ("b", 7.0, 2.0, 20),
                               ("a", 2.0, 2.0, 11)]]
    rows.append(dict(key, cache="b", error="OOM"))
    rows.append(dict(key, cache="c", error="boom"))
    out = {r["cache"]: r for r in merge_repeats(rows)}
    assert out["a"]["tpot_ms"] == 2.0 and out["a"]["tpot_runs"] == [3.0, 1.0, 2.0]
    assert out["a"]["prefill_s"] == 2.0 and out["a"]["peak_mb"] == 12
    assert out["b"]["tpot_ms"] == 6.0 and out["b"]["errors"] == 1  # the failed run counted, left out of the median
    assert out["c"]["error"] == "boom"  # nothing ran: the error row stays
    assert len(merge_repeats(rows[:1])) == 1 and "tpot_runs" not in merge_repeats(rows[:1])[0]


def test_kv_generate_jobs_and_before_src(tmp_path) -> None:
    """The 'before' rows run with --chunk-all too, and --before-src takes an exported package (no git needed)."""
    from bench.kv_generate import _jobs, main

    assert _jobs(["dynamic-nocudnn", "tq4/4"], 4096, True, "old") == [
        ("dynamic-nocudnn", "after", 4096), ("tq4/4", "after", 4096), ("tq4/4", "before (old)", 4096)]
    assert _jobs(["dynamic", "tq4/4"], 1024, False, None) == [
        ("dynamic", "after", 0), ("tq4/4", "after", 0), ("tq4/4", "after", 1024)]
    with pytest.raises(SystemExit, match="holds no tqindex package"):
        main(["--before-src", str(tmp_path), "--contexts", "64"])
    (tmp_path / "tqindex").mkdir()
    with pytest.raises(SystemExit, match="not both"):
        main(["--before", "HEAD", "--before-src", str(tmp_path)])


def test_kv_step_ablation_replaces_and_restores_the_attention_and_encode() -> None:
    import tqindex.kvcache as kvc
    from bench.kv_step import ABLATIONS, ablated

    run, enc = kvc.decode_run, kvc.encode_append_triton
    with ablated(True, False):
        assert kvc.decode_run is not run and kvc.encode_append_triton is enc
        q = torch.randn(1, 4, 1, 8)
        assert kvc.decode_run(None, q, 3, None, None, None, 1.0).shape == q.shape
    with ablated(False, True):
        assert kvc.decode_run is run and kvc.encode_append_triton is not enc
        assert kvc.encode_append_triton(1, 2, cache={}) is None
    try:
        with ablated(True, True):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert kvc.decode_run is run and kvc.encode_append_triton is enc  # restored, also after an error
    assert ABLATIONS["tq"] == (False, False) and ABLATIONS["tq-noattn-noenc"] == (True, True)


def test_kv_capacity_search_finds_the_boundary_from_either_side() -> None:
    from bench.kv_capacity import search

    def fits(limit: int):
        return lambda x: {"x": x, "fits": x <= limit}

    for start in (1, 5, 9, 10, 11, 20, 200):
        best, rows = search(fits(10), start, max_trials=30)
        assert len(rows) <= 2 * max(1, abs(start - 10)).bit_length() + 2, (start, rows)  # galloping + bisection
        assert best == 10 and {r["x"] for r in rows} >= {10, 11}, (start, rows)  # the fit and the failure above
    best, rows = search(fits(0), 3, max_trials=30)  # nothing fits: stops at lo
    assert best is None and rows[-1]["x"] == 1
    best, rows = search(fits(100_000), 32768, step=16384, lo=16384, max_trials=3)  # out of trials while fitting
    assert best == 81920 and [r["x"] for r in rows] == [32768, 49152, 81920]  # galloping: 1, 2 steps up
    best, rows = search(fits(100_000), 8, hi=9, max_trials=30)  # never past hi
    assert best == 9 and [r["x"] for r in rows] == [8, 9]


def test_kv_capacity_trial_fills_the_history_and_generates_on_cpu() -> None:
    from bench.kv_capacity import run_trial
    from bench.kv_generate import _build

    model = _build("gemma3-tiny", 1024, torch.float32, "cpu")
    for cache in ("dynamic", "static-nocudnn", "tq4/4", "tq4/4-reserved"):
        row = run_trial(model, cache, 700, 2, chunk=64, new_tokens=3, device="cpu")
        assert row["fits"] and row["tpot_ms"] > 0 and row["kv_gb"] >= row["kv_gb_filled"], row
    with pytest.raises(ValueError, match="tqK/V-reserved"):
        run_trial(model, "tq4/4-spare", 700, 2, chunk=64, new_tokens=3, device="cpu")

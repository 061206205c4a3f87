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

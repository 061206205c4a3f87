"""Writes tests/golden/index_v1 (run once, with format version 1; the files are then kept forever)."""

import json
from pathlib import Path

import numpy as np

from tqindex import Index

out = Path(__file__).parent / "index_v1"
rng = np.random.default_rng(1234)
x = rng.standard_normal((60, 12)).astype(np.float32) + 0.5
q = rng.standard_normal((4, 12)).astype(np.float32) + 0.5
idx = Index(12, metric="l2", bits=3, codec="prod", rerank=2, seed=7, device="cpu")
idx.add_with_ids(x, np.arange(60) * 10 + 5)
idx.remove_ids(np.array([5, 15]))
idx.save(out)
D, I = idx.search(q, 5)
_, I0 = idx.search(q, 5, rerank=0)
(out / "expected.json").write_text(
    json.dumps({"k": 5, "queries": q.tolist(), "D": D.tolist(), "I": I.tolist(), "I_codes": I0.tolist()}, indent=1)
)

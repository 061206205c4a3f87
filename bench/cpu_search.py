"""CPU search latency of tqindex.Index (torch reference path) against FAISS IndexFlatIP, same data and queries.

Usage:
    python -m bench.cpu_search [--sizes 20000,200000] [--dim 128] [--name cpu_search]

Writes bench/results/<name>.{json,md}: per size and codec, the median latency of single-query
searches (k = 10, rerank 4) and of one 100-query batch, 10-recall@10 against exact search, and the
same for FAISS's exact flat index. Cosine on Gaussian vectors (seed 0). Records the git commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and faiss share the cores (see bench.recall)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tqindex  # noqa: E402
from bench.common import RESULTS, write_results  # noqa: E402


def _median_s(fn: Callable[[], Any], reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _recall(found: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / gt.shape[1] for a, b in zip(found, gt)]))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="cpu_search")
    args = ap.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    commit = _commit()
    for n in (int(s) for s in args.sizes.split(",") if s):
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        q = rng.standard_normal((100, args.dim), dtype=np.float32)
        xu = x / np.linalg.norm(x, axis=1, keepdims=True)
        qu = q / np.linalg.norm(q, axis=1, keepdims=True)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(xu)
        _, gt = flat.search(qu, 10)
        single = _median_s(lambda: flat.search(qu[:1], 10), args.reps)
        batch = _median_s(lambda: flat.search(qu, 10), 3)
        rows.append({"n": n, "dim": args.dim, "method": "FAISS IndexFlatIP (exact)", "bytes/vec": 4 * args.dim,
                     "recall@10": 1.0, "1-query ms": 1e3 * single, "100-query ms": 1e3 * batch, "code": "faiss " + faiss.__version__})
        for codec in ("prod", "mse"):
            idx = tqindex.Index(args.dim, metric="cosine", bits=args.bits, codec=codec, rerank=4, device="cpu", seed=0)
            idx.add(x)
            _, found = idx.search(q, 10)
            single = statistics.median(
                [_median_s(lambda i=i: idx.search(q[i : i + 1], 10), 1) for i in range(args.reps)])
            batch = _median_s(lambda: idx.search(q, 10), 3)
            rows.append({"n": n, "dim": args.dim, "method": f"tqindex {codec} {args.bits}-bit, rerank 4",
                         "bytes/vec": idx.code_size, "recall@10": _recall(found, gt), "1-query ms": 1e3 * single,
                         "100-query ms": 1e3 * batch, "code": commit})
            print(rows[-1], flush=True)
    write_results(args.name, rows, out_dir=Path(args.out),
                  notes=f"CPU only, {torch.get_num_threads()} torch threads; cosine, Gaussian data and 100 queries "
                        f"(seed 0); latency = median over {args.reps} single-query searches, and of 3 runs of "
                        "the 100-query batch. `code`: the git commit of tqindex measured.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

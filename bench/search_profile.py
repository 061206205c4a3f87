"""Where one Index.search call spends its time on the GPU: wall time vs the sum of its kernels, top kernels.

Usage (a CUDA machine):
    python -m bench.search_profile [--glove PATH_TO_GLOVE50.npy] [--n 1000000] [--nq 1000]

Writes bench/results/search_profile.{json,md}: per configuration the median wall time of a search
(5 runs after a warm-up), the GPU time summed over its kernels (torch.profiler), and the kernels
that take most of it. Wall minus kernel time is host work, launches, transfers and synchronisation.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import torch

import tqindex
from bench.common import RESULTS, write_results
from bench.datasets import mixture
from bench.search import glove, timeit


def profile_search(idx: tqindex.Index, q: torch.Tensor, k: int, rr: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(total kernel ms, [(kernel name, ms, calls)] by time) of one search."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        idx.search(q, k, rerank=rr)
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
            per[ev.name][1] += 1
    items = sorted(((n, v[0], int(v[1])) for n, v in per.items()), key=lambda t: -t[1])
    return sum(v for _, v, _ in items), items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glove", default=None, help="path of the GloVe-50 .npy (400k x 50)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--dims", default="128,1536")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    dev = torch.device("cuda")
    sets: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []
    for d in (int(x) for x in args.dims.split(",") if x):
        x, q = mixture(args.n, d, args.nq, clusters=10_000, seed=d, device=dev)
        sets.append((f"mixture-{d}", x, q, "cosine"))
    if args.glove:
        x, q = glove(args.glove, args.nq, seed=0, dev=dev)
        sets.append(("glove-50", x, q, "cosine"))
    rows: list[dict[str, Any]] = []
    for name, x, q, metric in sets:
        for codec, scans in (("mse", ("fused", "gemm")), ("prod", ("gemm",))):
            idx = tqindex.Index(x.shape[1], metric=metric, bits=4, codec=codec, device=dev, originals="device")
            idx.add(x)
            for scan in scans:
                if scan == "fused" and x.shape[1] > 128:
                    continue
                idx.scan = scan
                for rr in (0, 4):
                    wall = timeit(lambda: idx.search(q, 10, rerank=rr), dev)
                    gpu_ms, items = profile_search(idx, q, 10, rr)
                    top = "; ".join(f"{n[:60]} {ms:.2f} ms x{c}" for n, ms, c in items[:5])
                    rows.append({"data": name, "n": x.shape[0], "codec": codec, "bits": 4, "scan": scan, "rerank": rr,
                                 "wall ms": 1e3 * wall, "kernel ms": gpu_ms, "host/other ms": 1e3 * wall - gpu_ms,
                                 "top kernels": top, "kernels": [list(t) for t in items[:20]]})
                    print(f"{name} {codec} {scan} rr{rr}: wall {1e3 * wall:.2f} ms, kernels {gpu_ms:.2f} ms | {top}",
                          flush=True)
            del idx
            torch.cuda.empty_cache()
        del x, q
    cols = ["data", "n", "codec", "bits", "scan", "rerank", "wall ms", "kernel ms", "host/other ms", "top kernels"]
    write_results("search_profile", rows, columns=cols, out_dir=args.out,
                  notes=f"{args.nq} queries, k=10, originals on the device; wall = median of 5 after a warm-up.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where one IVFIndex.search spends its time on the GPU: whole call, GPU time per kernel, launches.

    python -m bench.ivf_profile [--datasets mixture-128,glove-50] [--nlist 4096,1024] [--nprobes 8,64]
                                [--nqs 1,1000] [--glove PATH.npy] [--sweep]

Per (data set, nq, nprobe): the synchronised wall time of ``search`` (median), the GPU time summed
over every kernel of one search and their count (torch.profiler; CUDA graphs off, so each kernel is
seen), the five kernels that take the most GPU time, and the GPU time of the two-pass candidate scan alone
(``ivf_topk_triton``, profiled the same way: host launch time excluded) with pass 1 per (query,
probe) pair and grouped by list, with ``--sweep`` both for a few tile shapes. Writes
bench/results/<name>.{json,md} (default name ivf_profile).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import numpy as np
import torch

import tqindex
from bench.common import RESULTS, markdown_table, write_results
from bench.ivf import _load
from bench.search import timeit
from tqindex.kernels import ivf_scan as scan_mod


def _kernels(fn: Any) -> tuple[int, float, list[tuple[str, float]]]:
    """(kernels launched, GPU ms summed, the five costliest kernel names with their ms) of one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per: dict[str, float] = defaultdict(float)
    for e in ev:
        per[e.name[:60]] += e.device_time_total / 1e3
    top = sorted(per.items(), key=lambda kv: -kv[1])[:5]
    return len(ev), sum(e.device_time_total for e in ev) / 1e3, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mixture-128,mixture-1536")
    ap.add_argument("--nlist", default="4096,4096")
    ap.add_argument("--nprobes", default="8")
    ap.add_argument("--nqs", default="1,1000")
    ap.add_argument("--glove", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="ivf_profile")
    args = ap.parse_args()
    dev = torch.device("cuda")
    nlists = [int(v) for v in args.nlist.split(",") if v]
    nqs = [int(v) for v in args.nqs.split(",") if v]
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(s for s in args.datasets.split(",") if s):
        x, q, metric = _load(name, dev, max(nqs), args.glove)
        d = x.shape[1]
        ix = tqindex.IVFIndex(d, nlists[i], metric=metric, bits=4, codec="mse", device=dev, originals="device",
                              cuda_graphs=False)
        g = torch.Generator().manual_seed(0)
        ix.train(x[torch.randperm(x.shape[0], generator=g)[:262_144].to(dev)])
        ix.add(x)
        del x
        sizes = ix.list_sizes()
        for nprobe in [int(v) for v in args.nprobes.split(",") if v]:
            for nq in nqs:
                qq = q[:nq]
                fn = lambda: ix.search(qq, 10, nprobe=nprobe)  # noqa: E731, B023
                wall = timeit(fn, dev, reps=20 if nq == 1 else 5)
                n_k, gpu_ms, top = _kernels(fn)
                ix._settle()
                lc, pq = ix._bind(ix._normalise(qq), nprobe, None)
                row: dict[str, Any] = {
                    "data": name, "nlist": nlists[i], "nq": nq, "nprobe": nprobe,
                    "list sizes (min/median/max)": f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}",
                    "codes scanned": int(pq.cum[:, -1].sum()), "search wall ms": 1e3 * wall,
                    "kernels per search": n_k, "GPU ms per search": gpu_ms,
                    "top kernels (GPU ms)": "; ".join(f"{k} {v:.3f}" for k, v in top)}
                for method in ("pairs", "grouped"):  # GPU time of the candidate stage alone (host launches excluded)
                    scan = lambda method=method: scan_mod.ivf_topk_triton(lc, pq, 40, method=method)  # noqa: E731
                    scan()
                    row[f"scan {method} GPU ms"] = _kernels(scan)[1]
                if args.sweep:
                    for bq in (16, 32, 64):
                        for bn in (32, 64, 128):
                            scan = lambda bq=bq, bn=bn: scan_mod.ivf_topk_triton(  # noqa: E731
                                lc, pq, 40, method="grouped", block_q=bq, block_n=bn)
                            scan()
                            row[f"grouped BQ{bq} BN{bn} GPU ms"] = _kernels(scan)[1]
                    for bn in (16, 32, 64, 128):
                        for bd in (32, 64, 128):
                            scan = lambda bn=bn, bd=bd: scan_mod.ivf_topk_triton(  # noqa: E731
                                lc, pq, 40, method="pairs", block_n=bn, block_d=bd)
                            scan()
                            row[f"pairs BN{bn} BD{bd} GPU ms"] = _kernels(scan)[1]
                    for kind in ("pairs", "grouped"):
                        best = min((v, k) for k, v in row.items() if k.startswith(kind + " ") and "BN" in k)
                        row[f"best {kind}"] = f"{best[1][len(kind) + 1:-7]} {best[0]:.3f}"
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del ix
        torch.cuda.empty_cache()
    cols = ["data", "nlist", "nq", "nprobe", "list sizes (min/median/max)", "codes scanned", "search wall ms",
            "kernels per search", "GPU ms per search", "top kernels (GPU ms)"]
    cols += ["scan pairs GPU ms", "scan grouped GPU ms"]
    if args.sweep:
        cols += ["best pairs", "best grouped"]
    write_results(args.name, rows, columns=cols, out_dir=args.out,
                  notes="IVF mse 4-bit, rerank default (4), originals on the GPU, CUDA graphs off (every kernel "
                        "profiled); data as bench.ivf loads it.")
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()

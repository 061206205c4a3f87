"""Where one IVFIndex.search spends its time on the GPU: whole call, the list scan alone, launches.

    python -m bench.ivf_profile [--dims 128,1536] [--n 1000000] [--nlist 4096] [--nprobe 8]

Per (dim, nq): the synchronised wall time of ``search`` (median), the scan kernel alone on the same
bound arguments (``triton.testing.do_bench``, median), the GPU time summed over every kernel of one
search and their count (torch.profiler), and the scan kernel's time for a few tile shapes.
Writes bench/results/ivf_profile.{json,md}.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import tqindex
from bench.common import RESULTS, markdown_table, write_results
from bench.datasets import mixture
from bench.search import timeit
from tqindex.kernels import ivf_scan as scan_mod


def _kernels(fn: Any) -> tuple[int, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(ev), sum(e.device_time_total for e in ev) / 1e3


def main() -> None:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="128,1536")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--nqs", default="1,1000")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    for d in [int(v) for v in args.dims.split(",") if v]:
        x, q = mixture(args.n, d, 1000, clusters=10_000, seed=d, device=dev)
        ix = tqindex.IVFIndex(d, args.nlist, metric="cosine", bits=4, codec="mse", device=dev, originals="device")
        ix.train(x[:262_144])
        ix.add(x)
        del x
        for nq in [int(v) for v in args.nqs.split(",") if v]:
            qq = q[:nq]
            fn = lambda: ix.search(qq, 10, nprobe=args.nprobe)  # noqa: E731
            wall = timeit(fn, dev, reps=20 if nq == 1 else 5)
            n_k, gpu_ms = _kernels(fn)
            ix._settle()
            lc, pq = ix._bind(ix._normalise(qq), args.nprobe, None)
            row: dict[str, Any] = {"dim": d, "nq": nq, "nprobe": args.nprobe, "codes scanned": int(
                (pq.cum[:, -1]).sum()), "search wall ms": 1e3 * wall, "kernels per search": n_k,
                "GPU ms per search": gpu_ms}
            for bn in (16, 32, 64, 128):
                for bd in (32, 64, 128):
                    def scan(bn: int = bn, bd: int = bd) -> Any:
                        return scan_mod.ivf_scan_triton(lc, pq, int(ix._lens_desc[0]), block_n=bn, block_d=bd)
                    try:
                        row[f"scan BN{bn} BD{bd} ms"] = triton.testing.do_bench(scan, warmup=10, rep=50,
                                                                                return_mode="median")
                    except Exception as e:  # noqa: BLE001 - a shape the compiler refuses is reported
                        row[f"scan BN{bn} BD{bd} ms"] = f"failed: {type(e).__name__}"
            best = min((v, k) for k, v in row.items() if k.startswith("scan ") and isinstance(v, float))
            row["best scan"] = f"{best[1]} {best[0]:.3f}"
            row["G coords/s (best)"] = row["codes scanned"] * d / (best[0] * 1e-3) / 1e9
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del ix
        torch.cuda.empty_cache()
    cols = ["dim", "nq", "nprobe", "codes scanned", "search wall ms", "kernels per search", "GPU ms per search",
            "best scan", "G coords/s (best)"]
    write_results("ivf_profile", rows, columns=cols, out_dir=args.out,
                  notes="Mixture data (bench.datasets.mixture), IVF mse 4-bit, cosine, rerank default (4).")
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()

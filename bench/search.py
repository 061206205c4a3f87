"""Search speed and recall of tqindex.Index against exact fp16 brute force on the same GPU."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tqindex
from bench.common import RESULTS, write_results


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], dev: torch.device, reps: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` (synchronised) over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(dev: torch.device) -> float | None:
    """Device-to-device copy bandwidth, bytes read + written per second (None on CPU)."""
    if dev.type != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)  # 1 GiB, well past the L2
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), dev, reps=10, warmup=3)
    return 2 * a.numel() / t


def brute_force(x16: torch.Tensor, q: torch.Tensor, k: int, metric: str, chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k with fp16 matmul + chunked topk (the baseline). x16 (n, d) fp16 on device."""
    q16 = q.to(torch.float16)
    best_v = torch.empty(q.shape[0], 0, device=q.device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
    for s in range(0, x16.shape[0], chunk):
        xs = x16[s : s + chunk]
        sim = (q16 @ xs.T).float()
        if metric == "l2":
            sim = 2 * sim - xs.float().square().sum(1).unsqueeze(0)
        v, i = torch.topk(sim, min(k, sim.shape[1]), dim=1)
        best_v, best_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + s], 1)
        best_v, j = torch.topk(best_v, min(k, best_v.shape[1]), dim=1)
        best_i = torch.gather(best_i, 1, j)
    return best_v, best_i


def exact_gt(x: torch.Tensor, q: torch.Tensor, k: int, metric: str, chunk: int = 131072) -> torch.Tensor:
    """Exact fp32 ground-truth ids (nq, k)."""
    best_v = torch.empty(q.shape[0], 0, device=q.device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].to(q.device, torch.float32)
        sim = q @ xs.T
        if metric == "l2":
            sim = 2 * sim - xs.square().sum(1).unsqueeze(0)
        v, i = torch.topk(sim, min(k, sim.shape[1]), dim=1)
        best_v, best_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + s], 1)
        best_v, j = torch.topk(best_v, min(k, best_v.shape[1]), dim=1)
        best_i = torch.gather(best_i, 1, j)
    return best_i


def recall_at(I: torch.Tensor, gt: torch.Tensor, k: int) -> float:
    """k-recall@k: |found ∩ true top-k| / k, averaged over queries."""
    I, gt = I[:, :k].cpu().numpy(), gt[:, :k].cpu().numpy()
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I, gt)]))


def synthetic(n: int, d: int, nq: int, seed: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian vectors (n, d) and queries (nq, d), float32 on ``dev``, from ``seed``."""
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    return torch.randn(n, d, generator=g, device=dev), torch.randn(nq, d, generator=g, device=dev)


def glove(path: str, nq: int, seed: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """GloVe-50 (400k x 50) from a .npy; ``nq`` queries drawn by ``seed`` and removed from the base; normalised."""
    a = np.ascontiguousarray(np.load(path)).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(a.shape[0])
    q, x = a[perm[:nq]], a[np.sort(perm[nq:])]
    t = torch.from_numpy(x).to(dev)
    qt = torch.from_numpy(q).to(dev)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    qt = qt / qt.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return t, qt


def run_dataset(
    name: str, x: torch.Tensor, q: torch.Tensor, metric: str, dev: torch.device, configs: list[dict[str, Any]],
    bw: float | None, k: int = 10,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n, d = x.shape
    nq = q.shape[0]
    gt = exact_gt(x, q, k, metric)
    x16 = x.to(torch.float16)
    bf_t = timeit(lambda: brute_force(x16, q, k, metric), dev)
    _, bf_i = brute_force(x16, q, k, metric)
    bf_qps = nq / bf_t
    rows.append({"dataset": name, "n": n, "dim": d, "method": "exact fp16 brute force", "bits": 16, "rerank": "-",
                 "bytes/vec": 2 * d, "recall@10": recall_at(bf_i, gt, k), "ms/batch": 1e3 * bf_t, "QPS": bf_qps,
                 "speedup vs BF": 1.0})
    del x16
    x_host = x.cpu().numpy()
    for cfg in configs:
        idx = tqindex.Index(d, metric=metric, device=dev, **cfg)
        where = cfg.get("originals", "host")
        t0 = time.perf_counter()
        for s in range(0, n, 262144):
            idx.add(x_host[s : s + 262144])
        _sync(dev)
        build = time.perf_counter() - t0
        # The fused scan is kept for dims <= 128 only: "auto" never picks it above 64 (10x slower at 1536).
        scans = (("fused", "gemm") if d <= 128 else ("gemm",)) if dev.type == "cuda" else ("auto",)
        variants = [(scan, rr) for scan in scans for rr in (0, 2, 4, 8)]
        for scan, rr in variants:
            idx.scan = scan
            fn = lambda rr=rr: idx.search(q, k, rerank=rr)  # noqa: E731
            t = timeit(fn, dev)
            _, I = fn()
            row = {"dataset": name, "n": n, "dim": d, "method": f"tqindex {cfg['codec']} ({scan})",
                   "originals": where if rr else "-", "bits": cfg["bits"],
                   "rerank": rr, "bytes/vec": idx.code_size, "recall@10": recall_at(I, gt, k),
                   "ms/batch": 1e3 * t, "QPS": nq / t, "speedup vs BF": (nq / t) / bf_qps, "build s": build}
            if rr == 0 and bw:
                row["scan GB/s"] = n * idx.code_size / t / 1e9
                row["% of copy BW"] = 100 * (n * idx.code_size / t) / bw
            rows.append(row)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
        del idx
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--dims", default="128,1536")
    ap.add_argument("--glove", default=None, help="path of the GloVe-50 .npy (400k x 50)")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="search")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bw = copy_bandwidth(dev)
    if bw:
        print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    bits = [int(b) for b in args.bits.split(",")]
    configs = [{"codec": c, "bits": b, "originals": "device"} for b in bits for c in ("prod", "mse")]
    configs.append({"codec": "prod", "bits": bits[0], "originals": "host"})
    rows: list[dict[str, Any]] = []
    for d in [int(v) for v in args.dims.split(",") if v]:
        x, q = synthetic(args.n, d, args.nq, seed=d, dev=dev)
        rows += run_dataset(f"gaussian-{d}", x, q, "ip", dev, configs, bw)
        del x
    if args.glove:
        x, q = glove(args.glove, args.nq, seed=0, dev=dev)
        gcfg = [{"codec": c, "bits": b, "originals": "device"} for b in sorted(set(bits) | {2, 3, 4, 6, 8})
                for c in ("prod", "mse")]
        gcfg.append({"codec": "prod", "bits": 4, "originals": "host"})
        rows += run_dataset("glove-50 (cosine)", x, q, "cosine", dev, gcfg, bw)
    cols = ["dataset", "n", "dim", "method", "originals", "bits", "rerank", "bytes/vec", "recall@10", "ms/batch", "QPS",
            "speedup vs BF", "scan GB/s", "% of copy BW", "build s"]
    notes = (f"{args.nq} queries, k=10, batch search. Exact fp16 brute force = torch matmul + chunked topk on the "
             f"same device. recall@10 against exact fp32 ground truth. Times: median of 5 synchronised runs after a "
             f"warm-up. Device-to-device copy bandwidth: {bw / 1e12 if bw else float('nan'):.2f} TB/s (read+write).")
    write_results(args.name, rows, columns=cols, notes=notes, extra={"copy_bw_Bps": bw}, out_dir=Path(args.out))
    from bench.common import markdown_table

    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()

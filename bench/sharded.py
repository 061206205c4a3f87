"""tqindex.ShardedIndex against one plain index over the same data: equality, latency / QPS, memory per rank.

Launched by torchrun (one process per rank; gloo on CPUs, NCCL on GPUs):

    torchrun --nproc-per-node 2 -m bench.sharded --device cpu      # 2 gloo ranks on one machine
    torchrun --nproc-per-node 1 -m bench.sharded --device cuda     # 1 NCCL rank: the collective path's cost

(``python -m bench.sharded`` alone runs one rank.) Every rank draws the same seeded Gaussian mixture
(bench.datasets.mixture) and passes every W-th row to ``add_with_ids``: the ids travel to their
owners. Rank 0 also builds the plain index (same codec and centroids: a copy of its trained, empty
shard) over all rows, while the other ranks wait. Timings are rank 0's wall time of the whole call
(synchronised on CUDA). On the CPU the cores are split between the ranks for the sharded searches;
the plain index gets them all. Results: bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import tqindex
from bench.common import RESULTS, markdown_table, write_results
from bench.datasets import mixture
from bench.search import exact_gt, recall_at, timeit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(device: str) -> tuple[int, int, torch.device]:
    """Join (or start, alone) the process group: (rank, world, this rank's device)."""
    if "RANK" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def _threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # pragma: no cover - numba missing or fixed
        pass


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _ms(fn: Callable[[], Any], dev: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall ms of ``fn`` over ``reps`` calls after ``warmup`` (the same number of calls on every rank)."""
    return 1e3 * timeit(fn, dev, reps=reps, warmup=warmup)


def _plain_ms(plain: tqindex.Index, qq: torch.Tensor, singles: list[torch.Tensor] | None, k: int,
              dev: torch.device, args: argparse.Namespace) -> float:
    if singles is not None:
        it = iter(singles * 2)
        return _ms(lambda: plain.search(next(it), k), dev, args.singles - 2)
    return _ms(lambda: plain.search(qq, k), dev, args.reps)


def _gather_ints(values: list[int], dev: torch.device) -> np.ndarray:
    """(world, len(values)) int64 of every rank's values."""
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out).cpu().numpy()


def _factory(args: argparse.Namespace, dev: torch.device) -> Callable[[], tqindex.Index]:
    common = dict(metric=args.metric, bits=args.bits, codec=args.codec, rerank=args.rerank, seed=0, device=dev,
                  originals="device" if dev.type == "cuda" else "host")
    if args.kind == "ivf":
        return lambda: tqindex.IVFIndex(args.dim, args.nlist, nprobe=args.nprobe, **common)
    return lambda: tqindex.Index(args.dim, **common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--kind", default="ivf", choices=["ivf", "flat"])
    ap.add_argument("--size", type=int, default=None, help="vectors (default: 1M on CUDA, 200k on the CPU)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=None, help="mixture clusters (default: n / 100)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4096 on CUDA, 512 on the CPU)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--metric", default="cosine", choices=["ip", "cosine", "l2"])
    ap.add_argument("--codec", default="mse", choices=["mse", "prod"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rerank", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nqs", default=None, help="query batch sizes (default: 1,100,1000 on CUDA, 1,100 on the CPU)")
    ap.add_argument("--singles", type=int, default=200, help="different single queries timed for nq=1")
    ap.add_argument("--train-n", type=int, default=131_072, help="k-means sample (rank 0's first rows)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: os.cpu_count())")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    rank, world, dev = _init(args.device)
    cuda = dev.type == "cuda"
    args.size = args.size or (1_000_000 if cuda else 200_000)
    args.nlist = args.nlist or (4096 if cuda else 512)
    nqs = sorted({int(v) for v in (args.nqs or ("1,100,1000" if cuda else "1,100")).split(",") if v})
    threads = args.threads or os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    per_rank = max(1, threads // local_world)
    _threads(per_rank)

    x, q = mixture(args.size, args.dim, max(nqs), clusters=args.clusters or max(1, args.size // 100), seed=args.dim,
                   device=dev)
    ids = torch.arange(args.size, dtype=torch.int64)
    factory = _factory(args, dev)

    t0 = time.perf_counter()
    sh = tqindex.ShardedIndex(factory)
    if args.kind == "ivf":
        sh.train(x[: args.train_n] if rank == 0 else None)
    _sync(dev)
    train_s = time.perf_counter() - t0
    plain = None
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:  # the plain index: the same codec and centroids as the shards
            sh.local.save(tmp)
            plain = tqindex.load(tmp, device=dev)
        dist.barrier()
    t0 = time.perf_counter()
    sh.add_with_ids(x[rank::world], ids[rank::world])
    _sync(dev)
    add_s = time.perf_counter() - t0

    plain_add_s = 0.0
    gt = None
    if rank == 0:
        _threads(threads)
        t0 = time.perf_counter()
        plain.add_with_ids(x, ids)
        _sync(dev)
        plain_add_s = time.perf_counter() - t0
        gt = exact_gt(x, q, args.k, args.metric)
        _threads(per_rank)
    dist.barrier()

    load_before = os.getloadavg()
    k, kc = args.k, args.k * max(args.rerank, 1)
    rows: list[dict[str, Any]] = []
    for nq in nqs:
        qq = q[:nq]
        Ds, Is = sh.search(q[: max(nq, 100)], k)  # correctness on at least 100 queries
        if nq == 1:
            singles = [q[i % q.shape[0] : i % q.shape[0] + 1] for i in range(args.singles)]
            it = iter(singles * 2)
            sharded_ms = _ms(lambda: sh.search(next(it), k), dev, args.singles - 2)
            it_l = iter(singles * 2)
            local_ms = _ms(lambda: sh.local.search(next(it_l), kc, 0), dev, args.singles - 2)
        else:
            sharded_ms = _ms(lambda: sh.search(qq, k), dev, args.reps)
            local_ms = _ms(lambda: sh.local.search(qq, kc, 0), dev, args.reps)
        row: dict[str, Any] = {"nq": nq, "sharded ms": sharded_ms, "local candidates ms (rank 0)": local_ms}
        if rank == 0:
            _threads(threads)
            Dp, Ip = plain.search(q[: max(nq, 100)], k)
            plain_ms = _plain_ms(plain, qq, singles if nq == 1 else None, k, dev, args)
            if not cuda and threads > 1:  # also on one thread: a busy shared machine stalls parallel regions
                _threads(1)
                row["plain 1-thread ms"] = _plain_ms(plain, qq, singles if nq == 1 else None, k, dev, args)
            _threads(per_rank)
            Is_np, Ip_np = Is.cpu().numpy(), Ip.cpu().numpy()
            row.update({
                "plain ms": plain_ms,
                "overhead ms": sharded_ms - plain_ms,
                "plain QPS": nq / plain_ms * 1e3,
                "sharded QPS": nq / sharded_ms * 1e3,
                "recall plain": recall_at(Ip, gt[: Ip.shape[0]], k),
                "recall sharded": recall_at(Is, gt[: Is.shape[0]], k),
                "same ids": float((Is_np == Ip_np).mean()),
                "max |D diff|": float((Ds - Dp).abs().max()),
            })
        rows.append(row)
        dist.barrier()

    mem = _gather_ints([sh.memory_usage()["total"], len(sh.local),
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        torch.cuda.max_memory_allocated(dev) if cuda else 0], dev)
    if rank != 0:
        dist.destroy_process_group()
        return
    memory = {
        "shard bytes (index.memory_usage, per rank)": mem[:, 0].tolist(),
        "shard vectors (per rank)": mem[:, 1].tolist(),
        "peak RSS bytes (per rank; rank 0 also holds the plain index and the ground truth)": mem[:, 2].tolist(),
        "plain index bytes": plain.memory_usage()["total"],
    }
    if cuda:
        memory["peak CUDA bytes (per rank)"] = mem[:, 3].tolist()
    build = {"train s (rank 0 k-means + broadcast)": train_s, "sharded add s (routing included)": add_s,
             "plain add s": plain_add_s}
    cfg = {"kind": args.kind, "n": args.size, "dim": args.dim, "metric": args.metric, "codec": f"{args.codec}{args.bits}",
           "rerank": args.rerank, "k": k, "nlist": args.nlist if args.kind == "ivf" else None,
           "nprobe": args.nprobe if args.kind == "ivf" else None, "ranks": world, "backend": dist.get_backend(),
           "threads per rank": per_rank, "threads plain": threads}
    name = args.name or f"sharded_{'cuda' if cuda else 'cpu'}_{world}rank"
    cfg["load average (1 min) before / after the searches"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    cols = ["nq", "plain ms", "plain 1-thread ms", "sharded ms", "overhead ms", "local candidates ms (rank 0)",
            "plain QPS",
            "sharded QPS", "recall plain", "recall sharded", "same ids", "max |D diff|"]
    notes = "\n".join([
        f"- config: {cfg}",
        f"- build: { {k_: round(v, 3) for k_, v in build.items()} }",
        f"- memory: {memory}",
        "- nq=1: median over different single queries; nq>1: median of one batch over reps. 'local candidates "
        "ms': rank 0's shard alone returning its k*rerank best by estimate (the first stage of a sharded "
        "search); the rest of 'sharded ms' is the exact rescoring of those candidates, the merge and the three "
        "collectives (header all_gather, query broadcast, result all_gather). 'same ids': fraction of result "
        "positions equal to the plain index's (recall and D on at least 100 queries). 'plain 1-thread ms' (CPU): the "
        "plain index on one thread, as each of 2 ranks runs on 2 cores.",
    ])
    cols = [c for c in cols if any(c in r for r in rows)]
    launcher = (f"torchrun --nproc-per-node {local_world}" + (f" --nnodes {world // local_world}" if world > local_world
                                                              else "")) if "TORCHELASTIC_RUN_ID" in os.environ else "python"
    notes = f"- launched as: `{launcher} -m bench.sharded {' '.join(sys.argv[1:])}`\n" + notes
    sys.argv[:1] = ["-m", "bench.sharded"]  # the recorded command names the module, not the file torchrun ran
    write_results(name, rows, columns=cols, notes=notes, out_dir=args.out,
                  extra={"config": cfg, "build": build, "memory": memory})
    print(markdown_table(rows, cols))
    print(memory)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

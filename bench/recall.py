"""Recall benchmark: tqindex (TurboQuant prod/mse, bits 2..8, with and without rescoring) against FAISS on real data."""

# Usage:
#     python -m bench.recall --dataset glove-50            # CPU defaults, <= 12 min on 2 cores
#     python -m bench.recall --dataset fashion-mnist
#     python -m bench.recall --dataset glove-50 --full --device cuda   # every query, every row measured
#     python -m bench.recall --dataset my.hdf5 --quick                 # any ann-benchmarks/TEXMEX/.npy file
#
# Writes bench/results/recall_<dataset>.{json,md} and two PNG plots (see bench/plots.py).

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# torch and faiss each ship an OpenMP runtime; with the default (spinning) wait policy the idle
# threads of one starve the other (PQ training 5-10x slower on 2 cores). Must precede their import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from bench.common import RESULTS, machine, markdown_table, write_results  # noqa: E402
from bench.datasets import CACHE_DIR, Dataset, ground_truth, load_dataset  # noqa: E402

KS = list(range(1, 65))  # recall@1@k for k = 1..64
RERANKS = (1, 2, 4, 8, 16)
MEASURED_RERANK = 4  # in the default (derived) mode, this one is also measured through Index.search


@dataclass
class Settings:
    """What one run covers; ``settings_for`` fills it from the command line."""

    queries: int | None  # None: every query of the data set
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    codecs: tuple[str, ...] = ("prod", "mse")
    reranks: tuple[int, ...] = RERANKS
    rerank_measured: bool = False  # True: every rerank row is its own Index.search call
    train_sample: int | None = 65_536  # FAISS training vectors (None: the whole base)
    faiss: bool = True
    tqindex: bool = True
    faiss_filter: Sequence[str] = ()
    device: str = "cpu"
    seed: int = 0
    mode: str = "default"
    merge: bool = False  # keep the rows of engines not run now from the existing results file
    resume: bool = False  # reuse the methods an interrupted run of the same settings finished
    notes: list[str] = field(default_factory=list)


DEFAULT_QUERIES = {"glove-50": 500, "fashion-mnist": 300}


def settings_for(args: argparse.Namespace, ds: Dataset) -> Settings:
    if args.full:
        s = Settings(queries=None, rerank_measured=True, train_sample=None, mode="full")
    elif args.quick:
        s = Settings(queries=100, bits=(2, 4, 8), reranks=(4,), train_sample=10_000, mode="quick")
    else:
        s = Settings(queries=DEFAULT_QUERIES.get(ds.name, 1000))
    if args.queries is not None:
        s.queries = args.queries
    if args.bits:
        s.bits = tuple(args.bits)
    if args.no_faiss:
        s.faiss = False
    if args.no_tqindex:
        s.tqindex = False
    if args.faiss_only:
        s.faiss_filter = tuple(args.faiss_only)
    s.device, s.seed, s.merge, s.resume = args.device, args.seed, args.merge, args.resume
    return s


# -- metrics -----------------------------------------------------------------------------------------------
def recall_1_at_k(I: np.ndarray, gt: np.ndarray, ks: Sequence[int] = KS) -> list[float]:
    """Fraction of queries whose true nearest neighbour is among the first k results, for each k."""
    hit = I[:, : max(ks)] == gt[:, :1]  # (nq, K)
    first = np.where(hit.any(1), hit.argmax(1), np.iinfo(np.int64).max)
    return [float(np.mean(first < k)) for k in ks]


def k_recall_at_k(I: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    """k-recall@k: |top-k returned ∩ true top-k| / k, averaged over queries."""
    a, b = I[:, :k], gt[:, :k]
    return float(np.mean([len(np.intersect1d(x[x >= 0], y)) / k for x, y in zip(a, b)]))


def rescore(cand: np.ndarray, base: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Exact rescoring of candidate ids (nq, c) (-1 = none) -> the best k ids (nq, k).

    ``base``/``queries`` as an ip/l2 engine sees them (unit-normalised for cosine): the same exact
    rescoring that tqindex.Index does with rerank = c / k and faiss.IndexRefineFlat with k_factor = c / k.
    """
    safe = np.maximum(cand, 0)
    vecs = base[safe]  # (nq, c, d)
    if metric == "l2":
        s = -((vecs - queries[:, None, :]) ** 2).sum(-1)
    else:
        s = np.einsum("qcd,qd->qc", vecs, queries)
    s = np.where(cand >= 0, s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, 1)


# -- one method = one row per rerank factor --------------------------------------------------------------------
def _rows_from_candidates(
    base_row: dict[str, Any], cand: np.ndarray, gt: np.ndarray, base: np.ndarray, queries: np.ndarray,
    metric: str, reranks: Sequence[int], measured: dict[int, tuple[np.ndarray, float]],
) -> list[dict[str, Any]]:
    """Codes-only row (from the first 64 candidates) and one row per rerank factor.

    ``measured`` maps a rerank factor to (ids (nq, 10), seconds) from the engine's own rescoring; the
    other factors are derived by exact rescoring of the first 10 * r candidates (same arithmetic).
    """
    nq = cand.shape[0]
    row0 = dict(base_row)
    row0.update(rerank=0, recall10_at10=k_recall_at_k(cand, gt), recall_1_at_k=recall_1_at_k(cand, gt),
                rerank_source="codes only")
    rows = [row0]
    for r in reranks:
        row = {k: v for k, v in base_row.items() if k not in ("search_s", "qps")}
        derived = rescore(cand[:, : 10 * r], base, queries, metric, 10)
        row.update(rerank=r, extra_bytes_per_vector=4 * base.shape[1])
        if r in measured:
            ids, secs = measured[r]
            row.update(recall10_at10=k_recall_at_k(ids, gt), search_s=secs, qps=nq / secs,
                       rerank_source="measured",
                       derived_recall10_at10=k_recall_at_k(derived, gt))
        else:
            row.update(recall10_at10=k_recall_at_k(derived, gt), search_s=None, qps=None,
                       rerank_source="derived")
        rows.append(row)
    return rows


def run_tqindex(ds: Dataset, gt: np.ndarray, codec: str, bits: int, s: Settings) -> list[dict[str, Any]]:
    """Build a tqindex.Index, search once for the candidates (k = 64, and 10 * max rerank), rescore."""
    import torch
    import tqindex

    base, queries = ds.prepared()
    kc = max(KS[-1], 10 * max(s.reranks, default=0))
    t0 = time.perf_counter()
    index = tqindex.Index(ds.dim, metric=ds.metric, bits=bits, codec=codec, rerank=0, seed=s.seed,
                          device=s.device, keep_originals=True)
    index.add(ds.base)
    _sync(s.device)
    build = time.perf_counter() - t0
    warm = s.device.startswith("cuda")  # Triton compiles per code width and shape: keep that out of QPS
    if warm:
        index.search(ds.queries, kc, rerank=0)
    t0 = time.perf_counter()
    _, cand = index.search(ds.queries, kc, rerank=0)
    _sync(s.device)
    secs = time.perf_counter() - t0
    measured: dict[int, tuple[np.ndarray, float]] = {}
    for r in s.reranks:
        if s.rerank_measured or r == MEASURED_RERANK:
            if warm:
                index.search(ds.queries, 10, rerank=r)
            t0 = time.perf_counter()
            _, ids = index.search(ds.queries, 10, rerank=r)
            _sync(s.device)
            measured[r] = (np.asarray(ids), time.perf_counter() - t0)
    mem = index.memory_usage()
    n = len(index)
    row = {
        "family": f"tqindex {codec}",
        "method": f"tqindex {codec} {bits}b",
        "engine": "tqindex",
        "factory": f"Index(metric={ds.metric!r}, bits={bits}, codec={codec!r}, seed={s.seed})",
        "bits": bits,
        "bytes_per_vector": int(index.code_size),
        "bytes_measured": mem["codes"] / n,
        "bytes_note": _tq_bytes_note(codec, bits, index),
        "extra_bytes_per_vector": 0,
        "ids_bytes_per_vector": mem["ids"] / n,
        "train_s": 0.0,
        "build_s": build,
        "search_s": secs,
        "search_k": kc,
        "qps": queries.shape[0] / secs,
        "device": str(index.device),
        "threads": torch.get_num_threads(),
    }
    return _rows_from_candidates(row, np.asarray(cand), gt, base, queries, ds.metric, s.reranks, measured)


def _tq_bytes_note(codec: str, bits: int, index: Any) -> str:
    c = index.codec
    nd = 2 if c.norm_dtype == "float16" else 4
    if codec == "prod":
        return (f"{c.mse_bytes} B {bits - 1}-bit indices + {c.qjl_bytes} B QJL signs + "
                f"{nd} B norm + {nd} B gamma")
    return f"{c.mse_bytes} B {bits}-bit indices + {nd} B norm"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- FAISS ------------------------------------------------------------------------------------------------------------
@dataclass
class FaissSpec:
    family: str
    factory: str
    bits: float | None  # nominal bits per coordinate (None where it has no such meaning)
    note: str = ""


def faiss_specs(d: int, metric: str, budgets: Sequence[int], quick: bool = False, full: bool = False
                ) -> list[FaissSpec]:
    """FAISS methods for dimension ``d``, PQ sized to the byte budgets of tqindex's rows.

    PQ needs d divisible by M; otherwise the vectors are first mapped by a random orthogonal
    d -> ceil(d/M)*M transform (faiss "RR<d'>", norms and inner products preserved).
    """
    specs = [FaissSpec("exact", "Flat", 32)]
    natural = ({d // 2} if not quick else set()) | ({d} if full else set()) if d <= 128 else set()
    pq8 = sorted({min(b, d) for b in budgets} | natural)
    pq4 = sorted({min(2 * b, d) for b in budgets if 2 * b <= d} | ({d} if not quick else set()))
    for m in pq8:
        specs.append(FaissSpec("faiss PQ x8", _pq_factory(d, m, "x8"), 8 * m / d, f"{m} B of 8-bit PQ codes"))
    for m in pq4:
        specs.append(FaissSpec("faiss PQ x4fs", _pq_factory(d, m, "x4fs"), 4 * m / d,
                               f"{math.ceil(m / 2)} B of 4-bit PQ codes (FastScan)"))
    specs += [FaissSpec("faiss SQ", "SQ4", 4), FaissSpec("faiss SQ", "SQ8", 8)]
    for b in (1, 2, 3, 4) if full else (1, 2, 4):
        specs.append(FaissSpec("faiss RaBitQ", "RaBitQ" if b == 1 else f"RaBitQ{b}", b))
    for b in (2, 3, 4) if full else (2, 4):
        specs.append(FaissSpec("faiss EDEN", f"EDEN{b}", b))
    for b in (2, 4) if quick else (2, 3, 4, 5) if full else (2, 3, 4):  # faiss 1.15 parses SQtq2..5
        specs.append(FaissSpec("faiss TurboQuant prod", f"RR,SQtq{b}", b))
    if metric in ("cosine", "ip"):  # SQtqmse stores no norm: only meaningful for unit vectors
        for b in (2, 4) if quick else (1, 2, 3, 4, 8) if full else (2, 3, 4, 8):  # parses 1..4 and 8
            pre = "L2norm,RR" if metric == "cosine" else "RR"
            specs.append(FaissSpec("faiss TurboQuant mse", f"{pre},SQtqmse{b}", b))
    return specs


def _pq_factory(d: int, m: int, suffix: str) -> str:
    if d % m == 0:
        return f"PQ{m}{suffix}"
    return f"RR{math.ceil(d / m) * m},PQ{m}{suffix}"


def _no_polysemous(index: Any) -> None:
    """index_factory's IndexPQ also trains a polysemous permutation (simulated annealing, minutes
    on 2 cores); plain PQ search (ADC) does not use it and gives the same results without it."""
    import faiss

    sub = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if hasattr(sub, "do_polysemous_training"):
        sub.do_polysemous_training = False


def run_faiss(ds: Dataset, gt: np.ndarray, spec: FaissSpec, s: Settings) -> list[dict[str, Any]]:
    import faiss

    base, queries = ds.prepared()
    metric = faiss.METRIC_L2 if ds.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    kc = max(KS[-1], 10 * max(s.reranks, default=0))
    index = faiss.index_factory(ds.dim, spec.factory, metric)
    _no_polysemous(index)
    dev = "cpu"
    if s.device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        try:  # GPU where FAISS has a GPU version of the index; the CPU index otherwise
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            dev = "cuda"
        except Exception:  # noqa: BLE001 - no GPU implementation of this index type
            pass
    train = base
    needs_train = not index.is_trained
    if s.train_sample is not None and base.shape[0] > s.train_sample and needs_train:
        pick = np.random.default_rng(s.seed).choice(base.shape[0], s.train_sample, replace=False)
        train = base[np.sort(pick)]
    t0 = time.perf_counter()
    if needs_train:
        index.train(train)
    t_train = time.perf_counter() - t0
    index.add(base)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, cand = index.search(queries, kc)
    secs = time.perf_counter() - t0
    cpu_index = faiss.index_gpu_to_cpu(index) if dev == "cuda" else index
    code = int(cpu_index.sa_code_size())
    serialized = int(faiss.serialize_index(cpu_index).nbytes)
    n = base.shape[0]
    row = {
        "family": spec.family,
        "method": spec.factory,
        "engine": "faiss",
        "factory": spec.factory,
        "bits": spec.bits,
        "bytes_per_vector": code,
        "bytes_measured": serialized / n,
        "bytes_note": (spec.note + "; " if spec.note else "") + "sa_code_size (codes incl. per-vector factors)",
        "extra_bytes_per_vector": 0,
        "ids_bytes_per_vector": 0,
        "train_s": t_train,
        "train_vectors": int(train.shape[0]) if needs_train else 0,
        "build_s": build,
        "search_s": secs,
        "search_k": kc,
        "qps": queries.shape[0] / secs,
        "device": dev,
        "threads": faiss.omp_get_max_threads(),
    }
    return _rows_from_candidates(row, cand.astype(np.int64), gt, base, queries, ds.metric, s.reranks, {})


# -- summary ----------------------------------------------------------------------------------------------------------
def headline(rows: Sequence[dict[str, Any]], bits: Sequence[int]) -> list[dict[str, Any]]:
    """Per bit budget b: tqindex mse/prod at b bits against the best FAISS row (any, and PQ) that uses
    at most as many bytes per vector as tqindex mse at b bits; codes only (rerank 0)."""
    codes = [r for r in rows if r["rerank"] == 0 and r["family"] != "exact"]
    out = []
    for b in bits:
        tq = {r["family"].split()[-1]: r for r in codes if r["engine"] == "tqindex" and r["bits"] == b}
        if "mse" not in tq and "prod" not in tq:
            continue
        budget = (tq.get("mse") or tq["prod"])["bytes_per_vector"]
        fa = [r for r in codes if r["engine"] == "faiss" and r["bytes_per_vector"] <= budget]
        best = max(fa, key=lambda r: r["recall10_at10"], default=None)
        pq = max((r for r in fa if r["family"].startswith("faiss PQ")), key=lambda r: r["recall10_at10"],
                 default=None)
        tq_best = max(tq.values(), key=lambda r: r["recall10_at10"] if r["bytes_per_vector"] <= budget else -1)

        def cell(r: dict[str, Any] | None) -> str:
            return "—" if r is None else f"{r['recall10_at10']:.3f} ({r['bytes_per_vector']} B)"

        mse_r = tq.get("mse", {}).get("recall10_at10", float("nan"))
        out.append({
            "bits": b,
            "budget B/vec": budget,
            "tqindex mse": cell(tq.get("mse")),
            "tqindex prod": cell(tq.get("prod")),
            "best FAISS PQ <= budget (PQ sized to 2..5 bits)": (f"{pq['method']} " + cell(pq)) if pq else "—",
            "best FAISS <= budget": (f"{best['method']} " + cell(best)) if best else "—",
            "tqindex mse beats PQ": "—" if pq is None else ("yes" if mse_r > pq["recall10_at10"] else "no")
            + ("" if pq is None or pq["bytes_per_vector"] >= 0.9 * budget else " (PQ has fewer bytes)"),
            "tqindex best overall": "—" if best is None else (
                "yes" if tq_best["recall10_at10"] > best["recall10_at10"] else "no"),
        })
    return out


def rerank_table(rows: Sequence[dict[str, Any]], r: int) -> list[dict[str, Any]]:
    """10-recall@10 with exact rescoring of the top 10*r, per method (tqindex and FAISS alike)."""
    return [
        {"method": x["method"], "B/vec (codes)": x["bytes_per_vector"], f"10-recall@10 rerank {r}": x["recall10_at10"],
         "source": x["rerank_source"]}
        for x in rows if x["rerank"] == r and x["family"] != "exact"
    ]


COLUMNS = ["method", "family", "bits", "rerank", "bytes_per_vector", "bytes_measured", "recall10_at10",
           "r1@1", "r1@4", "r1@16", "r1@64", "train_s", "build_s", "qps", "device", "rerank_source"]


def _table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        t = {k: r.get(k) for k in COLUMNS}
        rk = r.get("recall_1_at_k")
        for k in (1, 4, 16, 64):
            t[f"r1@{k}"] = rk[k - 1] if rk else None
        out.append(t)
    return out


# -- main ------------------------------------------------------------------------------------------------------------------
def run(ds: Dataset, s: Settings, out_dir: Path | None = None, name: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    t_start = time.perf_counter()
    load_start = _loadavg()
    full_nq = ds.queries.shape[0]
    ds = ds.subset_queries(s.queries, seed=s.seed)
    nq = ds.queries.shape[0]
    with tqdm(total=nq, desc="exact ground truth", disable=not progress, leave=False) as bar:
        _, gt = ground_truth(ds, k=100, progress=bar.update)
    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = []
    if s.tqindex:
        for codec in s.codecs:
            for b in s.bits:
                jobs.append((f"tqindex {codec} {b}b", lambda c=codec, b=b: run_tqindex(ds, gt, c, b, s)))
    # PQ is sized to tqindex mse's bytes at 2..5 bits (the headline's budgets)
    budgets = sorted({_tq_code_size(ds.dim, "mse", b) for b in (2, 3, 4, 5)})
    if s.faiss:
        for spec in faiss_specs(ds.dim, ds.metric, budgets, quick=s.mode == "quick", full=s.mode == "full"):
            if s.faiss_filter and not any(f in spec.factory for f in s.faiss_filter) and spec.factory != "Flat":
                continue
            jobs.append((spec.factory, lambda spec=spec: run_faiss(ds, gt, spec, s)))
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    # Finished methods are saved as they complete, so an interrupted run can go on with --resume.
    key = {"dataset": ds.name, "queries": nq, "seed": s.seed, "mode": s.mode, "device": s.device}
    partial_path = (Path(out_dir) if out_dir is not None else CACHE_DIR) / f".partial_{name or 'recall_' + ds.name}.json"
    done: dict[str, list[dict[str, Any]]] = {}
    if s.resume and partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved.get("key") == key:
            done = saved["rows_by_label"]
    bar = tqdm(jobs, desc=f"recall {ds.name}", disable=not progress, unit="method")
    for label, job in bar:
        bar.set_postfix_str(label)
        if label in done:
            rows.extend(done[label])
            continue
        try:
            new = job()
            for r in new:
                r["machine"] = _short_machine(r.get("device", "cpu"))
            rows.extend(new)
            done[label] = new
            partial_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "rows_by_label": done}, default=str))
            os.replace(tmp, partial_path)
        except Exception as e:  # noqa: BLE001 - one method failing must not lose the others
            failures.append(f"{label}: {type(e).__name__}: {e}")
            print(f"  FAILED {label}: {type(e).__name__}: {e}")
    bar.close()
    total = time.perf_counter() - t_start
    name = name or f"recall_{ds.name}"
    merged_from: list[str] = []
    if s.merge:
        rows, merged_from = _merge(rows, Path(out_dir or RESULTS) / f"{name}.json", ds.name, nq, s)
    notes = _notes(ds, s, nq, full_nq, total, failures)
    notes += f"\n- Load average (1 min) at start/end: {load_start} / {_loadavg()} on {os.cpu_count()} CPUs " \
             "(a shared machine inflates build times and lowers QPS; recall does not depend on it)."
    if merged_from:
        notes += "\n- Merged: " + "; ".join(merged_from)
    head = headline(rows, s.bits)
    md_notes = notes + "\n\n## Headline: 10-recall@10 from codes only, per bit budget\n\n" + markdown_table(head)
    if 4 in s.reranks:
        md_notes += "\n## With exact rescoring of the top 40 (rerank 4), every method\n\n" + markdown_table(
            sorted(rerank_table(rows, 4), key=lambda x: x["B/vec (codes)"]))
    md_notes += "\n## All rows\n"
    extra = {"dataset": {"name": ds.name, "n": int(ds.base.shape[0]), "dim": ds.dim, "metric": ds.metric,
                         "queries": nq, "queries_available": full_nq, "source": ds.source, **ds.info},
             "settings": {k: v for k, v in vars(s).items() if k != "notes"},
             "headline": head, "failures": failures, "total_s": total, "notes": notes,
             "loadavg_start_end": [load_start, _loadavg()]}
    write_results(name, rows, columns=COLUMNS, notes=md_notes, extra=extra, out_dir=out_dir)
    _rewrite_md_table(out_dir, name, rows)
    plots: list[str] = []
    try:
        from bench.plots import plot_recall

        plots = [str(p) for p in plot_recall(rows, ds.name, out_dir or RESULTS, name)]
    except Exception as e:  # noqa: BLE001 - matplotlib missing must not lose the numbers
        print(f"  plots skipped: {type(e).__name__}: {e}")
    return {"rows": rows, "headline": head, "total_s": total, "plots": plots, "failures": failures}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _short_machine(device: str) -> str:
    m = machine()
    if device.startswith("cuda") and "gpu" in m:
        return f"{m['gpu']} + {m['cpus']} CPUs"
    return f"{m['cpus']} CPUs"


def _merge(rows: list[dict[str, Any]], path: Path, dataset: str, nq: int, s: Settings
           ) -> tuple[list[dict[str, Any]], list[str]]:
    """New rows + the rows of the engines not run now, from an earlier results file of the same queries."""
    if not path.is_file():
        return rows, []
    old = json.loads(path.read_text())
    od = old.get("dataset", {})
    if od.get("name") != dataset or od.get("queries") != nq or old.get("settings", {}).get("seed") != s.seed:
        raise ValueError(
            f"cannot merge into {path}: it holds {od.get('name')!r} with {od.get('queries')} queries "
            f"(seed {old.get('settings', {}).get('seed')}), this run {dataset!r} with {nq} queries (seed {s.seed}); "
            "run with the same --queries/--seed or without --merge"
        )
    ran = ({"tqindex"} if s.tqindex else set()) | ({"faiss"} if s.faiss else set())
    kept = [r for r in old["rows"] if r.get("engine") not in ran]
    if not kept:
        return rows, []
    engines = sorted({r["engine"] for r in kept})
    where = sorted({r.get("machine", "?") for r in kept})
    note = f"rows of {', '.join(engines)} kept from the run of {old.get('date')} ({', '.join(where)})"
    order = {"tqindex": 0, "faiss": 1}
    return sorted(kept + rows, key=lambda r: order.get(r["engine"], 2)), [note]


def _rewrite_md_table(out_dir: Path | None, name: str, rows: Sequence[dict[str, Any]]) -> None:
    """write_results tabulates rows as given; replace that table with the compact columns."""
    path = Path(out_dir or RESULTS) / f"{name}.md"
    text = path.read_text()
    full = markdown_table(rows, COLUMNS)
    text = text.replace(full, markdown_table(_table_rows(rows), COLUMNS))
    path.write_text(text)


def _tq_code_size(d: int, codec: str, bits: int) -> int:
    if codec == "mse":
        return math.ceil(bits * d / 8) + 4
    return math.ceil((bits - 1) * d / 8) + math.ceil(d / 8) + 8


def _notes(ds: Dataset, s: Settings, nq: int, full_nq: int, total: float, failures: list[str]) -> str:
    lines = [
        f"Data: {ds.name}, {ds.base.shape[0]:,} base vectors x {ds.dim}, metric {ds.metric}, source: {ds.source}.",
        f"Mode: {s.mode}. Queries: {nq:,} of {full_nq:,}" + (
            f" (a subset drawn with seed {s.seed}; `--full` runs all of them)." if nq < full_nq else "."),
        f"Total wall time: {total:.0f} s.",
        "",
        "How it is measured:",
        "- Each method is built once (train + add, `build_s`) and searched once for the first "
        f"{max(KS[-1], 10 * max(s.reranks, default=0))} candidates per query, codes only; `qps` is that search "
        "(all queries in one batch). recall@1@k (`r1@k`: is the true nearest neighbour among the first k) "
        "and 10-recall@10 come from those candidates.",
        "- Rescoring rows (`rerank` r > 0): the first 10·r candidates are rescored exactly against the "
        "original float32 vectors and the best 10 kept — what tqindex.Index(rerank=r) and "
        "faiss.IndexRefineFlat(k_factor=r) do. They need the originals: +4·d bytes/vector in host memory "
        "(`extra_bytes_per_vector`). " + (
            "Every tqindex rerank row is its own Index.search call (`rerank_source` measured)."
            if s.rerank_measured else
            f"tqindex rows with rerank {MEASURED_RERANK} are measured by Index.search (its QPS is shown; "
            "`derived_recall10_at10` in the JSON checks the derivation); the others, and all FAISS rerank "
            "rows, are derived from the candidate list by the same exact rescoring (`rerank_source` derived)."),
        "- Bytes/vector count every byte stored per vector: tqindex `Index.code_size` = packed indices + "
        "QJL sign bits + float32 norm (+ float32 residual norm gamma for prod); FAISS `sa_code_size()`, which "
        "includes RaBitQ's/EDEN's/TurboQuant's per-vector factors. `bytes_measured` cross-checks it: "
        "tqindex memory_usage()['codes'] / n, FAISS serialised index size / n (adds codebooks, "
        "rotations and headers amortised over n). Not counted: ids (tqindex stores 8 B/vector of int64 ids, "
        "FAISS flat-code indexes none) and per-index constants (rotation matrices, codebooks, mean vector).",
        "- FAISS training: " + (f"a random sample of {s.train_sample:,} base vectors (seed {s.seed})"
                                 if s.train_sample else "the whole base") +
        " for the methods that train (FAISS's k-means samples 65,536 points per codebook anyway). "
        "Polysemous training of IndexPQ is switched off: ADC search does not use it, and it takes minutes. "
        "PQ with M not dividing d first applies a random orthogonal map to ceil(d/M)·M dims (factory `RR<d'>`).",
        "- Cosine: FAISS gets unit-normalised vectors and inner product; tqindex gets the raw vectors with "
        "metric='cosine'. FAISS TurboQuant-MSE (`SQtqmse`) stores no norm, so it is run only on unit vectors.",
        "- On CUDA each timed tqindex search follows one untimed search of the same shape (Triton compiles "
        "its kernels per code width and shape on first use); `build_s` includes that compilation.",
        f"- tqindex device: {s.device}; FAISS on CPU"
        + (" (GPU indexes where faiss-gpu has them)" if s.device.startswith("cuda") else "") + ".",
    ]
    lines += s.notes
    if failures:
        lines += ["", "Failed methods: " + "; ".join(failures)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or '').splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="glove-50",
                   help="glove-50 | fashion-mnist | path to .hdf5 (ann-benchmarks) / .fvecs (TEXMEX) / .npy")
    p.add_argument("--metric", default=None, help="metric for a file without one: l2 | cosine | ip")
    p.add_argument("--queries", type=int, default=None, help="number of queries (default: 500 glove-50, 300 fashion-mnist, 1000 else)")
    p.add_argument("--quick", action="store_true", help="smoke run: 100 queries, bits 2/4/8, rerank 4, fewer FAISS rows")
    p.add_argument("--full", action="store_true", help="every query, FAISS trained on the whole base, "
                   "every tqindex rerank row measured (for the GPU machine)")
    p.add_argument("--device", default="cpu", help="tqindex device: cpu | cuda (default cpu)")
    p.add_argument("--bits", type=int, nargs="*", help="tqindex bits (default 2..8)")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--no-tqindex", action="store_true")
    p.add_argument("--faiss-only", nargs="*", help="keep only FAISS factories containing one of these strings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None, help=f"default {RESULTS}")
    p.add_argument("--name", default=None, help="results file stem (default recall_<dataset>)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of engines not run now (e.g. FAISS with --no-faiss) from the existing results "
                        "file; it must hold the same queries")
    p.add_argument("--resume", action="store_true",
                   help="reuse the methods that an interrupted run with the same settings finished (bench/.cache)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and FAISS (default: all)")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda given, but torch sees no CUDA device")
    if args.threads:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.metric)
    s = settings_for(args, ds)
    print(f"{ds} | mode {s.mode} | queries {s.queries or 'all'} | tqindex device {s.device} | {machine()}")
    res = run(ds, s, args.out_dir, args.name)
    print(markdown_table(res["headline"]))
    print(f"done in {res['total_s']:.0f} s -> {(args.out_dir or RESULTS)}/{args.name or 'recall_' + ds.name}.{{json,md}}"
          + "".join(f", {p}" for p in res["plots"]))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

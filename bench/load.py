"""Load test on loopback: bounded-concurrency mixed upserts and searches against a real server process.

Starts ``python -m server`` on 127.0.0.1 with a fresh data directory, preloads a collection, then for
each concurrency level sends a fixed number of requests (bounded in count and time) from asyncio
workers: a share of upserts (batches of new and replaced points, fsynced before the ack) and the
rest searches (some filtered). Reports latency percentiles and throughput per operation and every
status code seen; any 5xx or transport error is a failure.

Usage: python -m bench.load [--points 5000] [--dim 64] [--concurrency 1 4 16] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from server.process import ServerProcess

__all__ = ["run_load", "preload", "main"]

log = logging.getLogger(__name__)

COLLECTION = "load"


def _vecs(rng: np.random.Generator, n: int, dim: int) -> list[list[float]]:
    return rng.standard_normal((n, dim)).astype(np.float32).tolist()


def preload(url: str, headers: dict[str, str], n: int, dim: int, *, seed: int = 0, batch: int = 1000,
            metric: str = "cosine") -> None:
    """Create the collection and upsert ``n`` random points (payload color in red/green/blue)."""
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, headers=headers, timeout=300.0) as c:
        distance = {"cosine": "Cosine", "ip": "Dot", "l2": "Euclid"}[metric]
        # 4-bit PROD codes, rescored x4: the settings of the earlier runs, so the figures compare
        c.put(f"/collections/{COLLECTION}", json={"vectors": {"size": dim, "distance": distance}, "metadata": {
            "tqindex": {"bits": 4, "codec": "prod", "rerank": 4}}}).raise_for_status()
        for s in range(0, n, batch):
            m = min(batch, n - s)
            pts = [{"id": s + i, "vector": v, "payload": {"color": ("red", "green", "blue")[(s + i) % 3]}}
                   for i, v in enumerate(_vecs(rng, m, dim))]
            c.put(f"/collections/{COLLECTION}/points", json={"points": pts}).raise_for_status()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1000.0 if xs else float("nan")


async def _run(url: str, headers: dict[str, str], *, concurrency: int, requests: int, dim: int, n0: int,
               upsert_share: float, batch: int, k: int, seed: int, max_seconds: float) -> dict[str, Any]:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    lat: dict[str, list[float]] = {"upsert": [], "search": [], "filtered_search": []}
    codes: Counter[str] = Counter()
    errors: list[str] = []
    next_id = [n0 + seed * 10_000_000]
    todo = [requests]
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while todo[0] > 0 and time.perf_counter() < deadline:
            todo[0] -= 1
            r = rng.random()
            if r < upsert_share:
                op = "upsert"
                ids = [rng.randrange(n0) for _ in range(batch // 2)] if n0 else []  # replace some existing points
                ids = list(dict.fromkeys(ids)) + list(range(next_id[0], next_id[0] + batch - len(set(ids))))
                next_id[0] += batch
                pts = [{"id": i, "vector": v, "payload": {"color": "red"}} for i, v in zip(ids, _vecs(nprng, len(ids), dim))]
                req = ("PUT", f"/collections/{COLLECTION}/points", {"points": pts})
            else:
                filtered = r > 1 - (1 - upsert_share) * 0.2
                op = "filtered_search" if filtered else "search"
                body: dict[str, Any] = {"query": _vecs(nprng, 1, dim)[0], "limit": k}
                if filtered:
                    body["filter"] = {"must": [{"key": "color", "match": {"value": "green"}}]}
                req = ("POST", f"/collections/{COLLECTION}/points/query", body)
            t0 = time.perf_counter()
            try:
                resp = await client.request(req[0], req[1], json=req[2])
            except httpx.HTTPError as e:
                errors.append(f"{op}: {type(e).__name__}: {e}")
                codes["transport_error"] += 1
                continue
            dt = time.perf_counter() - t0
            codes[str(resp.status_code)] += 1
            if resp.status_code == 200:
                lat[op].append(dt)
                if op != "upsert" and len(resp.json()["result"]["points"]) != k:
                    errors.append(f"{op}: {len(resp.json()['result']['points'])} hits, expected {k}")
            elif len(errors) < 20:
                errors.append(f"{op}: HTTP {resp.status_code} {resp.text[:200]}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    rows = []
    for op, xs in lat.items():
        rows.append({"concurrency": concurrency, "op": op, "count": len(xs), "per_s": len(xs) / wall,
                     "p50_ms": _pct(xs, 50), "p90_ms": _pct(xs, 90), "p99_ms": _pct(xs, 99),
                     "max_ms": max(xs) * 1000.0 if xs else float("nan")})
    done = sum(len(x) for x in lat.values())
    return {"rows": rows, "codes": dict(codes), "errors": errors, "wall_s": wall, "total_per_s": done / wall,
            "n5xx": sum(v for c, v in codes.items() if c.startswith("5")) + codes.get("transport_error", 0)}


def run_load(url: str, headers: dict[str, str], *, concurrency: int = 8, requests: int = 500, dim: int = 64,
             n0: int = 0, upsert_share: float = 0.2, batch: int = 10, k: int = 10, seed: int = 0,
             max_seconds: float = 120.0) -> dict[str, Any]:
    """One load phase against a preloaded collection of ``n0`` points (ids 0..n0-1); see the module doc."""
    return asyncio.run(_run(url, headers, concurrency=concurrency, requests=requests, dim=dim, n0=n0,
                            upsert_share=upsert_share, batch=batch, k=k, seed=seed, max_seconds=max_seconds))


def _device() -> str:
    try:
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    p.add_argument("--upsert-share", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=10, help="points per upsert")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=150.0, help="time cap per concurrency level")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--note", default="", help="appended to the result's notes (e.g. what else ran on the machine)")
    p.add_argument("--name", default="load", help="results file name (default load)")
    ns = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bench.common import write_results

    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"phases": []}
    with tempfile.TemporaryDirectory(prefix="tqindex-load-") as tmp:
        with ServerProcess(Path(tmp) / "data") as srv:
            t0 = time.perf_counter()
            preload(srv.url, srv.headers(), ns.points, ns.dim, seed=ns.seed)
            extra["preload_s"] = round(time.perf_counter() - t0, 2)
            for i, c in enumerate(ns.concurrency):
                res = run_load(srv.url, srv.headers(), concurrency=c, requests=ns.requests, dim=ns.dim, n0=ns.points,
                               upsert_share=ns.upsert_share, batch=ns.batch, k=ns.k, seed=ns.seed + 1 + i,
                               max_seconds=ns.max_seconds)
                rows += res["rows"]
                extra["phases"].append({"concurrency": c, "codes": res["codes"], "errors": res["errors"][:10],
                                        "wall_s": round(res["wall_s"], 2), "total_per_s": round(res["total_per_s"], 1),
                                        "n5xx": res["n5xx"]})
                log.info("concurrency %d: %s", c, extra["phases"][-1])
            extra["device"] = _device()
            extra["server_points_after"] = httpx.get(f"{srv.url}/collections/{COLLECTION}",
                                                     headers=srv.headers()).json()["result"]["points_count"]
    n5xx = sum(ph["n5xx"] for ph in extra["phases"])
    extra["n5xx"] = n5xx
    notes = (f"Loopback, server and client on the same {os.cpu_count()}-CPU machine (index device: "
             f"{extra['device']}), Qdrant routes (PUT .../points, POST .../points/query). Collection of "
             f"{ns.points} x {ns.dim}-d cosine points (4-bit prod codes, rerank 4), k={ns.k}; {ns.requests} requests "
             f"per concurrency level, {ns.upsert_share:.0%} upserts of {ns.batch} points (half replacing existing "
             f"ids; each fsynced before the ack), the rest searches (20% of them filtered on a payload field "
             f"matching 1/3 of the points). Preload {extra['preload_s']} s. 5xx responses or transport errors: {n5xx}. "
             f"Status codes: {[ph['codes'] for ph in extra['phases']]}." + (f" {ns.note}" if ns.note else ""))
    write_results(ns.name, rows, notes=notes, extra=extra, out_dir=ns.out)
    log.info("%s", notes)
    return 1 if n5xx else 0


if __name__ == "__main__":
    raise SystemExit(main())

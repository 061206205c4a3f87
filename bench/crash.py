"""Crash test: stream upserts/deletes, SIGKILL the server at random moments, restart, check every acked write.

Each cycle: start the server (recovery = snapshot + log replay), verify the whole collection against the
model of acknowledged writes, then let writer threads stream operations while another thread asks for
snapshots, and SIGKILL the server after a random delay. Checked after every restart:

- missing: an acknowledged point (or its acknowledged version) is absent;
- phantom: a point exists that no write (acknowledged or in flight) could have produced;
- duplicate: an id listed twice, or the point count disagrees with the listing;
- wrong payload / vector: a point's payload or vector is not the one of an allowed version;
- torn: an operation in flight at the kill was applied to only part of its batch.

Every third id is sent as a UUID (``uuid.UUID(int=id)``), so the UUID mapping is replayed too; a
delete is by id list or by a ``has_id`` filter (evaluated when its log record is applied).

Usage: python -m bench.crash [--cycles 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from server.process import ServerProcess

__all__ = ["run_crash_test", "main"]

log = logging.getLogger(__name__)

COLLECTION = "crash"
ABSENT = -1  # version of a deleted / never written point


def vector(pid: int, version: int, dim: int) -> list[float]:
    """The deterministic float32 vector of (id, version), as Python floats (exact in JSON)."""
    rng = np.random.default_rng([pid, version])
    return rng.standard_normal(dim).astype(np.float32).tolist()


def external(pid: int) -> int | str:
    """The id sent for model id ``pid``: every third one as a UUID."""
    return str(uuid.UUID(int=pid)) if pid % 3 == 0 else pid


def model_id(ext: int | str) -> int:
    return uuid.UUID(ext).int if isinstance(ext, str) else ext


def payload(pid: int, version: int, writer: int) -> dict[str, Any]:
    return {"v": version, "w": writer, "color": ("red", "green", "blue")[(pid + version) % 3], "tags": [pid % 7]}


@dataclass
class Writer:
    """A writer thread's state: it owns ids ``id ≡ index (mod writers)``; at most one op in flight."""

    index: int
    acked: dict[int, int] = field(default_factory=dict)  # id -> acknowledged version (ABSENT if deleted)
    in_flight: dict[int, int] | None = None  # id -> version it would have after the in-flight op
    next_new: int = 0
    ops_acked: int = 0
    points_acked: int = 0


def _writer_loop(w: Writer, url: str, headers: dict[str, str], dim: int, nwriters: int,
                 stop: threading.Event, rng: random.Random) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        while not stop.is_set():
            present = [i for i, v in w.acked.items() if v != ABSENT]
            r = rng.random()
            if r < 0.1 and present:  # delete some existing points
                ids = rng.sample(present, min(len(present), rng.randint(1, 5)))
                change = {i: ABSENT for i in ids}
                sel = [external(i) for i in ids]
                body = {"points": sel} if rng.random() < 0.5 else {"filter": {"must": [{"has_id": sel}]}}
                req = ("POST", f"/collections/{COLLECTION}/points/delete", body)
            else:
                n = rng.randint(1, 20)
                ids = []
                if r < 0.4 and present:  # overwrite some existing points with a new version
                    ids = rng.sample(present, min(len(present), n // 2 + 1))
                while len(ids) < n:
                    ids.append(w.next_new * nwriters + w.index)
                    w.next_new += 1
                # An existing point gets its next version; a new id (never used before) version 1.
                change = {i: w.acked[i] + 1 if i in w.acked else 1 for i in ids}
                pts = [{"id": external(i), "vector": vector(i, v, dim), "payload": payload(i, v, w.index)}
                       for i, v in change.items()]
                req = ("PUT", f"/collections/{COLLECTION}/points", {"points": pts})
            w.in_flight = change
            try:
                resp = client.request(req[0], req[1], json=req[2])
            except httpx.HTTPError:
                return  # the server died: the op stays in flight (applied or not)
            if resp.status_code != 200:
                raise AssertionError(f"writer {w.index}: {req[0]} {req[1]} -> {resp.status_code} {resp.text[:300]}")
            w.acked.update(change)
            w.in_flight = None
            w.ops_acked += 1
            w.points_acked += len(change)


def _snapshotter(url: str, headers: dict[str, str], stop: threading.Event, rng: random.Random) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        while not stop.wait(rng.uniform(0.3, 1.5)):
            try:
                client.post(f"/collections/{COLLECTION}/snapshots")
            except httpx.HTTPError:
                return


def _fetch_all(client: httpx.Client) -> list[dict[str, Any]]:
    pts: list[dict[str, Any]] = []
    offset = None
    while True:
        r = client.post(f"/collections/{COLLECTION}/points/scroll",
                        json={"offset": offset, "limit": 5000, "with_payload": True, "with_vector": True})
        r.raise_for_status()
        res = r.json()["result"]
        pts += res["points"]
        offset = res["next_page_offset"]
        if offset is None:
            return pts


def verify(url: str, headers: dict[str, str], writers: list[Writer], dim: int) -> dict[str, Any]:
    """Compare the server's points with the writers' models; resolve in-flight ops to what was found."""
    problems: dict[str, list[Any]] = {"missing": [], "phantom": [], "duplicate": [], "wrong_payload": [],
                                      "wrong_vector": [], "torn": []}
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
        pts = _fetch_all(client)
        count = client.get(f"/collections/{COLLECTION}").json()["result"]["points_count"]
        found: dict[int, dict[str, Any]] = {}
        for p in pts:
            pid = model_id(p["id"])
            if pid in found or external(pid) != p["id"]:
                problems["duplicate"].append(p["id"])
            found[pid] = p
        if count != len(pts):
            problems["duplicate"].append(f"collection reports {count} points, scroll listed {len(pts)}")
        nw = len(writers)
        in_flight_applied = 0
        for w in writers:
            flight = w.in_flight or {}
            applied = 0
            for pid, v in flight.items():
                p = found.get(pid)
                seen = p["payload"]["v"] if p is not None else ABSENT
                if seen == v and v != w.acked.get(pid, ABSENT):
                    applied += 1
            if flight and applied not in (0, len(flight)):
                problems["torn"].append(f"writer {w.index}: {applied} of {len(flight)} points of the in-flight op applied")
            if flight and applied == len(flight):
                in_flight_applied += 1
                w.acked.update(flight)
                w.points_acked += len(flight)
            w.in_flight = None
        for pid, p in found.items():
            w = writers[pid % nw]
            v = w.acked.get(pid, ABSENT)
            if v == ABSENT:
                problems["phantom"].append(pid)
                continue
            if p["payload"] != payload(pid, v, w.index):
                problems["wrong_payload"].append((pid, p["payload"], v))
            if p.get("vector") != vector(pid, v, dim):
                problems["wrong_vector"].append(pid)
        for w in writers:
            for pid, v in w.acked.items():
                if v != ABSENT and pid not in found:
                    problems["missing"].append(pid)
        # The index agrees with the listing: a search returns only listed ids, min(k, n) of them.
        if found:
            k = min(50, len(found))
            q = vector(next(iter(found)), 0, dim)
            r = client.post(f"/collections/{COLLECTION}/points/query", json={"query": q, "limit": k})
            r.raise_for_status()
            hits = [model_id(h["id"]) for h in r.json()["result"]["points"]]
            if len(hits) != k or not set(hits) <= set(found):
                problems["phantom"].append(f"search returned {len(hits)} hits (expected {k}), "
                                           f"unlisted ids {sorted(set(hits) - set(found))[:5]}")
    return {"points": len(found), "in_flight_applied": in_flight_applied,
            **{k: len(v) for k, v in problems.items()}, "examples": {k: v[:5] for k, v in problems.items() if v}}


def run_crash_test(cycles: int, *, seed: int = 0, dim: int = 16, nwriters: int = 2, min_run: float = 0.3,
                   max_run: float = 1.5, snapshot_wal_bytes: int = 32 * 1024, work_dir: str | Path | None = None,
                   api_key: str | None = None, index: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``cycles`` kill/restart cycles; one row per cycle (see the module docstring for the checks).

    The last row is the verification after the final restart (no writes, no kill). ``index`` is the
    collection's "index" config (e.g. an ivf one, which switches from flat to trained lists mid-run).
    """
    rng = random.Random(seed)
    tmp = tempfile.TemporaryDirectory(prefix="tqindex-crash-") if work_dir is None else None
    root = Path(work_dir or tmp.name)  # type: ignore[union-attr]
    data = root / "data"
    writers = [Writer(i) for i in range(nwriters)]
    rows: list[dict[str, Any]] = []
    args = ["--snapshot-wal-bytes", str(snapshot_wal_bytes)]
    try:
        for cycle in range(cycles + 1):
            srv = ServerProcess(data, api_key=api_key, args=args, log_path=root / "server.log").start()
            headers = srv.headers()
            try:
                if cycle == 0:
                    tq: dict[str, Any] = {"bits": 4}
                    if index is not None:
                        tq["index"] = index
                    spec = {"vectors": {"size": dim, "distance": "Euclid"}, "metadata": {"tqindex": tq}}
                    r = httpx.put(f"{srv.url}/collections/{COLLECTION}", headers=headers, json=spec)
                    r.raise_for_status()
                ready = httpx.get(f"{srv.url}/readyz").json()["result"]
                check = verify(srv.url, headers, writers, dim)
                row: dict[str, Any] = {"cycle": cycle, "start_s": round(srv.startup_s, 3),
                                       "recovery_s": ready["recovery_s"], **check}
                if cycle == cycles:
                    rows.append(row)
                    break
                stop = threading.Event()
                threads = [threading.Thread(target=_writer_loop, args=(w, srv.url, headers, dim, nwriters, stop,
                                                                       random.Random(rng.random())), daemon=True)
                           for w in writers]
                threads.append(threading.Thread(target=_snapshotter, args=(srv.url, headers, stop,
                                                                           random.Random(rng.random())), daemon=True))
                before = sum(w.ops_acked for w in writers)
                for t in threads:
                    t.start()
                run_s = rng.uniform(min_run, max_run)
                time.sleep(run_s)
                srv.kill()
                stop.set()
                for t in threads:
                    t.join(60)
                row.update(run_s=round(run_s, 3), ops_acked=sum(w.ops_acked for w in writers) - before,
                           in_flight=sum(1 for w in writers if w.in_flight))
                rows.append(row)
                log.info("cycle %d: %s", cycle, row)
            finally:
                srv.kill()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def failures(rows: list[dict[str, Any]]) -> int:
    keys = ("missing", "phantom", "duplicate", "wrong_payload", "wrong_vector", "torn")
    return sum(int(r[k]) for r in rows for k in keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--ivf", type=int, default=0, metavar="NLIST",
                   help="an ivf collection of NLIST lists, trained at 100 * NLIST points (results: crash_ivf)")
    ns = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bench.common import write_results

    t0 = time.perf_counter()
    index = None
    if ns.ivf:
        index = {"type": "ivf", "nlist": ns.ivf, "nprobe": max(1, ns.ivf // 4), "train_at": 100 * ns.ivf}
    rows = run_crash_test(ns.cycles, seed=ns.seed, dim=ns.dim, index=index)
    wall = time.perf_counter() - t0
    bad = failures(rows)
    work = rows[:-1]
    summary = {
        "cycles": ns.cycles, "seed": ns.seed, "wall_s": round(wall, 1), "failures": bad,
        "ops_acked": sum(r["ops_acked"] for r in work),
        "points_final": rows[-1]["points"],
        "in_flight_at_kill": sum(r["in_flight"] for r in work),
        "in_flight_applied": sum(r["in_flight_applied"] for r in rows[1:]),
        "recovery_s_median": float(np.median([r["recovery_s"] for r in rows])),
        "recovery_s_max": max(r["recovery_s"] for r in rows),
        "start_s_median": float(np.median([r["start_s"] for r in rows])),
    }
    cols = ["cycle", "run_s", "ops_acked", "in_flight", "in_flight_applied", "points", "start_s", "recovery_s",
            "missing", "phantom", "duplicate", "wrong_payload", "wrong_vector", "torn"]
    for r in rows:
        if not r.get("examples"):
            r.pop("examples", None)
    kind = f"An ivf collection ({index}). " if index else ""
    notes = (f"{kind}{ns.cycles} SIGKILL cycles, {summary['ops_acked']} acknowledged operations, "
             f"{summary['in_flight_at_kill']} in flight at a kill ({summary['in_flight_applied']} of them found applied), "
             f"{bad} violations (missing / phantom / duplicate / wrong payload / wrong vector / torn). "
             f"Recovery (snapshot load + log replay) median {summary['recovery_s_median']:.3f} s, "
             f"max {summary['recovery_s_max']:.3f} s; process start to /readyz 200 (Python + torch import "
             f"included) median {summary['start_s_median']:.1f} s. Wall {summary['wall_s']} s.")
    write_results("crash_ivf" if index else "crash", rows, columns=cols, notes=notes, extra={"summary": summary},
                  out_dir=ns.out)
    log.info("%s", notes)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

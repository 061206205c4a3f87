"""Prometheus metrics in the text exposition format: request counts, latency histograms, collection sizes."""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Iterable

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in kw.items()) + "}"


class Metrics:
    """Thread-safe request counters and latency histograms, rendered with per-collection gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = {}
        self._hist: dict[tuple[str, str], list[float]] = {}  # per bucket counts + [sum, count]

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one finished request; ``route`` is the route template (bounded cardinality)."""
        with self._lock:
            key = (method, route, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            h = self._hist.get((method, route))
            if h is None:
                h = self._hist[(method, route)] = [0.0] * (len(BUCKETS) + 2)
            i = bisect_left(BUCKETS, seconds)
            if i < len(BUCKETS):
                h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self, collections: Iterable[dict[str, object]]) -> str:
        """The exposition text; ``collections`` yields dicts with name, points, bytes_* and wal_bytes."""
        out = [
            "# HELP tqindex_requests_total HTTP requests by method, route template and status code.",
            "# TYPE tqindex_requests_total counter",
        ]
        with self._lock:
            reqs = sorted(self._requests.items())
            hist = sorted((k, list(v)) for k, v in self._hist.items())
        for (m, r, s), n in reqs:
            out.append(f"tqindex_requests_total{_labels(method=m, route=r, status=s)} {n}")
        out += ["# HELP tqindex_request_duration_seconds Request latency by method and route template.",
                "# TYPE tqindex_request_duration_seconds histogram"]
        for (m, r), h in hist:
            cum = 0.0
            for b, c in zip(BUCKETS, h):
                cum += c
                out.append(f"tqindex_request_duration_seconds_bucket{_labels(method=m, route=r, le=repr(b))} {int(cum)}")
            out.append(f"tqindex_request_duration_seconds_bucket{_labels(method=m, route=r, le='+Inf')} {int(h[-1])}")
            out.append(f"tqindex_request_duration_seconds_sum{_labels(method=m, route=r)} {h[-2]!r}")
            out.append(f"tqindex_request_duration_seconds_count{_labels(method=m, route=r)} {int(h[-1])}")
        cols = list(collections)
        gauges = [
            ("tqindex_collection_points", "Points stored in a collection.", "points"),
            ("tqindex_collection_wal_bytes", "Bytes in a collection's write-ahead log.", "wal_bytes"),
        ]
        for name, help_, key in gauges:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            out += [f"{name}{_labels(collection=c['name'])} {c[key]}" for c in cols]
        out += ["# HELP tqindex_collection_bytes Bytes held by a collection, by kind (codes, originals, ids, payloads).",
                "# TYPE tqindex_collection_bytes gauge"]
        for c in cols:
            for kind, v in c["bytes"].items():  # type: ignore[union-attr]
                out.append(f"tqindex_collection_bytes{_labels(collection=c['name'], kind=kind)} {v}")
        return "\n".join(out) + "\n"

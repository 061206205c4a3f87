"""Server settings: a dataclass, its command-line arguments and environment-variable defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["Settings", "add_arguments", "settings_from_args"]


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with.

    Attributes:
        data_dir: where collections, logs and snapshots live.
        host, port: where uvicorn listens.
        api_key: if set, every route except /healthz and /readyz needs header ``api-key: KEY``.
        max_body_bytes: largest request body accepted (413 above it).
        max_batch: most points per upsert, ids per get/delete, queries per search (413 above it).
        max_k: largest k of a search.
        max_dim: largest vector dimension of a collection (each collection holds a dim x dim float32
            rotation, and creating it runs a QR of that size: memory and time grow as dim^2 and dim^3).
        max_rerank: largest rescoring factor of a search or collection.
        max_results: most hits one search request may ask for (queries x k; 413 above it).
        max_response_bytes: largest answer (413 when a request would need more: fewer results,
            vectors or payloads then).
        max_payload_depth: deepest nesting of a point's payload (objects and arrays).
        max_payload_bytes: largest payload of one point, as compact JSON.
        snapshot_wal_bytes: a snapshot is taken in the background once a collection's log exceeds
            this many bytes (0: only on request).
        fsync: fsync the log before acknowledging (disable only for throw-away data).
        device: torch device of the indexes (default: CUDA if available, else CPU).
        log_level: uvicorn / logging level.
    """

    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 6333
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch: int = 10_000
    max_k: int = 10_000
    max_dim: int = 4096  # a collection's dense rotation holds dim^2 floats: 64 MiB at 4096, 16 GiB at 65,536
    max_rerank: int = 100
    max_results: int = 100_000
    max_response_bytes: int = 256 * 1024 * 1024
    max_payload_depth: int = 32
    max_payload_bytes: int = 1024 * 1024
    snapshot_wal_bytes: int = 64 * 1024 * 1024
    fsync: bool = True
    device: str | None = None
    log_level: str = "info"


def _env(name: str) -> str | None:
    v = os.environ.get(f"TQINDEX_{name.upper()}")
    return v if v not in (None, "") else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the server's options to ``p``; each defaults to env TQINDEX_<NAME> or the dataclass default."""
    d = Settings()

    def dflt(name: str) -> Any:
        e = _env(name)
        return e if e is not None else getattr(d, name)

    p.add_argument("--host", default=dflt("host"), help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=int(dflt("port")), help="TCP port (default %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path(dflt("data_dir")), help="data directory (default %(default)s)")
    p.add_argument("--api-key", default=dflt("api_key"), help="require header 'api-key: KEY' (env TQINDEX_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=int(dflt("max_body_bytes")))
    p.add_argument("--max-batch", type=int, default=int(dflt("max_batch")))
    p.add_argument("--max-k", type=int, default=int(dflt("max_k")))
    p.add_argument("--max-dim", type=int, default=int(dflt("max_dim")))
    p.add_argument("--max-rerank", type=int, default=int(dflt("max_rerank")))
    p.add_argument("--max-results", type=int, default=int(dflt("max_results")),
                   help="most hits (queries x k) one search may ask for (default %(default)s)")
    p.add_argument("--max-response-bytes", type=int, default=int(dflt("max_response_bytes")),
                   help="largest answer in bytes (default %(default)s)")
    p.add_argument("--max-payload-depth", type=int, default=int(dflt("max_payload_depth")),
                   help="deepest nesting of a payload (default %(default)s)")
    p.add_argument("--max-payload-bytes", type=int, default=int(dflt("max_payload_bytes")),
                   help="largest payload of one point as JSON (default %(default)s)")
    p.add_argument("--snapshot-wal-bytes", type=int, default=int(dflt("snapshot_wal_bytes")),
                   help="snapshot a collection once its log exceeds this size (0: only on request)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="do not fsync the log before acknowledging (unsafe: for throw-away data only)")
    p.add_argument("--device", default=dflt("device"), help="torch device of the indexes (default: cuda if available)")
    p.add_argument("--log-level", default=dflt("log_level"), choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Parsed arguments -> Settings (ValueError for a limit that is not positive)."""
    kw = {f.name: getattr(ns, f.name) for f in fields(Settings) if hasattr(ns, f.name)}
    s = Settings(**kw)
    for name in ("max_body_bytes", "max_batch", "max_k", "max_dim", "max_rerank", "max_results",
                 "max_response_bytes", "max_payload_depth", "max_payload_bytes"):
        if getattr(s, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(s, name)}")
    if s.max_payload_depth > 500:
        raise ValueError(f"--max-payload-depth must be <= 500 (deeper JSON cannot be encoded back), got "
                         f"{s.max_payload_depth}")
    if s.snapshot_wal_bytes < 0:
        raise ValueError(f"--snapshot-wal-bytes must be >= 0, got {s.snapshot_wal_bytes}")
    if not 0 < s.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {s.port}")
    return s

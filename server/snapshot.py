"""Snapshots of a collection: the index, its payloads and the log position they cover, written atomically.

Layout under ``<collection>/snapshots/``::

    snap-<lsn, 20 digits>/      a complete snapshot covering every log record with lsn <= <lsn>
        index/                  tqindex.Index.save
        payloads.jsonl          one ``[id, payload]`` JSON line per point, ascending internal id
        ids.json                the UUID mapping (server.ids.PointIds.to_json; format 2 on)
        meta.json               {"format": 2, "lsn", "points", "created"}
    .tmp-<...>/                 a snapshot being written: ignored and removed at start

A snapshot is written under a temporary name, every file and directory in it fsynced, then renamed
into place and the parent directory fsynced: the rename is the commit point, so a snapshot directory
with a ``snap-`` name is always complete. Only then are older snapshots removed and the log truncated.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.fsutil import fsync_dir, fsync_tree, remove_tree
from server.ids import UUID_BASE, PointIds
from server.payloads import PayloadStore

__all__ = ["SnapshotInfo", "write_snapshot", "latest_snapshot", "read_snapshot", "clean_snapshots", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = 2
READS = (1, 2)  # format 1: no ids.json (integer ids only)
PREFIX = "snap-"


@dataclass(frozen=True)
class SnapshotInfo:
    """A committed snapshot: its directory, the last log record it covers, its point count."""

    path: Path
    lsn: int
    points: int
    created: float

    @property
    def name(self) -> str:
        return self.path.name

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "lsn": self.lsn, "points": self.points,
                "creation_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
                "size": self.size()}


def _snap_name(lsn: int) -> str:
    return f"{PREFIX}{lsn:020d}"


def write_snapshot(root: Path, index: Any, payloads: PayloadStore, ids: PointIds, lsn: int) -> SnapshotInfo:
    """Write a snapshot of (index, payloads, id mapping) covering log records up to ``lsn``; returns it once durable.

    The caller must keep both unchanged meanwhile (it holds the collection's writer mutex).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / _snap_name(lsn)
    if final.exists():
        raise FileExistsError(f"snapshot {final} already exists; expected a new lsn")
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        index.save(tmp / "index")
        with open(tmp / "payloads.jsonl", "wb") as f:
            for line in payloads.dump_lines():
                f.write(line)
        (tmp / "ids.json").write_text(json.dumps(ids.to_json(), separators=(",", ":")))
        created = time.time()
        meta = {"format": FORMAT, "lsn": lsn, "points": len(payloads), "created": created}
        (tmp / "meta.json").write_text(json.dumps(meta))
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        remove_tree(tmp)
        raise
    return SnapshotInfo(final, lsn, len(payloads), created)


def _list(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_snapshot(root: Path) -> SnapshotInfo | None:
    """The newest committed snapshot under ``root``, or None."""
    snaps = _list(root)
    if not snaps:
        return None
    p = snaps[-1]
    meta = json.loads((p / "meta.json").read_text())
    if meta.get("format") not in READS:
        raise ValueError(f"snapshot {p} has format {meta.get('format')!r}; this server reads formats {list(READS)}")
    return SnapshotInfo(p, int(meta["lsn"]), int(meta["points"]), float(meta["created"]))


def read_snapshot(info: SnapshotInfo, device: str | None) -> tuple[Any, PayloadStore, PointIds]:
    """Load (index, payloads, id mapping) of a snapshot."""
    from tqindex import Index

    index = Index.load(info.path / "index", device=device)
    with open(info.path / "payloads.jsonl", "rb") as f:
        payloads = PayloadStore.from_lines(f)
    if len(index) != len(payloads) or len(payloads) != info.points:
        raise ValueError(f"snapshot {info.path} holds {len(index)} vectors and {len(payloads)} payloads; "
                         f"expected {info.points} of each")
    ids_file = info.path / "ids.json"
    ids = PointIds.from_json(json.loads(ids_file.read_text())) if ids_file.exists() else PointIds()
    uuid_points = int((payloads.sorted_ids() >= UUID_BASE).sum())
    if uuid_points != len(ids):
        raise ValueError(f"snapshot {info.path} holds {uuid_points} UUID points but {len(ids)} UUIDs in its "
                         f"{'ids.json' if ids_file.exists() else 'missing ids.json'}; expected equal counts")
    return index, payloads, ids


def clean_snapshots(root: Path, keep: SnapshotInfo | None) -> None:
    """Remove unfinished temporary snapshots and every committed one older than ``keep``."""
    if not root.is_dir():
        return
    removed = False
    for p in root.iterdir():
        if p.name.startswith(".tmp-") or (p.name.startswith(PREFIX) and keep is not None and p.name < keep.name):
            remove_tree(p)
            removed = True
    if removed:
        fsync_dir(root)

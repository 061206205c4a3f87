"""Collection: one tqindex index with its payloads, id mapping, write-ahead log and snapshots, thread-safe.

Write path (upsert, delete, payload update): validated request -> queued -> log record appended and fsynced -> applied
in memory under the exclusive lock -> acknowledged; concurrent writers share one fsync and one
exclusive section (group commit). Read path (search, get, scroll, count): shared lock, so a reader sees
a write either completely or not at all. Mutations and snapshots are serialised by a writer mutex;
readers keep running while a snapshot is written.

Directory ``<data>/collections/<name>/``: ``config.json`` (the CollectionSpec), ``wal.log``,
``snapshots/``. Recovery = newest snapshot + replay of the log records after its lsn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.config import Settings
from server.errors import ApiError
from server.filters import Filter, matching
from server.fsutil import fsync_dir, fsync_file
from server.ids import PointId, PointIds, external_json
from server.ops import Delete, Op, PayloadUpdate, Upsert, as_point_ids, decode_op, encode_op
from server.payloads import PayloadStore
from server.requests import PayloadRequest, PayloadSelector, SearchRequest, Selector, UpsertRequest
from server.rwlock import RWLock
from server.snapshot import SnapshotInfo, clean_snapshots, latest_snapshot, read_snapshot, write_snapshot
from server.validation import QDRANT_DISTANCE, CollectionSpec
from server.wal import WriteAheadLog

__all__ = ["Collection"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
WAL = "wal.log"
SNAPSHOTS = "snapshots"


def _new_index(spec: CollectionSpec, device: str | None) -> Any:
    """A new collection's index: flat, also for an ivf collection until it has ``train_at`` points."""
    from tqindex import Index

    return Index(spec.dim, device=device, keep_originals=True, **spec.index_kwargs())


def _to_ivf(spec: CollectionSpec, flat: Any, device: str | None) -> Any:
    """The IVF index of an ivf collection, trained on (and holding) every point of its flat index.

    Deterministic for the same points (seeded k-means), so a log replay converts at the same record
    and to the same lists as the live server did."""
    from tqindex import IVFIndex

    ix = spec.index_spec
    ivf = IVFIndex(spec.dim, ix["nlist"], nprobe=ix["nprobe"], device=device, keep_originals=True,
                   **spec.index_kwargs())
    ids = np.sort(flat.ids)  # a fixed order: the same training sample whatever the slot order
    x = flat.reconstruct_batch(ids)  # the originals (normalised for cosine, as the IVF index stores them)
    ivf.train(x)
    ivf.add_with_ids(x, ids)
    return ivf


@dataclass
class _Pending:
    """A queued mutation and its log body (encoded by its own writer): set done with its lsn and count
    (points upserted / removed), or an error."""

    op: Op
    body: bytes
    done: bool = False
    lsn: int = 0
    count: int = 0
    error: Exception | None = None


class Collection:
    """A named collection; build with :meth:`create` (new) or :meth:`open` (recovery)."""

    def __init__(self, spec: CollectionSpec, path: Path, settings: Settings, index: Any,
                 payloads: PayloadStore, ids: PointIds, wal: WriteAheadLog, lsn: int,
                 snapshot: SnapshotInfo | None, executor: Executor | None) -> None:
        self.spec = spec
        self.path = path
        self.settings = settings
        self.index = index
        self.payloads = payloads  # by internal id
        self.ids = ids  # external (int / UUID) <-> internal ids
        self.wal = wal
        self.lsn = lsn
        self.last_snapshot = snapshot
        self._executor = executor
        self._wmutex = threading.Lock()
        self._qlock = threading.Lock()
        self._queue: list[_Pending] = []
        self._rw = RWLock()
        self._closed = False
        self._failed: str | None = None
        self._snapshot_scheduled = False

    # -- life cycle -------------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: CollectionSpec, root: Path, settings: Settings, executor: Executor | None = None) -> "Collection":
        """Create the collection's directory under ``root`` atomically (temp dir + rename + fsync)."""
        index = _new_index(spec, settings.device)  # fails (ValueError) before anything is written
        final = root / spec.name
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        (tmp / SNAPSHOTS).mkdir()
        (tmp / CONFIG).write_text(json.dumps(spec.to_json()))
        fsync_file(tmp / CONFIG)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
        wal = WriteAheadLog(final / WAL, sync=settings.fsync)
        wal.open()
        return cls(spec, final, settings, index, PayloadStore(), PointIds(), wal, 0, None, executor)

    @classmethod
    def open(cls, path: Path, settings: Settings, executor: Executor | None = None) -> "Collection":
        """Recover a collection: newest snapshot, then replay of the log after it."""
        raw = json.loads((path / CONFIG).read_text())
        spec = CollectionSpec.from_json(raw)
        snaps = path / SNAPSHOTS
        snap = latest_snapshot(snaps)
        clean_snapshots(snaps, snap)
        if snap is not None:
            index, payloads, ids = read_snapshot(snap, settings.device)
            lsn = snap.lsn
        else:
            index, payloads, ids, lsn = _new_index(spec, settings.device), PayloadStore(), PointIds(), 0
        wal = WriteAheadLog(path / WAL, sync=settings.fsync)
        records = wal.open()
        coll = cls(spec, path, settings, index, payloads, ids, wal, lsn, snap, executor)
        replayed = 0
        for rec in records:
            if rec.lsn <= lsn:
                continue  # already in the snapshot (crash between snapshot and log truncation)
            try:
                coll._apply(decode_op(rec.body))
            except Exception as e:
                # Quarantine this collection alone: it serves reads of the state before the record,
                # refuses writes, and can be deleted; the rest of the server is not affected.
                coll._failed = f"replaying log record {rec.lsn} failed: {type(e).__name__}: {e}"
                log.error("collection %s quarantined: %s", spec.name, coll._failed)
                break
            coll.lsn = rec.lsn
            replayed += 1
        if len(coll.index) != len(payloads):  # coll.index: an ivf collection may have switched index in replay
            raise RuntimeError(f"collection {spec.name}: {len(coll.index)} vectors but {len(payloads)} payloads after "
                               "recovery; expected equal counts")
        log.info("collection %s: %d points (snapshot lsn %d + %d log records replayed)",
                 spec.name, len(payloads), snap.lsn if snap else 0, replayed)
        coll._maybe_schedule_snapshot()
        return coll

    def close(self) -> None:
        """Stop serving: later calls raise 404; the log is closed."""
        with self._wmutex, self._rw.write():
            self._closed = True
            self.wal.close()

    @property
    def quarantined(self) -> str | None:
        """Why writes are refused (a logged operation could not be applied), or None."""
        return self._failed

    def _check_open(self, *, write: bool = False) -> None:
        if self._closed:
            raise ApiError(404, f"collection {self.spec.name!r} does not exist (it was deleted)")
        if write and self._failed:
            raise ApiError(503, f"collection {self.spec.name!r} is quarantined and refuses writes: {self._failed}; "
                                "reads serve the state before that operation; DELETE the collection to drop it")

    # -- writes -----------------------------------------------------------------------------------
    def _targets(self, ids: Any, flt: Filter | None) -> list[int]:
        """Internal ids of the stored points an operation selects (listed ids, or a filter), each once."""
        if flt is not None:
            return matching(flt, self.payloads, self.ids).tolist()
        return [i for i in dict.fromkeys(self.ids.internals(as_point_ids(ids))) if i in self.payloads]

    def _apply(self, op: Op) -> int:
        """Apply a logged operation to the index, id mapping and payloads (exclusive lock held, or recovery).

        Deterministic in the log's order: new UUIDs get their internal ids here, filters are evaluated
        here, so a replay reproduces the same state. Returns the number of points changed."""
        if isinstance(op, Upsert):
            ids = self.ids.assign(as_point_ids(op.ids))
            existing = [i for i in ids if i in self.payloads]
            if existing:
                self.index.remove_ids(np.asarray(existing, dtype=np.int64))
            if ids:
                self.index.add_with_ids(op.vectors, np.asarray(ids, dtype=np.int64))
            for i, p in zip(ids, op.payloads):
                self.payloads.set(i, p)
            self._maybe_train()
            return len(ids)
        present = self._targets(op.ids, op.filter)
        if isinstance(op, Delete):
            if present:
                self.index.remove_ids(np.asarray(present, dtype=np.int64))
            for i in present:
                self.payloads.delete(i)
            self.ids.forget(present)
            return len(present)
        for i in present:
            self.payloads.set(i, _updated(self.payloads.get(i), op))
        return len(present)

    @property
    def _trained_lists(self) -> bool:
        """Whether the index is the ivf collection's trained IVFIndex (not yet: still the flat one)."""
        from tqindex import IVFIndex

        return isinstance(self.index, IVFIndex)

    def _maybe_train(self) -> None:
        """An ivf collection switches from its flat index to trained inverted lists at ``train_at`` points."""
        ix = self.spec.index_spec
        if ix["type"] == "ivf" and not self._trained_lists and len(self.index) >= ix["train_at"]:
            self.index = _to_ivf(self.spec, self.index, self.settings.device)
            log.info("collection %s: %d points, inverted lists trained (nlist %d)", self.spec.name, len(self.index),
                     ix["nlist"])

    def _submit(self, op: Op) -> "_Pending":
        """Queue a mutation and return once it is durable and applied (group commit).

        Writers queue their operation, then take the writer mutex; whoever gets it first commits every
        queued operation: one log write and one fdatasync for all, then one exclusive-lock section that
        applies them in queue order. A writer whose operation was committed by another returns at once.
        """
        try:
            body = encode_op(op)  # this writer's own work: a failure here is its error alone
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"the operation cannot be written to the log: {e}") from None
        pending = _Pending(op, body)
        with self._qlock:
            self._queue.append(pending)
        with self._wmutex:
            if not pending.done:
                self._commit_queued()
            self._maybe_schedule_snapshot()
        if pending.error is not None:
            raise pending.error
        if not pending.done:  # pragma: no cover - _commit_queued always settles its batch
            raise ApiError(500, "internal error: a queued write was not committed")
        return pending

    def _commit_queued(self) -> None:
        """Commit the queued operations (writer mutex held); every one ends done, with an lsn or an error."""
        with self._qlock:
            batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            self._check_open(write=True)
            records = [(self.lsn + 1 + i, p.body) for i, p in enumerate(batch)]
            try:
                self.wal.append_many(records)
            except OSError as e:
                raise ApiError(500, f"could not write the log of collection {self.spec.name!r}: {e}") from e
            with self._rw.write():
                for (lsn, _), p in zip(records, batch):
                    try:
                        p.count = self._apply(p.op)
                    except Exception as e:
                        # Validation makes this unreachable for every known input; should it happen, the
                        # collection is quarantined exactly as a restart would find it (replay stops here).
                        self._failed = f"applying logged operation {lsn} failed: {type(e).__name__}: {e}"
                        log.exception("collection %s quarantined: %s", self.spec.name, self._failed)
                        raise ApiError(500, self._failed) from e
                    self.lsn = p.lsn = lsn
                    p.done = True
        except Exception as e:
            err = e if isinstance(e, ApiError) else ApiError(500, f"internal error: {type(e).__name__}: {e}")
            for p in batch:
                if not p.done:
                    p.error, p.done = err, True

    def _result(self, lsn: int) -> dict[str, Any]:
        return {"operation_id": lsn, "status": "completed"}

    def _skip_write(self, ids: Any, flt: Filter | None) -> bool:
        """True (nothing to log) when a delete or payload update selects no stored point now; the
        check is repeated when the record is applied."""
        with self._rw.read():
            self._check_open(write=True)
            return not self._targets(ids, flt)

    def upsert(self, req: UpsertRequest) -> dict[str, Any]:
        """Insert or replace points; returns after the log record is durable and the points are visible."""
        if not len(req.ids):
            with self._rw.read():
                self._check_open(write=True)
                return self._result(self.lsn)
        p = self._submit(Upsert(as_point_ids(req.ids), req.vectors, req.payloads))
        return self._result(p.lsn)

    def delete(self, sel: Selector | Any) -> dict[str, Any]:
        """Remove the selected points (absent ids ignored); ``sel``: a Selector or a list / array of ids."""
        if not isinstance(sel, Selector):
            sel = Selector(ids=as_point_ids(sel))
        ids = list(dict.fromkeys(sel.ids or ()))
        if self._skip_write(ids, sel.filter):
            return self._result(self.lsn)
        return self._result(self._submit(Delete(ids, sel.filter)).lsn)

    def update_payload(self, req: PayloadRequest) -> dict[str, Any]:
        """Set (merge), overwrite, delete keys of or clear the payloads of the selected points."""
        ids = list(dict.fromkeys(req.selector.ids or ()))
        if self._skip_write(ids, req.selector.filter):
            return self._result(self.lsn)
        op = PayloadUpdate(req.mode, ids, req.selector.filter, req.payload, req.keys)
        return self._result(self._submit(op).lsn)

    # -- snapshots --------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        """Write a snapshot of the current state, then truncate the log. Readers are not blocked."""
        with self._wmutex:
            self._check_open(write=True)
            return self._snapshot_locked()

    def _snapshot_locked(self) -> SnapshotInfo:
        if self.last_snapshot is not None and self.last_snapshot.lsn == self.lsn:
            if self.wal.size:
                self.wal.truncate()
            return self.last_snapshot
        with self._rw.read():
            info = write_snapshot(self.path / SNAPSHOTS, self.index, self.payloads, self.ids, self.lsn)
        self.last_snapshot = info
        clean_snapshots(self.path / SNAPSHOTS, info)
        self.wal.truncate()
        log.info("collection %s: snapshot %s (%d points), log truncated", self.spec.name, info.name, info.points)
        return info

    def _maybe_schedule_snapshot(self) -> None:
        limit = self.settings.snapshot_wal_bytes
        if self._executor is None or not limit or self.wal.size <= limit or self._snapshot_scheduled:
            return
        self._snapshot_scheduled = True
        self._executor.submit(self._auto_snapshot)

    def _auto_snapshot(self) -> None:
        try:
            with self._wmutex:
                self._snapshot_scheduled = False
                if not self._closed and not self._failed:
                    self._snapshot_locked()
        except Exception:
            log.exception("collection %s: background snapshot failed (the log still holds every write)",
                          self.spec.name)

    # -- reads ------------------------------------------------------------------------------------
    def _check_answer_size(self, hits: int, with_vector: bool) -> None:
        """413 before any work when ``hits`` points (with their vectors) would pass --max-response-bytes."""
        per_hit = 64 + (16 * self.spec.dim if with_vector else 0)  # a float32 in JSON takes <= 16 bytes
        limit = self.settings.max_response_bytes
        if hits * per_hit > limit:
            raise ApiError(413, f"the answer would hold {hits} points{' with vectors' if with_vector else ''}, about "
                                f"{hits * per_hit} bytes; expected at most {limit} (--max-response-bytes): ask for "
                                "fewer points" + (" or without vectors" if with_vector else ""))


    def _point(self, internal: int, with_payload: PayloadSelector, vec: np.ndarray | None) -> dict[str, Any]:
        """A Qdrant Record: {"id", "payload"?, "vector"?} with the external id."""
        p: dict[str, Any] = {"id": external_json(self.ids.external(internal))}
        if with_payload is not False:
            p["payload"] = _select(self.payloads.get(internal), with_payload)
        if vec is not None:
            p["vector"] = vec.tolist()
        return p

    def _exact(self, query: np.ndarray, k: int, cand: np.ndarray | None) -> tuple[list[float], list[int]]:
        """Exact top-k over the stored originals of ``cand`` (every point if None), in blocks."""
        ids = cand if cand is not None else self.payloads.sorted_ids()
        q = query[0].astype(np.float64)
        if self.spec.metric == "cosine":
            q = q / max(float(np.linalg.norm(q)), 1e-30)
        scores = np.empty(ids.size, dtype=np.float64)
        for s in range(0, ids.size, 65536):
            x = np.asarray(self.index.reconstruct_batch(ids[s : s + 65536]), dtype=np.float64)
            if self.spec.metric == "l2":
                scores[s : s + x.shape[0]] = -((x - q) ** 2).sum(axis=1)
            else:
                if self.spec.metric == "cosine":
                    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
                scores[s : s + x.shape[0]] = x @ q
        top = np.lexsort((ids, -scores))[:k]  # best first, ties by id
        d = scores[top]
        return (-d if self.spec.metric == "l2" else d).tolist(), ids[top].tolist()

    def search(self, req: SearchRequest) -> list[dict[str, Any]]:
        """Qdrant ScoredPoints {"id", "version", "score", "payload"?, "vector"?}, best first.

        Scores: cosine similarity (Cosine), inner product (Dot), Euclidean distance (Euclid; the index's
        squared distance, square-rooted). ``score_threshold`` keeps scores >= it (<= it for Euclid)."""
        with self._rw.read():
            self._check_open()
            k = req.limit + req.offset
            self._check_answer_size(min(req.limit, len(self.payloads)), req.with_vector)
            if len(self.payloads) == 0:
                return []
            cand = matching(req.filter, self.payloads, self.ids) if req.filter is not None else None
            if cand is not None and cand.size == 0:
                return []
            if req.exact:
                drow, irow = self._exact(req.query, k, cand)
            else:
                extra = {"nprobe": req.nprobe} if req.nprobe is not None and self._trained_lists else {}
                D, I = self.index.search(req.query, k, req.rerank, filter_ids=cand, **extra)
                drow, irow = D[0].tolist(), I[0].tolist()
            l2 = self.spec.metric == "l2"
            hits = [(i, math.sqrt(max(d, 0.0)) if l2 else d) for d, i in zip(drow, irow) if i >= 0][req.offset :]
            if req.score_threshold is not None:
                t = req.score_threshold
                hits = [(i, d) for i, d in hits if (d <= t if l2 else d >= t)]
            vecs = self.index.reconstruct_batch(np.asarray([i for i, _ in hits], dtype=np.int64)) \
                if req.with_vector and hits else None
            out = []
            for j, (i, d) in enumerate(hits):
                h = self._point(i, req.with_payload, vecs[j] if vecs is not None else None)
                h["version"] = 0
                h["score"] = d
                out.append(h)
            return out

    def get(self, ids: list[PointId] | np.ndarray, with_payload: PayloadSelector = True,
            with_vector: bool = False) -> list[dict[str, Any]]:
        """The stored points among ``ids`` (request order, each once)."""
        with self._rw.read():
            self._check_open()
            found = self._targets(ids, None)
            self._check_answer_size(len(found), with_vector)
            vecs = self.index.reconstruct_batch(np.asarray(found, dtype=np.int64)) if with_vector and found else None
            return [self._point(i, with_payload, vecs[j] if vecs is not None else None) for j, i in enumerate(found)]

    def scroll(self, offset: PointId | None, limit: int, with_payload: PayloadSelector, with_vector: bool,
               flt: Filter | None) -> dict[str, Any]:
        """Points at or after ``offset`` in Qdrant's id order (integers ascending, then UUIDs), at most
        ``limit``; {"points", "next_page_offset"} (None on the last page)."""
        with self._rw.read():
            self._check_open()
            ids = matching(flt, self.payloads, self.ids) if flt is not None else self.payloads.sorted_ids()
            ordered = self.ids.ordered(ids)
            start = self.ids.start(ordered, offset) if offset is not None else 0
            page = ordered[start : start + limit + 1]
            nxt = external_json(self.ids.external(int(page[limit]))) if page.size > limit else None
            page = page[:limit]
            self._check_answer_size(int(page.size), with_vector)
            vecs = self.index.reconstruct_batch(page) if with_vector and page.size else None
            pts = [self._point(i, with_payload, vecs[j] if vecs is not None else None)
                   for j, i in enumerate(page.tolist())]
            return {"points": pts, "next_page_offset": nxt}

    def count(self, flt: Filter | None) -> int:
        with self._rw.read():
            self._check_open()
            return len(self.payloads) if flt is None else int(matching(flt, self.payloads, self.ids).size)

    def snapshots(self) -> list[SnapshotInfo]:
        """The collection's snapshots: the newest one (older ones are removed once it is written)."""
        with self._rw.read():
            self._check_open()
            return [self.last_snapshot] if self.last_snapshot is not None else []

    def status(self) -> dict[str, Any]:
        """tqindex's own numbers: point count, memory (bytes by kind), log, snapshot, quarantine, index."""
        with self._rw.read():
            self._check_open()
            mem = dict(self.index.memory_usage())
            mem["payloads"] = self.payloads.nbytes
            mem["total"] = mem.get("total", 0) + mem["payloads"]
            return {
                "points": len(self.payloads),
                "memory": mem,
                "wal_bytes": self.wal.size,
                "lsn": self.lsn,
                "snapshot": self.last_snapshot.name if self.last_snapshot else None,
                "quarantined": self._failed,
                "uuid_points": len(self.ids),
                "index": {**self.spec.index_spec, "trained": self._trained_lists},
            }

    def info(self) -> dict[str, Any]:
        """Qdrant's CollectionInfo, plus a "tqindex" object (settings and :meth:`status`).

        The HNSW, optimizer and WAL sections are Qdrant's defaults, shown because clients require them:
        tqindex has no HNSW graph, segments or optimizers."""
        st = self.status()
        meta = dict(self.spec.metadata or {})
        meta["tqindex"] = self.spec.tqindex_settings()
        return {
            "status": "red" if self._failed else "green",
            "optimizer_status": "ok" if not self._failed else {"error": self._failed},
            "indexed_vectors_count": st["points"],
            "points_count": st["points"],
            "segments_count": 1,
            "config": {
                "params": {"vectors": {"size": self.spec.dim, "distance": QDRANT_DISTANCE[self.spec.metric]},
                           "shard_number": 1, "replication_factor": 1, "write_consistency_factor": 1,
                           "on_disk_payload": False},
                "hnsw_config": {"m": 16, "ef_construct": 100, "full_scan_threshold": 10000},
                "optimizer_config": {"deleted_threshold": 0.2, "vacuum_min_vector_number": 1000,
                                     "default_segment_number": 0, "flush_interval_sec": 5},
                "wal_config": {"wal_capacity_mb": 32, "wal_segments_ahead": 0},
                "quantization_config": None,
                "metadata": meta,
            },
            "payload_schema": {},
            "tqindex": {"config": self.spec.to_json(), **st},
        }

    def stats(self) -> dict[str, Any]:
        """What /metrics shows: name, points, bytes by kind, log bytes."""
        st = self.status()
        return {"name": self.spec.name, "points": st["points"], "wal_bytes": st["wal_bytes"],
                "bytes": {k: v for k, v in st["memory"].items() if k != "total"}}


def _select(payload: dict[str, Any] | None, sel: PayloadSelector) -> dict[str, Any] | None:
    """A payload as with_payload asks: whole, or only / all but the listed top-level keys."""
    if sel is True or payload is None:
        return payload
    mode, keys = sel  # type: ignore[misc]
    if mode == "include":
        return {k: payload[k] for k in keys if k in payload}
    return {k: v for k, v in payload.items() if k not in keys}


def _updated(payload: dict[str, Any] | None, op: PayloadUpdate) -> dict[str, Any] | None:
    """The payload after a payload update (a new dict; the stored one is never changed in place)."""
    if op.mode == "overwrite":
        return dict(op.payload or {})
    if op.mode == "clear":
        return {}
    if op.mode == "set":
        return {**(payload or {}), **(op.payload or {})}
    out = json.loads(json.dumps(payload)) if payload else {}  # a deep copy: nested keys may be removed
    for key in op.keys:
        *parents, last = key.split(".")
        cur: Any = out
        for part in parents:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(last, None)
    return out

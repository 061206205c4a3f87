"""Store: the data directory's collections (create, delete, look up), its lock file and recovery at start."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server.collection import CONFIG, Collection
from server.config import Settings
from server.errors import ApiError
from server.fsutil import fsync_dir, remove_tree
from server.validation import CollectionSpec, check_name

__all__ = ["Store"]

log = logging.getLogger(__name__)

LOCK = "LOCK"
COLLECTIONS = "collections"


class Store:
    """All collections under ``settings.data_dir``; one server process per data directory (flock)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.data_dir)
        self.cdir = self.root / COLLECTIONS
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tqindex-snapshot")
        self.ready = False
        self.recovery_s: float | None = None
        self.errors: dict[str, str] = {}

    def acquire(self) -> None:
        """Create the data directory and take its lock; RuntimeError if another process holds it."""
        self.cdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.root / LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"data directory {self.root} is in use by another process (lock {self.root / LOCK}); "
                               "expected one server per data directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def recover(self) -> None:
        """Remove unfinished creations/deletions, then open every collection (snapshot + log replay)."""
        import tqindex  # noqa: F401  (torch import: ready means the index library is loaded)

        t0 = time.perf_counter()
        for p in self.cdir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                remove_tree(p)
        fsync_dir(self.cdir)
        for p in sorted(self.cdir.iterdir()):
            if not p.is_dir() or not (p / CONFIG).exists():
                continue
            try:
                coll = Collection.open(p, self.settings, self._executor)
            except Exception as e:
                log.exception("collection %s could not be recovered", p.name)
                self.errors[p.name] = f"{type(e).__name__}: {e}"
                continue
            with self._lock:
                self._collections[p.name] = coll
        self.recovery_s = time.perf_counter() - t0
        log.info("recovered %d collections in %.3f s", len(self._collections), self.recovery_s)
        self.ready = True

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            for c in self._collections.values():
                c.wal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- collections ------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "the server is recovering its collections; expected a moment (see /readyz)")

    def get(self, name: str) -> Collection:
        self.check_ready()
        with self._lock:
            c = self._collections.get(name)
        if c is None:
            check_name(name)
            if name in self.errors:
                raise ApiError(503, f"collection {name!r} failed to load: {self.errors[name]}; DELETE it to drop it")
            raise ApiError(404, f"collection {name!r} does not exist; expected one of {self.names()[:20]}")
        return c

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._collections)

    def quarantined(self) -> dict[str, str]:
        """Collections that refuse writes (a logged operation could not be applied), with the reason."""
        return {c.spec.name: c.quarantined for c in self.collections() if c.quarantined}

    def collections(self) -> list[Collection]:
        with self._lock:
            return [self._collections[n] for n in sorted(self._collections)]

    def create(self, spec: CollectionSpec) -> Collection:
        self.check_ready()
        with self._lock:
            if spec.name in self._collections or spec.name in self.errors:
                raise ApiError(409, f"collection {spec.name!r} already exists; expected a new name "
                                    "(DELETE it first to replace it)")
            try:
                coll = Collection.create(spec, self.cdir, self.settings, self._executor)
            except (ValueError, TypeError) as e:
                raise ApiError(400, f"collection config {spec.to_json()} was rejected by the index: {e}") from None
            self._collections[spec.name] = coll
            return coll

    def delete(self, name: str) -> None:
        self.check_ready()
        with self._lock:
            coll = self._collections.get(name)
            if coll is None and name not in self.errors:
                check_name(name)
                raise ApiError(404, f"collection {name!r} does not exist; expected one of {sorted(self._collections)[:20]}")
            if coll is not None:
                coll.close()
            path = coll.path if coll is not None else self.cdir / name  # a collection that failed to load
            trash = self.cdir / f".trash-{uuid.uuid4().hex}"
            os.rename(path, trash)
            fsync_dir(self.cdir)
            self._collections.pop(name, None)
            self.errors.pop(name, None)
        remove_tree(trash)

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for c in self.collections():
            try:
                out.append(c.stats())
            except ApiError:
                continue
        return out

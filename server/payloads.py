"""Payload store: JSON payloads by internal point id, with an inverted index for equality filters.

Every top-level and nested object key is indexed under its dotted path ("a.b"); a list of scalars is
indexed under each element (a match on any element matches, as in Qdrant). Strings, integers,
floats and booleans are matchable; booleans never equal numbers.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = ["PayloadStore", "scalar_key"]

Scalar = str | int | float | bool
_Key = tuple[str, str, Scalar]


def _tag(v: Any) -> str | None:
    if isinstance(v, bool):
        return "b"
    if isinstance(v, (int, float)):
        return "n"
    if isinstance(v, str):
        return "s"
    return None


def scalar_key(v: Any) -> tuple[str, Any] | None:
    """(type tag, value) of a matchable scalar (booleans never equal numbers; 1 == 1.0), or None."""
    t = _tag(v)
    return None if t is None else (t, v)


def _keys(payload: dict[str, Any] | None, prefix: str = "") -> Iterator[_Key]:
    if not payload:
        return
    for k, v in payload.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _keys(v, f"{path}.")
        elif isinstance(v, list):
            for e in v:
                t = _tag(e)
                if t is not None:
                    yield (path, t, e)
        else:
            t = _tag(v)
            if t is not None:
                yield (path, t, v)


class PayloadStore:
    """id -> payload dict (or None), plus the set of stored ids; not thread-safe (the caller locks)."""

    def __init__(self) -> None:
        self._payloads: dict[int, dict[str, Any] | None] = {}
        self._index: dict[_Key, set[int]] = {}
        self._sorted: np.ndarray | None = None
        self._sizes: dict[int, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._payloads)

    def __contains__(self, pid: object) -> bool:
        return pid in self._payloads

    def get(self, pid: int) -> dict[str, Any] | None:
        return self._payloads.get(pid)

    def sorted_ids(self) -> np.ndarray:
        """(n,) int64 ascending ids of the stored points (cached until the next change)."""
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self._payloads.keys(), dtype=np.int64, count=len(self._payloads)))
        return self._sorted

    def set(self, pid: int, payload: dict[str, Any] | None, size: int | None = None) -> None:
        """Insert or replace the payload of point ``pid``; ``size``: its compact JSON length, if known."""
        if pid in self._payloads:
            self._unindex(pid)
        self._payloads[pid] = payload
        if payload:
            size = size if size is not None else len(json.dumps(payload, separators=(",", ":")))
            self._sizes[pid] = size
            self._bytes += size
        for key in _keys(payload):
            self._index.setdefault(key, set()).add(pid)
        self._sorted = None

    def delete(self, pid: int) -> bool:
        """Remove point ``pid``; True if it was there."""
        if pid not in self._payloads:
            return False
        self._unindex(pid)
        del self._payloads[pid]
        self._sorted = None
        return True

    def _unindex(self, pid: int) -> None:
        self._bytes -= self._sizes.pop(pid, 0)
        for key in _keys(self._payloads[pid]):
            s = self._index.get(key)
            if s is not None:
                s.discard(pid)
                if not s:
                    del self._index[key]

    # -- lookups for filters ---------------------------------------------------------------------
    def equal(self, key: str, values: Iterable[Scalar]) -> set[int]:
        """Ids whose payload holds one of ``values`` at the dotted ``key`` (or in a list there)."""
        out: set[int] = set()
        for v in values:
            out |= self._index.get((key, _tag(v), v), set())  # type: ignore[arg-type]
        return out

    def id_set(self) -> set[int]:
        """A new set of every stored id."""
        return set(self._payloads)

    # -- persistence ------------------------------------------------------------------------------
    def items(self) -> Iterable[tuple[int, dict[str, Any] | None]]:
        return self._payloads.items()

    def dump_lines(self) -> Iterator[bytes]:
        """JSON lines ``[id, payload]\\n``, ascending id: the snapshot file's content."""
        for pid in self.sorted_ids().tolist():
            yield json.dumps([pid, self._payloads[pid]], separators=(",", ":"), allow_nan=False).encode() + b"\n"

    @classmethod
    def from_lines(cls, lines: Iterable[bytes]) -> "PayloadStore":
        """Rebuild from :meth:`dump_lines` output (parsed in one ``json.loads`` call)."""
        lines = [ln.rstrip(b"\n") for ln in lines if ln.strip()]
        store = cls()
        rows = json.loads(b"[" + b",".join(lines) + b"]") if lines else []
        for ln, (pid, payload) in zip(lines, rows):
            # The line is the compact JSON ``[id,payload]``: the payload's size follows from its length.
            store.set(int(pid), payload, len(ln) - len(str(pid)) - 3)
        return store

    @property
    def nbytes(self) -> int:
        """Size of the payloads as compact JSON (a proxy for their memory), kept up to date."""
        return self._bytes

"""Point ids: Qdrant's external ids (unsigned integers or UUIDs) and the int64 ids the index stores.

An integer id ``i`` in 0..INT_ID_MAX is stored as itself. A UUID gets the next internal id of the
range UUID_BASE..2^63-1 the first time it is upserted (``PointIds.assign``), in the order operations
are applied; the log holds the UUID itself, so a replay of the same records assigns the same internal
ids, and a snapshot stores the mapping and the counter. A UUID whose point is deleted is forgotten (a
later upsert of it gets a new internal id). Integer ids >= UUID_BASE are refused by validation: the
two ranges never meet.

Order (scroll, ``next_page_offset``) follows Qdrant: integers ascending, then UUIDs by their 128-bit
value.
"""

from __future__ import annotations

import bisect
import uuid
from typing import Any, Iterable

import numpy as np

__all__ = ["PointId", "PointIds", "INT_ID_MAX", "UUID_BASE", "external_json", "parse_uuid"]

PointId = int | uuid.UUID
UUID_BASE = 1 << 62  # internal ids of UUID points: UUID_BASE, UUID_BASE + 1, ...
INT_ID_MAX = UUID_BASE - 1  # the largest integer point id accepted
_INTERNAL_MAX = (1 << 63) - 1


def parse_uuid(s: str) -> uuid.UUID | None:
    """A UUID in any form Python's uuid accepts (hyphenated, 32 hex digits, braces, urn:uuid:), or None."""
    try:
        return uuid.UUID(s)
    except (ValueError, AttributeError, TypeError):
        return None


def external_json(pid: PointId) -> int | str:
    """An external id as Qdrant answers it: the integer, or the hyphenated lowercase UUID string."""
    return str(pid) if isinstance(pid, uuid.UUID) else pid


class PointIds:
    """The UUID <-> internal id mapping of one collection (integer ids map to themselves).

    Not thread-safe: the collection's locks guard it like its payloads.
    """

    def __init__(self, next_id: int = UUID_BASE, uuids: Iterable[tuple[int, uuid.UUID]] = ()) -> None:
        self.next_id = next_id
        self._to_internal: dict[uuid.UUID, int] = {}
        self._to_uuid: dict[int, uuid.UUID] = {}
        for internal, u in uuids:
            self._to_internal[u] = internal
            self._to_uuid[internal] = u
        self._order: list[tuple[int, int]] | None = None  # (uuid value, internal) ascending, cached

    def __len__(self) -> int:
        return len(self._to_uuid)

    # -- mapping ------------------------------------------------------------------------------------
    def internal(self, pid: PointId) -> int | None:
        """The internal id of ``pid`` (None for a UUID never assigned)."""
        if isinstance(pid, uuid.UUID):
            return self._to_internal.get(pid)
        return pid

    def internals(self, pids: Iterable[PointId]) -> list[int]:
        """The internal ids of the ``pids`` that have one (unknown UUIDs dropped), in order."""
        out = []
        for p in pids:
            i = self.internal(p)
            if i is not None:
                out.append(i)
        return out

    def assign(self, pids: Iterable[PointId]) -> list[int]:
        """Internal ids for an upsert: known ids keep theirs, new UUIDs get the next ones (in order)."""
        out = []
        for p in pids:
            i = self.internal(p)
            if i is None:
                if self.next_id > _INTERNAL_MAX:  # pragma: no cover - 2^62 UUID upserts
                    raise ValueError("the collection has used every internal id of UUID points")
                i = self.next_id
                self.next_id += 1
                self._to_internal[p] = i  # type: ignore[index]
                self._to_uuid[i] = p  # type: ignore[assignment]
                self._order = None
            out.append(i)
        return out

    def forget(self, internals: Iterable[int]) -> None:
        """Drop the UUIDs of deleted points."""
        for i in internals:
            u = self._to_uuid.pop(i, None)
            if u is not None:
                del self._to_internal[u]
                self._order = None

    def external(self, internal: int) -> PointId:
        """The external id of a stored point."""
        return self._to_uuid[internal] if internal >= UUID_BASE else internal

    # -- order --------------------------------------------------------------------------------------
    def _uuid_order(self) -> list[tuple[int, int]]:
        if self._order is None:
            self._order = sorted((u.int, i) for u, i in self._to_internal.items())
        return self._order

    def ordered(self, internal_sorted: np.ndarray) -> np.ndarray:
        """(n,) int64 ascending internal ids -> the same ids in external order (ints, then UUIDs by value)."""
        split = int(np.searchsorted(internal_sorted, UUID_BASE))
        if split == internal_sorted.size:
            return internal_sorted
        uu = internal_sorted[split:]
        order = np.fromiter((i for _, i in self._uuid_order()), dtype=np.int64, count=len(self._to_internal))
        return np.concatenate([internal_sorted[:split], order[np.isin(order, uu)]])

    def start(self, ordered: np.ndarray, offset: PointId) -> int:
        """Position in ``ordered`` (from :meth:`ordered`) of the first point at or after ``offset``."""
        split = int(np.searchsorted(ordered, UUID_BASE))  # the int part is ascending and below every UUID
        if not isinstance(offset, uuid.UUID):
            return int(np.searchsorted(ordered[:split], offset))
        if split == ordered.size:
            return split
        present = set(ordered[split:].tolist())
        values = [v for v, i in self._uuid_order() if i in present]
        return split + bisect.bisect_left(values, offset.int)

    # -- persistence --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """{"next": counter, "uuids": [[internal, "uuid"], ...] ascending internal}: the snapshot file."""
        return {"next": self.next_id, "uuids": [[i, str(self._to_uuid[i])] for i in sorted(self._to_uuid)]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "PointIds":
        return cls(int(raw["next"]), ((int(i), uuid.UUID(s)) for i, s in raw["uuids"]))

"""Mutations of a collection (upsert, delete, payload updates) and their byte encoding as log bodies.

Body layout: ``u32 header_len | header JSON (utf-8) | arrays``. The header holds ``op``, ``n`` and
the op's fields; the arrays are the ids (n int64, little-endian) and, for upserts, the vectors
(n x dim float32, little-endian, row-major). A UUID id is written as -1 in the array and as its
string under ``header["uuids"]`` ({position: uuid}); a filter (delete or payload update by filter)
as Qdrant filter JSON under ``header["filter"]``, evaluated when the record is applied, so a replay
selects the same points. Records written before UUIDs and filters existed read unchanged.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from server.filters import Filter, parse_filter
from server.ids import PointId

__all__ = ["Upsert", "Delete", "PayloadUpdate", "Op", "encode_op", "decode_op", "as_point_ids"]

_LEN = struct.Struct("<I")
_I64 = np.dtype("<i8")
_F32 = np.dtype("<f4")
PAYLOAD_MODES = ("set", "overwrite", "delete", "clear")


def as_point_ids(ids: Any) -> list[PointId]:
    """A list of point ids from a list or an int array (tests and tools pass numpy ids)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


@dataclass(frozen=True)
class Upsert:
    """Insert or replace points: n ids (int or UUID), vectors (n, dim) float32, payloads: n dicts (or None)."""

    ids: Sequence[PointId]
    vectors: np.ndarray
    payloads: list[dict[str, Any] | None]


@dataclass(frozen=True)
class Delete:
    """Remove the listed points (absent ones are ignored), or those matching ``filter``."""

    ids: Sequence[PointId] = ()
    filter: Filter | None = None


@dataclass(frozen=True)
class PayloadUpdate:
    """Change the payloads of the listed points (or those matching ``filter``): mode "set" merges
    ``payload``'s keys, "overwrite" replaces the payload, "delete" removes ``keys`` (dotted for nested),
    "clear" empties it. Absent points are ignored."""

    mode: str
    ids: Sequence[PointId] = ()
    filter: Filter | None = None
    payload: dict[str, Any] | None = None
    keys: tuple[str, ...] = field(default_factory=tuple)


Op = Upsert | Delete | PayloadUpdate


def _ids_bytes(ids: Sequence[PointId]) -> tuple[bytes, dict[str, str]]:
    ids = as_point_ids(ids)
    uuids = {str(j): str(i) for j, i in enumerate(ids) if isinstance(i, uuid.UUID)}
    arr = np.fromiter((-1 if isinstance(i, uuid.UUID) else i for i in ids), dtype=_I64, count=len(ids))
    return arr.tobytes(), uuids


def encode_op(op: Op) -> bytes:
    """An operation -> log body bytes."""
    ids_b, uuids = _ids_bytes(op.ids)
    header: dict[str, Any]
    if isinstance(op, Upsert):
        vecs = np.ascontiguousarray(op.vectors, dtype=_F32)
        header = {"op": "upsert", "n": len(op.ids), "dim": int(vecs.shape[1]), "payloads": op.payloads}
        arrays = ids_b + vecs.tobytes()
    elif isinstance(op, Delete):
        header = {"op": "delete", "n": len(op.ids)}
        arrays = ids_b
    elif isinstance(op, PayloadUpdate):
        if op.mode not in PAYLOAD_MODES:
            raise ValueError(f"payload update mode {op.mode!r}; expected one of {PAYLOAD_MODES}")
        header = {"op": "payload", "n": len(op.ids), "mode": op.mode, "payload": op.payload, "keys": list(op.keys)}
        arrays = ids_b
    else:  # pragma: no cover - typing guards this
        raise TypeError(f"expected Upsert, Delete or PayloadUpdate, got {type(op).__name__}")
    if uuids:
        header["uuids"] = uuids
    if not isinstance(op, Upsert) and op.filter is not None:
        header["filter"] = op.filter.to_json()
    hb = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return _LEN.pack(len(hb)) + hb + arrays


def decode_op(body: bytes) -> Op:
    """Log body bytes -> the operation. Raises ValueError on a body that does not parse."""
    if len(body) < _LEN.size:
        raise ValueError(f"log body of {len(body)} bytes is shorter than its {_LEN.size}-byte header length")
    (hl,) = _LEN.unpack_from(body, 0)
    header = json.loads(body[_LEN.size : _LEN.size + hl])
    rest = memoryview(body)[_LEN.size + hl :]
    n = int(header["n"])
    arr = np.frombuffer(rest[: n * 8], dtype=_I64).astype(np.int64)
    if arr.size != n:
        raise ValueError(f"log body holds {arr.size} ids, its header says {n}")
    ids: list[PointId] = arr.tolist()
    for pos, s in header.get("uuids", {}).items():
        ids[int(pos)] = uuid.UUID(s)
    flt = parse_filter(header["filter"]) if header.get("filter") is not None else None
    if header["op"] == "delete":
        return Delete(ids, flt)
    if header["op"] == "payload":
        return PayloadUpdate(header["mode"], ids, flt, header.get("payload"), tuple(header.get("keys", ())))
    if header["op"] == "upsert":
        dim = int(header["dim"])
        vecs = np.frombuffer(rest[n * 8 :], dtype=_F32).astype(np.float32)
        if vecs.size != n * dim:
            raise ValueError(f"log body holds {vecs.size} floats, its header says {n} x {dim}")
        payloads = header["payloads"]
        if len(payloads) != n:
            raise ValueError(f"log body holds {len(payloads)} payloads for {n} points")
        return Upsert(ids, vecs.reshape(n, dim), payloads)
    raise ValueError(f"unknown op {header['op']!r} in log body; expected 'upsert', 'delete' or 'payload'")

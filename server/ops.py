"""Mutations of a collection (upsert, delete) and their byte encoding as write-ahead-log bodies.

Body layout: ``u32 header_len | header JSON (utf-8) | arrays``. The header holds ``op``, ``n``,
``dim`` and, for upserts, the payloads; the arrays are the ids (n int64, little-endian) and, for
upserts, the vectors (n x dim float32, little-endian, row-major).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Upsert", "Delete", "Op", "encode_op", "decode_op"]

_LEN = struct.Struct("<I")
_I64 = np.dtype("<i8")
_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class Upsert:
    """Insert or replace points: ids (n,) int64, vectors (n, dim) float32, payloads: n dicts (or None)."""

    ids: np.ndarray
    vectors: np.ndarray
    payloads: list[dict[str, Any] | None]


@dataclass(frozen=True)
class Delete:
    """Remove points by id: ids (n,) int64 (absent ids are ignored)."""

    ids: np.ndarray


Op = Upsert | Delete


def encode_op(op: Op) -> bytes:
    """An operation -> log body bytes."""
    ids = np.ascontiguousarray(op.ids, dtype=_I64)
    if isinstance(op, Upsert):
        vecs = np.ascontiguousarray(op.vectors, dtype=_F32)
        header = {"op": "upsert", "n": int(ids.size), "dim": int(vecs.shape[1]), "payloads": op.payloads}
        arrays = ids.tobytes() + vecs.tobytes()
    elif isinstance(op, Delete):
        header = {"op": "delete", "n": int(ids.size)}
        arrays = ids.tobytes()
    else:  # pragma: no cover - typing guards this
        raise TypeError(f"expected Upsert or Delete, got {type(op).__name__}")
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
    ids = np.frombuffer(rest[: n * 8], dtype=_I64).astype(np.int64)
    if ids.size != n:
        raise ValueError(f"log body holds {ids.size} ids, its header says {n}")
    if header["op"] == "delete":
        return Delete(ids)
    if header["op"] == "upsert":
        dim = int(header["dim"])
        vecs = np.frombuffer(rest[n * 8 :], dtype=_F32).astype(np.float32)
        if vecs.size != n * dim:
            raise ValueError(f"log body holds {vecs.size} floats, its header says {n} x {dim}")
        payloads = header["payloads"]
        if len(payloads) != n:
            raise ValueError(f"log body holds {len(payloads)} payloads for {n} points")
        return Upsert(ids, vecs.reshape(n, dim), payloads)
    raise ValueError(f"unknown op {header['op']!r} in log body; expected 'upsert' or 'delete'")

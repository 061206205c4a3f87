"""Write-ahead log: CRC-checked, length-prefixed records, fsynced before a write is acknowledged.

On-disk layout of one record (little-endian)::

    magic   4 bytes  b"TQW1"
    length  u32      bytes of body
    lsn     u64      log sequence number, strictly increasing
    crc     u32      zlib.crc32 of (length, lsn, body)
    body    length bytes

A record whose header or body is cut short, or whose CRC does not match, and after which no valid
record follows, is a torn tail (a crash during the append): it is dropped and the file truncated
back to the last good record, so that it is never replayed and later appends follow good data. A bad
record with a valid record after it is real corruption and raises :class:`WalCorruptError`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from server.fsutil import fsync_dir

__all__ = ["WriteAheadLog", "WalRecord", "WalCorruptError", "MAGIC", "HEADER"]

log = logging.getLogger(__name__)

MAGIC = b"TQW1"
HEADER = struct.Struct("<4sIQI")  # magic, length, lsn, crc
_CRC_PART = struct.Struct("<IQ")  # length, lsn: covered by the CRC with the body
MAX_RECORD = (1 << 32) - 1


class WalCorruptError(RuntimeError):
    """The log holds a damaged record followed by valid ones: not a torn tail, refuse to guess."""


@dataclass(frozen=True)
class WalRecord:
    """One decoded log record: its sequence number and body bytes."""

    lsn: int
    body: bytes


def _crc(length: int, lsn: int, body: bytes | memoryview) -> int:
    return zlib.crc32(body, zlib.crc32(_CRC_PART.pack(length, lsn))) & 0xFFFFFFFF


def encode_record(lsn: int, body: bytes) -> bytes:
    """(lsn, body) -> the record's bytes as written to the log."""
    if len(body) > MAX_RECORD:
        raise ValueError(f"a log record holds at most {MAX_RECORD} bytes, got {len(body)}")
    return HEADER.pack(MAGIC, len(body), lsn, _crc(len(body), lsn, body)) + body


def _record_at(buf: memoryview, off: int) -> tuple[WalRecord, int] | None:
    """Decode the record starting at ``off``; (record, next offset) or None if it is not valid."""
    if off + HEADER.size > len(buf):
        return None
    magic, length, lsn, crc = HEADER.unpack_from(buf, off)
    end = off + HEADER.size + length
    if magic != MAGIC or end > len(buf):
        return None
    body = buf[off + HEADER.size : end]
    if _crc(length, lsn, body) != crc:
        return None
    return WalRecord(lsn, bytes(body)), end


def scan(data: bytes) -> tuple[list[WalRecord], int]:
    """Decode every record of a log's bytes.

    Returns:
        (records in order, offset of the end of the last good record).
    Raises:
        WalCorruptError: a bad record is followed by a valid one, or sequence numbers do not increase.
    """
    buf = memoryview(data)
    records: list[WalRecord] = []
    off = 0
    while off < len(buf):
        got = _record_at(buf, off)
        if got is None:
            # Torn tail unless some valid record starts after this point.
            pos = data.find(MAGIC, off + 1)
            while pos != -1:
                if _record_at(buf, pos) is not None:
                    raise WalCorruptError(
                        f"damaged record at byte {off} followed by a valid record at byte {pos}; "
                        "expected damage only at the end of the log (a torn append)"
                    )
                pos = data.find(MAGIC, pos + 1)
            break
        rec, nxt = got
        if records and rec.lsn <= records[-1].lsn:
            raise WalCorruptError(
                f"record at byte {off} has lsn {rec.lsn} after lsn {records[-1].lsn}; expected increasing lsns"
            )
        records.append(rec)
        off = nxt
    return records, off


class WriteAheadLog:
    """An append-only log file; :meth:`append` returns only after the record is on stable storage.

    Thread-safe: appends are serialised by an internal lock.
    """

    def __init__(self, path: str | Path, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = sync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._broken: str | None = None

    # -- recovery ---------------------------------------------------------------------------------
    def open(self) -> list[WalRecord]:
        """Open (creating if needed), drop a torn tail, and return the records to replay."""
        created = not self.path.exists()
        data = self.path.read_bytes() if not created else b""
        records, good = scan(data)
        if good < len(data):
            log.warning("%s: dropping a torn tail of %d bytes after %d good records",
                        self.path, len(data) - good, len(records))
        self._fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if good < len(data):
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        if created:
            os.fsync(self._fd)
            fsync_dir(self.path.parent)
        self._size = good
        return records

    @property
    def size(self) -> int:
        """Bytes of good records in the log."""
        return self._size

    # -- appends ----------------------------------------------------------------------------------
    def append(self, lsn: int, body: bytes) -> None:
        """Append one record and make it durable (fdatasync) before returning.

        Raises:
            OSError: the write failed; the partial record is cut off again. If even that fails the
                log is marked broken and every later append raises.
        """
        self.append_many([(lsn, body)])

    def append_many(self, records: list[tuple[int, bytes]]) -> None:
        """Append (lsn, body) records in one write and make them durable with one fdatasync (group commit)."""
        rec = b"".join(encode_record(lsn, body) for lsn, body in records)
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"{self.path}: log is not open")
            if self._broken:
                raise OSError(f"{self.path}: log is unusable after an earlier failure: {self._broken}")
            try:
                view = memoryview(rec)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                if self.sync:
                    os.fdatasync(self._fd)
            except OSError as e:
                try:
                    os.ftruncate(self._fd, self._size)
                    os.fsync(self._fd)
                except OSError as e2:
                    self._broken = f"{e}; then truncation failed: {e2}"
                raise
            self._size += len(rec)

    def truncate(self) -> None:
        """Empty the log (every record is covered by a durable snapshot)."""
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"{self.path}: log is not open")
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self._size = 0

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __iter__(self) -> Iterator[WalRecord]:
        """The records currently in the file (reads it again; for inspection and tests)."""
        records, _ = scan(self.path.read_bytes())
        return iter(records)

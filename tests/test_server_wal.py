"""Write-ahead log and operation encoding: round trips, torn tails dropped, mid-log corruption refused."""

from __future__ import annotations

import os
import struct
import uuid

import numpy as np
import pytest

from server.filters import parse_filter
from server.ops import Delete, PayloadUpdate, Upsert, decode_op, encode_op
from server.wal import HEADER, MAGIC, WalCorruptError, WriteAheadLog, encode_record, scan


def _log(path, bodies, start=1):
    w = WriteAheadLog(path)
    assert w.open() == []
    for i, b in enumerate(bodies):
        w.append(start + i, b)
    w.close()


def test_round_trip_and_reopen_appends(tmp_path):
    p = tmp_path / "wal.log"
    bodies = [b"", b"a", os.urandom(1000), b"x" * 70000]
    _log(p, bodies)
    w = WriteAheadLog(p)
    recs = w.open()
    assert [r.body for r in recs] == bodies and [r.lsn for r in recs] == [1, 2, 3, 4]
    assert w.size == p.stat().st_size
    w.append(5, b"more")
    w.close()
    assert [r.lsn for r in WriteAheadLog(p).open()] == [1, 2, 3, 4, 5]


def test_every_torn_cut_of_the_last_record_is_dropped(tmp_path):
    p = tmp_path / "wal.log"
    _log(p, [b"first", b"second-record-body"])
    full = p.read_bytes()
    good = len(encode_record(1, b"first"))
    for cut in range(good, len(full)):  # every prefix that ends inside the second record
        p.write_bytes(full[:cut])
        w = WriteAheadLog(p)
        recs = w.open()
        assert [r.body for r in recs] == [b"first"], cut
        assert p.stat().st_size == good  # truncated back to the last good record
        w.append(2, b"after")  # later appends follow good data and are read back
        w.close()
        assert [r.body for r in WriteAheadLog(p).open()] == [b"first", b"after"]


@pytest.mark.parametrize("tail", [b"\x00" * 64, b"\xff" * 3, MAGIC, MAGIC + b"\x05\x00\x00\x00"])
def test_garbage_tail_is_dropped(tmp_path, tail):
    p = tmp_path / "wal.log"
    _log(p, [b"one", b"two"])
    with open(p, "ab") as f:
        f.write(tail)
    assert [r.body for r in WriteAheadLog(p).open()] == [b"one", b"two"]


def test_flipped_bit_in_last_record_is_dropped_not_replayed(tmp_path):
    p = tmp_path / "wal.log"
    _log(p, [b"one", b"two-two"])
    data = bytearray(p.read_bytes())
    data[-2] ^= 0x10
    p.write_bytes(bytes(data))
    assert [r.body for r in WriteAheadLog(p).open()] == [b"one"]


def test_corruption_before_valid_records_raises(tmp_path):
    p = tmp_path / "wal.log"
    _log(p, [b"one", b"two", b"three"])
    data = bytearray(p.read_bytes())
    data[HEADER.size + 1] ^= 0x01  # inside the first record's body
    p.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="followed by a valid record"):
        WriteAheadLog(p).open()


def test_lsns_must_increase(tmp_path):
    data = encode_record(2, b"a") + encode_record(2, b"b")
    with pytest.raises(WalCorruptError, match="increasing"):
        scan(data)


def test_zero_length_zero_crc_record_is_not_valid():
    # A tail of zeros (a file extended but never written) must not parse as empty records.
    recs, good = scan(struct.pack("<4sIQI", b"\0\0\0\0", 0, 0, 0) * 3)
    assert recs == [] and good == 0


def test_truncate_empties_the_log(tmp_path):
    p = tmp_path / "wal.log"
    w = WriteAheadLog(p)
    w.open()
    w.append(1, b"abc")
    w.truncate()
    assert w.size == 0 and p.stat().st_size == 0
    w.append(2, b"def")
    w.close()
    assert [r.lsn for r in WriteAheadLog(p).open()] == [2]


def test_ops_round_trip():
    rng = np.random.default_rng(0)
    u = uuid.UUID("5c56c793-69f3-4fbf-87e6-c4bf54c28c26")
    up = Upsert([3, u, 2**62 - 1], rng.standard_normal((3, 5)).astype(np.float32),
                [{"a": 1, "b": [1, "x"], "c": {"d": None}}, None, {}])
    got = decode_op(encode_op(up))
    assert isinstance(got, Upsert)
    assert list(got.ids) == [3, u, 2**62 - 1]
    np.testing.assert_array_equal(got.vectors, up.vectors)
    assert got.vectors.dtype == np.float32 and got.payloads == up.payloads
    de = decode_op(encode_op(Delete(np.array([7, 8], dtype=np.int64))))
    assert isinstance(de, Delete) and list(de.ids) == [7, 8] and de.filter is None
    flt = parse_filter({"must": [{"key": "c", "match": {"any": ["x", 2]}}, {"has_id": [str(u), 4]}]})
    de = decode_op(encode_op(Delete(filter=flt)))
    assert isinstance(de, Delete) and list(de.ids) == [] and de.filter == flt
    pu = PayloadUpdate("delete", [u, 9], None, None, ("a", "b.c"))
    assert decode_op(encode_op(pu)) == pu
    pu = PayloadUpdate("set", [], flt, {"k": [1, 2]})
    assert decode_op(encode_op(pu)) == pu


def test_records_of_before_uuids_read_unchanged():
    """A record as the server wrote it before UUIDs, filters and payload updates existed."""
    header = b'{"op":"upsert","n":2,"dim":2,"payloads":[{"a":1},null]}'
    body = struct.pack("<I", len(header)) + header + np.array([5, 6], "<i8").tobytes() + \
        np.array([[1, 2], [3, 4]], "<f4").tobytes()
    got = decode_op(body)
    assert list(got.ids) == [5, 6] and got.payloads == [{"a": 1}, None] and got.vectors.tolist() == [[1, 2], [3, 4]]


def test_ops_reject_inconsistent_bodies():
    body = encode_op(Delete(np.array([1, 2], dtype=np.int64)))
    with pytest.raises(ValueError):
        decode_op(body[:-3])
    with pytest.raises(ValueError):
        decode_op(b"\x01")

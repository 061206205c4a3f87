"""Bit packing: every b in 1..8, any row length, LSB-first bit-stream layout, uint8 storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tqindex.packing import pack_bits, packed_size, unpack_bits

# One torch thread: on a busy 2-core box two threads thrash on small ops (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Independent layout: value j -> bits [j*b, j*b+b) of an LSB-first stream, 8 stream bits per byte."""
    n, m = values.shape
    stream = ((values[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(n, m * bits)
    return np.packbits(stream, axis=1, bitorder="little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("m", [1, 3, 7, 8, 9, 13, 50, 64, 100, 1537])
def test_roundtrip_and_layout(bits: int, m: int) -> None:
    rng = np.random.default_rng(bits * 1000 + m)
    v = rng.integers(0, 1 << bits, size=(5, m), dtype=np.int64)
    packed = pack_bits(torch.from_numpy(v), bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_size(m, bits)) == (5, (m * bits + 7) // 8)
    np.testing.assert_array_equal(packed.numpy(), reference_pack(v, bits))
    back = unpack_bits(packed, bits, m)
    assert back.dtype == torch.uint8 and back.shape == (5, m)
    np.testing.assert_array_equal(back.numpy(), v)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extremes_and_unused_high_bits_are_zero(bits: int) -> None:
    m = 11  # 11*b bits: the last byte is partly used for every b except 8
    top = (1 << bits) - 1
    for fill in (0, top):
        v = torch.full((2, m), fill, dtype=torch.int64)
        p = pack_bits(v, bits)
        assert torch.equal(unpack_bits(p, bits, m), v.to(torch.uint8))
    p = pack_bits(torch.full((1, m), top, dtype=torch.int64), bits)
    used = m * bits - 8 * (p.shape[1] - 1)
    assert int(p[0, -1]) == (1 << used) - 1


def test_accepts_uint8_and_int32_values_and_empty_batches() -> None:
    v = torch.tensor([[3, 0, 2, 1, 3]], dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(v, 2), 2, 5), v)
    assert torch.equal(unpack_bits(pack_bits(v.to(torch.int32), 2), 2, 5), v)
    e = pack_bits(torch.zeros(0, 9, dtype=torch.int64), 3)
    assert e.shape == (0, 4) and e.dtype == torch.uint8
    assert unpack_bits(e, 3, 9).shape == (0, 9)


def test_one_value_per_byte_only_at_eight_bits() -> None:
    # "packed" codes must not hold one value per wide integer: 1536 values at 4 bits take 768 bytes
    p = pack_bits(torch.randint(0, 16, (3, 1536)), 4)
    assert p.dtype == torch.uint8 and p.element_size() == 1 and p.shape == (3, 768)
    assert p.numel() * p.element_size() == 3 * 1536 * 4 // 8


def test_bad_arguments() -> None:
    v = torch.zeros(2, 8, dtype=torch.int64)
    for bits in (0, 9):
        with pytest.raises(ValueError, match=rf"bits must be an int in 1..8, got {bits}"):
            pack_bits(v, bits)
    with pytest.raises(ValueError, match=r"2-D .*got shape \(8,\)"):
        pack_bits(v[0], 2)
    with pytest.raises(ValueError, match=r"expected ceil\(8\*3/8\) = 3"):
        unpack_bits(torch.zeros(2, 4, dtype=torch.uint8), 3, 8)
    with pytest.raises(ValueError, match=r"uint8"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.int64), 3, 8)


@pytest.mark.parametrize("bits", list(range(1, 9)))
@pytest.mark.parametrize("m", [1, 7, 8, 13, 64])
def test_unpack_to_values_equals_table_of_unpack(bits: int, m: int) -> None:
    from tqindex.packing import unpack_to_values

    g = torch.Generator().manual_seed(bits * 100 + m)
    v = torch.randint(0, 1 << bits, (9, m), generator=g)
    packed = pack_bits(v, bits)
    table = torch.randn(1 << bits, generator=g)
    out = unpack_to_values(packed, bits, m, table)
    assert out.shape == (9, m) and torch.equal(out, table[v])


def test_unpack_to_values_bad_table() -> None:
    from tqindex.packing import unpack_to_values

    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        unpack_to_values(torch.zeros(2, 4, dtype=torch.uint8), 4, 8, torch.zeros(8))

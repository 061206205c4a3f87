"""Bit packing: b-bit unsigned integers (b in 1..8) <-> uint8 rows, as one LSB-first bit stream.

Layout (what the Triton kernels read): in each row, value j occupies bits [j*b, j*b + b) of the
row's bit stream, where bit i of the stream is bit (i % 8) of byte (i // 8). A row of m values
therefore takes ceil(m * b / 8) bytes; the unused high bits of the last byte are zero.
"""

from __future__ import annotations

import torch

__all__ = ["packed_size", "pack_bits", "unpack_bits", "unpack_to_values"]


def packed_size(m: int, bits: int) -> int:
    """Bytes for a row of ``m`` values of ``bits`` bits: ceil(m * bits / 8)."""
    return (m * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (n, m) integers in [0, 2**bits) into (n, ceil(m*bits/8)) uint8.

    Every 8 values form ``bits`` bytes, so the work is one int64 word per 8 values.
    """
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (n, m), got shape {tuple(values.shape)}")
    n, m = values.shape
    nbytes = packed_size(m, bits)
    if bits == 8:
        return values.to(torch.uint8).contiguous()
    groups = (m + 7) // 8
    v = values.to(torch.int64)
    if groups * 8 != m:
        v = torch.nn.functional.pad(v, (0, groups * 8 - m))
    v = v.reshape(n, groups, 8)
    shifts = torch.arange(8, device=v.device, dtype=torch.int64) * bits
    word = (v << shifts).sum(dim=-1)  # (n, groups), at most 56 bits used
    byte_shifts = torch.arange(bits, device=v.device, dtype=torch.int64) * 8
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # (n, groups, bits)
    return out.reshape(n, groups * bits)[:, :nbytes].contiguous()


def _check_packed(packed: torch.Tensor, bits: int, m: int) -> None:
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[1] != packed_size(m, bits):
        raise ValueError(
            f"packed rows have {packed.shape[1]} bytes, expected ceil({m}*{bits}/8) = {packed_size(m, bits)}")


def _group_words(packed: torch.Tensor, bits: int, m: int, wide: torch.dtype) -> torch.Tensor:
    """(n, nb) uint8 -> (n, ceil(m/8)) ``wide`` ints: the ``bits`` bytes of each group of 8 values as one word."""
    n, nb = packed.shape
    groups = (m + 7) // 8
    p = packed.to(wide)
    if groups * bits != nb:
        p = torch.nn.functional.pad(p, (0, groups * bits - nb))
    byte_shifts = torch.arange(bits, device=p.device, dtype=wide) * 8
    return (p.reshape(n, groups, bits) << byte_shifts).sum(dim=-1, dtype=wide)


def _word_pieces(word: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """(n, groups) words -> (n, groups, count): consecutive ``width``-bit fields, LSB first."""
    shifts = torch.arange(count, device=word.device, dtype=word.dtype) * width
    return (word.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (n, ceil(m*bits/8)) uint8 -> (n, m) uint8 values."""
    _check_bits(bits)
    _check_packed(packed, bits, m)
    if bits == 8:
        return packed.clone()
    wide = torch.int32 if bits * 8 <= 31 else torch.int64  # a group of 8 values is one word
    vals = _word_pieces(_group_words(packed, bits, m, wide), bits, 8)  # (n, groups, 8)
    return vals.reshape(packed.shape[0], vals.shape[1] * 8)[:, :m].to(torch.uint8)


def _piece_codes(bits: int, per: int, device: torch.device) -> torch.Tensor:
    """(2**(bits*per), per) int64: the ``per`` values held by each possible run of bits*per bits, LSB first."""
    w = torch.arange(1 << (bits * per), device=device, dtype=torch.int64).unsqueeze(1)
    return (w >> (torch.arange(per, device=device, dtype=torch.int64) * bits)) & ((1 << bits) - 1)


# Values decoded per table lookup: whole bytes when bits divides 8, else runs of <= 12 bits in a
# group's word (3 bits: 4 values per 12-bit run; 5 and 6 bits: 2 values; 7 bits: 1).
_PER_LOOKUP = {1: 8, 2: 4, 3: 4, 4: 2, 5: 2, 6: 2, 7: 1, 8: 1}


def unpack_to_values(packed: torch.Tensor, bits: int, m: int, table: torch.Tensor) -> torch.Tensor:
    """(n, ceil(m*bits/8)) uint8 packed indices -> (n, m) ``table[index]`` (table: (2**bits,) float).

    Same result as ``table[unpack_bits(packed, bits, m).long()]``, with fewer passes: a small table
    of value tuples is indexed once per byte (bits dividing 8) or once per run of up to 12 bits of
    each 8-value group (other widths), instead of shifting and masking every value. The CPU search
    path spends most of its time here.
    """
    _check_bits(bits)
    if table.dim() != 1 or table.shape[0] != 1 << bits:
        raise ValueError(f"table must have shape ({1 << bits},) for {bits}-bit indices, got {tuple(table.shape)}")
    _check_packed(packed, bits, m)
    n, nb = packed.shape
    per = _PER_LOOKUP[bits]
    rows = table.to(packed.device)[_piece_codes(bits, per, packed.device)]  # (2**(bits*per), per)
    if 8 % bits == 0:  # a byte holds whole values
        return torch.nn.functional.embedding(packed.long(), rows).reshape(n, nb * per)[:, :m]
    pieces = _word_pieces(_group_words(packed, bits, m, torch.int64), bits * per, 8 // per)  # (n, groups, 8 // per)
    return torch.nn.functional.embedding(pieces, rows).reshape(n, pieces.shape[1] * 8)[:, :m]

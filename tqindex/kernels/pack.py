"""Fused quantize + bit-pack: rotated coordinates -> Lloyd-Max indices -> packed uint8 rows (Triton).

Same output as ``pack_bits(torch.bucketize(y, boundaries), bits)`` (the torch reference), in one
pass over y: each program takes a tile of rows and groups of 8 coordinates, counts the boundaries
below each value, assembles the 8 indices of a group into one word and writes its ``bits`` bytes.
"""

from __future__ import annotations

import torch

from tqindex.kernels.score import HAS_TRITON
from tqindex.packing import pack_bits, packed_size

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["quantize_pack_reference", "quantize_pack_triton"]


def quantize_pack_reference(y: torch.Tensor, boundaries: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, D) float32 values, (2**bits - 1,) sorted boundaries -> (n, ceil(bits*D/8)) uint8."""
    return pack_bits(torch.bucketize(y, boundaries), bits)


if HAS_TRITON:

    @triton.jit
    def _quantize_pack_kernel(
        Y, BND, OUT, n, stride_y, out_stride,
        D: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
    ):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        g = tl.program_id(1) * G + tl.arange(0, G)
        nmask = rn < n
        rn64 = rn.to(tl.int64)
        word = tl.zeros((BN, G), dtype=tl.int64)
        for j in tl.static_range(8):
            col = g * 8 + j
            m = nmask[:, None] & (col < D)[None, :]
            y = tl.load(Y + rn64[:, None] * stride_y + col[None, :], mask=m, other=0.0)
            idx = tl.zeros((BN, G), dtype=tl.int64)
            for i in tl.static_range(NB):
                idx += (y > tl.load(BND + i)).to(tl.int64)
            idx = tl.where(m, idx, 0)
            word = word | (idx << (j * BITS))
        nbytes = (D * BITS + 7) // 8
        for k in tl.static_range(BITS):
            col = g * BITS + k
            tl.store(OUT + rn64[:, None] * out_stride + col[None, :], ((word >> (8 * k)) & 255).to(tl.uint8),
                     mask=nmask[:, None] & (col < nbytes)[None, :])


def quantize_pack_triton(y: torch.Tensor, boundaries: torch.Tensor, bits: int) -> torch.Tensor:
    """Triton version of :func:`quantize_pack_reference` (identical output)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    y = y.to(torch.float32).contiguous()
    n, D = y.shape
    out = torch.empty(n, packed_size(D, bits), dtype=torch.uint8, device=y.device)
    if n == 0:
        return out
    groups = (D + 7) // 8
    G = 16 if groups >= 16 else (8 if groups >= 8 else (4 if groups >= 4 else (2 if groups >= 2 else 1)))
    BN = 32
    _quantize_pack_kernel[(triton.cdiv(n, BN), triton.cdiv(groups, G))](
        y, boundaries.to(y.device, torch.float32).contiguous(), out, n, y.stride(0), out.stride(0),
        D=D, BITS=bits, NB=(1 << bits) - 1, BN=BN, G=G,
    )
    return out

"""Fused quantize + bit-pack: rotated coordinates -> Lloyd-Max indices -> packed uint8 rows (Triton).

Same output as ``pack_bits(torch.bucketize(y, boundaries), bits)`` (the torch reference), in one
pass over y: each program takes a tile of rows and groups of 8 coordinates, counts the boundaries
below each value, assembles the 8 indices of a group into one word and writes its ``bits`` bytes.
"""

from __future__ import annotations

import torch

from tqindex.kernels.launch import follows_device
from tqindex.kernels.score import HAS_TRITON
from tqindex.kernels.tensor_cache import per_tensor
from tqindex.packing import pack_bits, packed_size

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["boundaries_with_inf", "quantize_pack_reference", "quantize_pack_triton"]


def quantize_pack_reference(y: torch.Tensor, boundaries: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, D) float32 values, (2**bits - 1,) sorted boundaries -> (n, ceil(bits*D/8)) uint8."""
    return pack_bits(torch.bucketize(y, boundaries), bits)


# Up to this many boundaries are counted one by one (compares against scalars, fastest for small
# codebooks); wider ones use a binary search of ``bits`` gathers (8 bits: 8 loads, not 255 compares,
# which also kept Triton compiling for tens of seconds).
LINEAR_MAX_BOUNDARIES = 15


if HAS_TRITON:

    @triton.jit
    def bucket_index(y, BND, NB: tl.constexpr, BITS: tl.constexpr, LINEAR: tl.constexpr):
        """int32 Lloyd-Max indices of a tile y: the number of the NB sorted boundaries at BND below each value
        (``torch.bucketize``); counted one by one if LINEAR, else a binary search of BITS loads (BND then holds
        2**BITS entries: the boundaries and a +inf sentinel)."""
        idx = tl.zeros(y.shape, dtype=tl.int32)
        if LINEAR:
            for i in tl.static_range(NB):
                idx += (y > tl.load(BND + i)).to(tl.int32)
        else:
            for k in tl.static_range(BITS):
                half = 1 << (BITS - 1 - k)
                idx += tl.where(y > tl.load(BND + idx + (half - 1)), half, 0)
        return idx

    @triton.jit
    def _quantize_pack_kernel(
        Y, BND, CB, APPROX, OUT, n, stride_y, out_stride, approx_stride,
        D: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr, LINEAR: tl.constexpr, WRITE_APPROX: tl.constexpr,
        BN: tl.constexpr, G: tl.constexpr,
    ):
        """One (BN rows, G groups of 8 coordinates) tile: indices = #boundaries < y, packed LSB-first.

        BND holds the NB sorted boundaries followed by +inf (2**BITS entries) for the binary search.
        With WRITE_APPROX the centroid values CB[idx] are also written to APPROX (n, D) float32.
        """
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        g = tl.program_id(1) * G + tl.arange(0, G)
        nmask = rn < n
        rn64 = rn.to(tl.int64)
        word = tl.zeros((BN, G), dtype=tl.int64)
        for j in tl.static_range(8):
            col = g * 8 + j
            m = nmask[:, None] & (col < D)[None, :]
            y = tl.load(Y + rn64[:, None] * stride_y + col[None, :], mask=m, other=0.0)
            idx = tl.where(m, bucket_index(y, BND, NB, BITS, LINEAR), 0)
            if WRITE_APPROX:
                tl.store(APPROX + rn64[:, None] * approx_stride + col[None, :], tl.load(CB + idx), mask=m)
            word = word | (idx.to(tl.int64) << (j * BITS))
        nbytes = (D * BITS + 7) // 8
        for k in tl.static_range(BITS):
            col = g * BITS + k
            tl.store(OUT + rn64[:, None] * out_stride + col[None, :], ((word >> (8 * k)) & 255).to(tl.uint8),
                     mask=nmask[:, None] & (col < nbytes)[None, :])


@per_tensor
def boundaries_with_inf(boundaries: torch.Tensor) -> torch.Tensor:
    """(2**bits,) float32: the sorted boundaries then +inf, the table :func:`bucket_index` reads (cached per
    tensor storage and version, so an encode builds it once, not on every call)."""
    return torch.cat([boundaries.to(torch.float32).reshape(-1),
                      torch.full((1,), float("inf"), device=boundaries.device)])


@follows_device
def quantize_pack_triton(
    y: torch.Tensor, boundaries: torch.Tensor, bits: int, centroids: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_pack_reference` (identical output).

    y: (n, D); boundaries: (2**bits - 1,) sorted. Returns the packed (n, ceil(bits*D/8)) uint8 rows;
    with ``centroids`` ((2**bits,)) also the (n, D) float32 values ``centroids[index]``, from the
    same pass (what a PROD encode needs for its residual).
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nb = (1 << bits) - 1
    if boundaries.numel() != nb:
        raise ValueError(f"{bits}-bit codes need {nb} boundaries, got {boundaries.numel()}")
    y = y.to(torch.float32).contiguous()
    n, D = y.shape
    out = torch.empty(n, packed_size(D, bits), dtype=torch.uint8, device=y.device)
    approx = torch.empty(n, D, dtype=torch.float32, device=y.device) if centroids is not None else None
    if n == 0:
        return out if approx is None else (out, approx)
    bnd = boundaries_with_inf(boundaries.to(y.device))
    cb = centroids.to(y.device, torch.float32).contiguous() if centroids is not None else bnd
    groups = (D + 7) // 8
    G = 16 if groups >= 16 else (8 if groups >= 8 else (4 if groups >= 4 else (2 if groups >= 2 else 1)))
    BN = 32
    _quantize_pack_kernel[(triton.cdiv(n, BN), triton.cdiv(groups, G))](
        y, bnd, cb, approx if approx is not None else out, out, n, y.stride(0), out.stride(0),
        approx.stride(0) if approx is not None else 0,
        D=D, BITS=bits, NB=nb, LINEAR=nb <= LINEAR_MAX_BOUNDARIES, WRITE_APPROX=approx is not None, BN=BN, G=G,
    )
    return out if approx is None else (out, approx)

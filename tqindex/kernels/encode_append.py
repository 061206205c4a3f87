"""KV-cache encode in one launch: tokens (B, H, n, d) -> TurboQuant-MSE codes written into the cache's buffers.

What :meth:`tqindex.codec.TurboQuantMSE.encode_tensor` does (norm, unit vector, Haar rotation,
Lloyd-Max indices, bit packing) plus the append to the cache's (B, H, cap, bytes) code buffer and
(B, H, cap) norm buffer, in one Triton program per (b, h, tile of BN tokens): the decode step's
two streams cost two launches instead of about thirty small torch operations each.

The rotation is applied phase by phase (rows of the rotation in the decode kernel's phase-major
order, :func:`tqindex.kernels.decode_attention._phase_rotation`), so a group word of ``PH``
coordinates is assembled from ``PH`` (BN, d / PH) tiles without interleaving. Codes equal the
codec's except where an fp32 rounding of the rotated coordinate (a different summation order than
torch's matmul) crosses a bucket boundary (tested: >= 99.9% of indices equal, norms to fp16 rounding).
"""

from __future__ import annotations

import torch

from tqindex.kernels.attention import HAS_TRITON
from tqindex.kernels.decode_attention import _BITS, _phase_rotation, _phases  # the layout the decode kernel reads
from tqindex.kernels.pack import LINEAR_MAX_BOUNDARIES, boundaries_with_inf

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tqindex.kernels.pack import bucket_index

__all__ = ["encode_append_ok", "encode_append_triton"]


def encode_append_ok(dim: int, bits: int) -> bool:
    """Whether :func:`encode_append_triton` codes ``dim``-dimensional tokens at ``bits`` bits: d a power of two
    up to 128, bits 1, 2, 3, 4, 6 or 8, and at least 16 coordinates per phase (a ``tl.dot`` side). Above 128
    (Gemma's 256) the (d / PH, d) rotation tile spills registers (thousands of local loads in the sm_90 build),
    so those heads keep the codec's torch path."""
    if not HAS_TRITON or bits not in _BITS or dim < 16 or dim > 128 or dim & (dim - 1):
        return False
    ph, _ = _phases(bits)
    return dim % ph == 0 and dim // ph >= 16


if HAS_TRITON:

    @triton.jit
    def _encode_append_kernel(X, RP, BND, MSE, NRM, n, cap, start, sx_b, sx_h, sx_n, n_heads, nbytes,
                              D: tl.constexpr, BITS: tl.constexpr, PH: tl.constexpr, GB: tl.constexpr,
                              KP: tl.constexpr, NB: tl.constexpr, LINEAR: tl.constexpr, BN: tl.constexpr):
        """Tokens [tile) of one (b, h): x (BN, D) -> norms and packed phase-major indices at rows start + rn."""
        bh = tl.program_id(0)
        b = bh // n_heads
        h = bh % n_heads
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = rn < n
        rd = tl.arange(0, D)
        xp = X + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + rn.to(tl.int64)[:, None] * sx_n + rd[None, :]
        x = tl.load(xp, mask=nmask[:, None], other=0.0).to(tl.float32)
        nrm = tl.sqrt(tl.sum(x * x, axis=1))
        y = x / tl.maximum(nrm, 1.1754943508222875e-38)[:, None]
        rk = tl.arange(0, KP)
        word = tl.zeros((BN, KP), dtype=tl.int32)
        for t in tl.static_range(PH):
            r = tl.load(RP + (t * KP + rk)[:, None] * D + rd[None, :])  # (KP, D): rotation rows of phase t
            # (BN, KP) rotated coordinates g * PH + t; tf32x3 (three tensor-core passes, about fp32's accuracy):
            # an "ieee" fp32 dot here is scalar FMAs over spilled registers, ~0.1 ms a launch on an H200
            yt = tl.dot(y, tl.trans(r), input_precision="tf32x3")
            word = word | (bucket_index(yt, BND, NB, BITS, LINEAR) << (t * BITS))
        rows = bh.to(tl.int64) * cap + start + rn
        for j in tl.static_range(GB):
            tl.store(MSE + rows[:, None] * nbytes + (rk * GB + j)[None, :], ((word >> (8 * j)) & 255).to(tl.uint8),
                     mask=nmask[:, None])
        tl.store(NRM + rows, nrm.to(NRM.dtype.element_ty), mask=nmask)


def encode_append_triton(x: torch.Tensor, codec, mse: torch.Tensor, norms: torch.Tensor, start: int) -> None:
    """Encode tokens x and write them at token ``start`` of the cache's buffers.

    Args:
        x: (B, H, n, d) float tokens (any strides with a unit last one).
        codec: the stream's :class:`tqindex.codec.TurboQuantMSE` (Haar rotation, ``encode_append_ok``).
        mse: (B, H, cap, ceil(d * bits / 8)) uint8 code buffer, contiguous; norms: (B, H, cap) buffer.
        start: first token row to write; rows [start, start + n) must fit in cap.
    """
    b, h, n, d = x.shape
    bits = codec.mse_bits
    if not encode_append_ok(d, bits) or codec.dim != d:
        raise ValueError(f"encode_append_triton takes a power-of-two 16 <= d <= 128 with bits in {_BITS} and >= 16 "
                         f"coordinates per phase (encode_append_ok), got d={d}, bits={bits}")
    cap = mse.shape[2]
    if start + n > cap or norms.shape[2] != cap or not mse.is_contiguous() or not norms.is_contiguous():
        raise ValueError(f"buffers of {cap} tokens cannot take tokens [{start}, {start + n})")
    if n == 0:
        return
    if x.stride(-1) != 1:
        x = x.contiguous()
    ph, gb = _phases(bits)
    _, rp = _phase_rotation(codec.rotation.matrix, bits)  # (d, d) float32, rows phase-major
    nb = (1 << bits) - 1
    bn = 16  # with 4 warps: no register spills for d = 128 (sm_90 compile), one tile for a decode step's token
    _encode_append_kernel[(b * h, triton.cdiv(n, bn))](
        x, rp, boundaries_with_inf(codec.boundaries), mse, norms, n, cap, start, x.stride(0), x.stride(1), x.stride(2), h, mse.shape[-1],
        D=d, BITS=bits, PH=ph, GB=gb, KP=d // ph, NB=nb, LINEAR=nb <= LINEAR_MAX_BOUNDARIES, BN=bn, num_warps=4,
    )

"""KV-cache encode in one launch: tokens (B, H, n, d) -> TurboQuant-MSE codes written into the cache's buffers.

What :meth:`tqindex.codec.TurboQuantMSE.encode_tensor` does (norm, unit vector, Haar rotation,
Lloyd-Max indices, bit packing) plus the append to the cache's (B, H, cap, bytes) code buffer and
(B, H, cap) norm buffer, in one Triton program per (b, h, tile of BN tokens, stream): the decode step's
two streams cost one launch instead of about thirty small torch operations each.

The rotation is applied phase by phase (rows of the rotation in the decode kernel's phase-major
order, :func:`tqindex.kernels.decode_attention._phase_rotation`), so a group word of ``PH``
coordinates is assembled from ``PH`` (BN, d / PH) tiles without interleaving. Codes equal the
codec's except where an fp32 rounding of the rotated coordinate (a different summation order than
torch's matmul) crosses a bucket boundary (tested: >= 99.9% of indices equal, norms to fp16 rounding).
"""

from __future__ import annotations

import torch

from tqindex.kernels.attention import HAS_TRITON, _cdiv
from tqindex.kernels.decode_attention import _BITS, _phase_rotation, _phases  # the layout the decode kernel reads
from tqindex.kernels.launch import int_spec, launch
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
    def _encode_tile(X, RP, BND, MSE, NRM, n, cap, start, sx_b, sx_h, sx_n, n_heads, nbytes,
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

    @triton.jit
    def _encode_append_kernel(X, RP, BND, MSE, NRM, cap, start, sx_b, sx_h, sx_n, nbytes,
                              X1, RP1, BND1, MSE1, NRM1, cap1, start1, sx1_b, sx1_h, sx1_n, nbytes1, n, n_heads,
                              D: tl.constexpr, BITS: tl.constexpr, PH: tl.constexpr, GB: tl.constexpr,
                              KP: tl.constexpr, NB: tl.constexpr, LINEAR: tl.constexpr,
                              BITS1: tl.constexpr, PH1: tl.constexpr, GB1: tl.constexpr, KP1: tl.constexpr,
                              NB1: tl.constexpr, LINEAR1: tl.constexpr, BN: tl.constexpr):
        """Grid (B * H, tiles, streams): stream 0 (X ... nbytes) or, with a third grid dimension of 2, stream 1."""
        if tl.program_id(2) == 0:
            _encode_tile(X, RP, BND, MSE, NRM, n, cap, start, sx_b, sx_h, sx_n, n_heads, nbytes,
                         D, BITS, PH, GB, KP, NB, LINEAR, BN)
        else:
            _encode_tile(X1, RP1, BND1, MSE1, NRM1, n, cap1, start1, sx1_b, sx1_h, sx1_n, n_heads, nbytes1,
                         D, BITS1, PH1, GB1, KP1, NB1, LINEAR1, BN)


def _check(x: torch.Tensor, codec, mse: torch.Tensor, norms: torch.Tensor, start: int) -> torch.Tensor:
    b, h, n, d = x.shape
    bits = codec.mse_bits
    if codec.dim != d or not encode_append_ok(d, bits):
        raise ValueError(f"encode_append_triton takes a power-of-two 16 <= d <= 128 with bits in {_BITS} and >= 16 "
                         f"coordinates per phase (encode_append_ok), got d={d}, bits={bits}")
    ms, ns = mse.shape, norms.shape
    if start + n > ms[2] or ns[2] != ms[2] or not mse.is_contiguous() or not norms.is_contiguous():
        raise ValueError(f"buffers of {ms[2]} tokens cannot take tokens [{start}, {start + n})")
    if ms[0] != b or ms[1] != h or ns[0] != b or ns[1] != h:
        raise ValueError(f"buffers of (batch, heads) {tuple(ms[:2])} cannot take tokens of {(b, h)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _static(codec) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(phase-major rotation (d, d) fp32, +inf-terminated boundaries, constexprs) of a codec."""
    bits = codec.mse_bits
    ph, gb = _phases(bits)
    _, rp = _phase_rotation(codec.rotation.matrix, bits)  # (d, d) float32, rows phase-major
    nb = (1 << bits) - 1
    return rp, boundaries_with_inf(codec.boundaries), dict(BITS=bits, PH=ph, GB=gb, KP=codec.dim // ph, NB=nb,
                                                            LINEAR=nb <= LINEAR_MAX_BOUNDARIES)


def encode_append_triton(x: torch.Tensor, codec, mse: torch.Tensor, norms: torch.Tensor, start: int,
                         second: tuple | None = None, cache: dict | None = None) -> None:
    """Encode tokens x and write them at token ``start`` of the cache's buffers (one launch).

    Args:
        x: (B, H, n, d) float tokens (any strides with a unit last one).
        codec: the stream's :class:`tqindex.codec.TurboQuantMSE` (Haar rotation, ``encode_append_ok``).
        mse: (B, H, cap, ceil(d * bits / 8)) uint8 code buffer, contiguous; norms: (B, H, cap) buffer.
        start: first token row to write; rows [start, start + n) must fit in cap.
        second: optionally a second stream's ``(x, codec, mse, norms, start)`` with tokens of the same shape
            (a layer's values beside its keys), coded in the same launch.
        cache: a dict kept by the caller for as long as these codecs live (a cache layer's): the codecs'
            tables and the compiled kernel are kept there (:func:`tqindex.kernels.launch.launch`).
    Raises:
        ValueError: a head size / width the kernel does not take, or buffers that cannot hold the tokens
            (nothing is written).
    """
    b, h, n, d = x.shape
    x = _check(x, codec, mse, norms, start)
    if second is not None:
        if second[0].shape != x.shape:
            raise ValueError(f"the second stream's tokens have shape {tuple(second[0].shape)}, expected {tuple(x.shape)}")
        second = (_check(*second),) + tuple(second[1:])
    if n == 0:
        return
    codecs = (codec, codec if second is None else second[1])
    static = cache.get(codecs) if cache is not None else None
    if static is None:
        (rp0, bnd0, c0), (rp1, bnd1, c1) = _static(codecs[0]), _static(codecs[1])
        static = (rp0, bnd0, rp1, bnd1, dict(D=d, **c0, **{k + "1": v for k, v in c1.items()}, BN=16, num_warps=4))
        if cache is not None:  # the codecs are the cache owner's for its lifetime: their id cannot be reused
            cache[codecs] = static
    rp0, bnd0, rp1, bnd1, consts = static
    y, m1, n1, s1 = (x, mse, norms, start) if second is None else (second[0], second[2], second[3], second[4])
    sx, sy = x.stride(), y.stride()
    args = (x, rp0, bnd0, mse, norms, mse.shape[2], start, sx[0], sx[1], sx[2], mse.shape[3],
            y, rp1, bnd1, m1, n1, m1.shape[2], s1, sy[0], sy[1], sy[2], m1.shape[3], n, h)
    key = None
    if cache is not None:
        key = (id(codecs[0]), id(codecs[1]), x.dtype, y.dtype, norms.dtype, n1.dtype, d) + tuple(
            map(int_spec, (mse.shape[2], start, sx[0], sx[1], sx[2], m1.shape[2], s1, sy[0], sy[1], sy[2], n, h)))
    # BN = 16 with 4 warps: no register spills for d = 128 at 4 bits (sm_90 build), one tile for a decode step
    launch(_encode_append_kernel, (b * h, _cdiv(n, 16), 1 if second is None else 2), *args, cache=cache, key=key,
           **consts)

"""Fused code scan + top-k: scores packed codes and keeps only each chunk's best M per query.

For every query and every chunk of ``chunk`` consecutive codes, the kernel returns the M largest
(similarity, slot) pairs, packed into one int64 key (order-preserving float bits in the high 32
bits, the slot in the low 32), so the (nq, n) score matrix is never written to memory. With
M >= the number of candidates wanted, the top candidates of the whole scan are exactly the top
of these keys. Similarity is the estimated inner product, or 2<q,x> - ||x||^2 for l2 (the
squared distance up to the query's constant ||q||^2, negated).

:func:`scan_topk_reference` is the plain-torch reference with the same contract.
"""

from __future__ import annotations

import torch

from tqindex.kernels.score import HAS_TRITON, score_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["scan_topk", "scan_topk_reference", "scan_topk_triton", "decode_keys", "MAX_M"]

MAX_M = 128  # largest per-chunk selection the kernel supports (register budget)


def _float_to_key_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 whose signed order is the float order (-inf lowest)."""
    b = x.contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 similarity, int64 slot)."""
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def encode_keys(sim: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(float32 similarity, int64 slot) -> int64 keys (same shape)."""
    return (_float_to_key_bits(sim.to(torch.float32)).to(torch.int64) << 32) | (slots & 0xFFFFFFFF)


def scan_topk_reference(
    qr: torch.Tensor,
    qs: torch.Tensor | None,
    mse: torch.Tensor,
    qjl: torch.Tensor | None,
    norms: torch.Tensor,
    gammas: torch.Tensor | None,
    centroids: torch.Tensor,
    *,
    mse_bits: int,
    padded_dim: int,
    qjl_scale: float,
    m: int,
    l2: bool = False,
    allowed: torch.Tensor | None = None,
    slot_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``m`` (similarity, slot) per query over all n codes: ((nq, m') float32, (nq, m') int64), m' = min(m, n).

    Disallowed codes (``allowed`` (n,) bool False) get -inf. Slots are offset by ``slot_offset``.
    """
    s = score_reference(qr, qs, mse, qjl, norms, gammas, centroids, mse_bits=mse_bits, padded_dim=padded_dim,
                        qjl_scale=qjl_scale)
    if l2:
        s = 2 * s - norms.to(torch.float32).square().unsqueeze(0)
    if allowed is not None:
        s = s.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    v, i = torch.topk(s, min(m, s.shape[1]), dim=1)
    return v, i + slot_offset


if HAS_TRITON:

    @triton.jit
    def _scan_topk_kernel(
        QR, QS, QRS, QSS, MSE, QJL, NORM, GAMMA, CB, ALLOW, OUT,
        nq, n, mse_stride, qjl_stride, qjl_scale, slot_offset, n_chunks,
        stride_qr, stride_qs,
        D: tl.constexpr, MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr,
        BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, TILES: tl.constexpr, M: tl.constexpr,
        FP16: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_c = tl.program_id(1)
        rq = pid_q * BQ + tl.arange(0, BQ)
        qmask = rq < nq
        qrs = tl.load(QRS + rq, mask=qmask, other=0.0)
        qss = tl.load(QSS + rq, mask=qmask, other=0.0) if HAS_QJL else qrs
        best = tl.full((BQ, M), -9223372036854775807 - 1, tl.int64)
        for t in range(TILES):
            rn = (pid_c * TILES + t) * BN + tl.arange(0, BN)
            nmask = rn < n
            rn64 = rn.to(tl.int64)
            acc = tl.zeros((BQ, BN), dtype=tl.float32)
            acc2 = tl.zeros((BQ, BN), dtype=tl.float32)
            for d0 in range(0, D, BD):
                rd = d0 + tl.arange(0, BD)
                dmask = rd < D
                m2 = nmask[:, None] & dmask[None, :]
                if MSE_BITS > 0:
                    q = tl.load(QR + rq[:, None] * stride_qr + rd[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
                    bit = rd * MSE_BITS
                    byte = bit >> 3
                    sh = bit & 7
                    lo = tl.load(MSE + rn64[:, None] * mse_stride + byte[None, :], mask=m2, other=0).to(tl.int32)
                    if (8 % MSE_BITS) != 0:
                        hmask = m2 & (byte[None, :] + 1 < mse_stride)
                        hi = tl.load(MSE + rn64[:, None] * mse_stride + byte[None, :] + 1, mask=hmask, other=0).to(tl.int32)
                        lo = lo | (hi << 8)
                    v = (lo >> sh[None, :]) & ((1 << MSE_BITS) - 1)
                    c = tl.load(CB + v)
                    c = tl.where(m2, c, 0.0)
                    if FP16:
                        acc += tl.dot(q.to(tl.float16), tl.trans(c.to(tl.float16)))
                    else:
                        acc += tl.dot(q, tl.trans(c))
                if HAS_QJL:
                    qs = tl.load(QS + rq[:, None] * stride_qs + rd[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
                    b = tl.load(QJL + rn64[:, None] * qjl_stride + (rd >> 3)[None, :], mask=m2, other=0).to(tl.int32)
                    z = ((b >> (rd & 7)[None, :]) & 1).to(tl.float32) * 2.0 - 1.0
                    z = tl.where(m2, z, 0.0)
                    if FP16:
                        acc2 += tl.dot(qs.to(tl.float16), tl.trans(z.to(tl.float16)))
                    else:
                        acc2 += tl.dot(qs, tl.trans(z))
            norm = tl.load(NORM + rn, mask=nmask, other=0.0).to(tl.float32)
            res = acc * qrs[:, None]
            if HAS_QJL:
                gam = tl.load(GAMMA + rn, mask=nmask, other=0.0).to(tl.float32)
                res = res + acc2 * qss[:, None] * (gam * qjl_scale)[None, :]
            res = res * norm[None, :]
            if L2:
                res = 2.0 * res - (norm * norm)[None, :]
            keep = nmask
            if HAS_FILTER:
                keep = keep & (tl.load(ALLOW + rn, mask=nmask, other=0) != 0)
            res = tl.where(keep[None, :], res, float("-inf"))
            bits = res.to(tl.int32, bitcast=True)
            bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            slot = (rn64 + slot_offset) & 0xFFFFFFFF
            keys = (bits.to(tl.int64) << 32) | slot[None, :]
            if BN > M:
                top = tl.topk(keys, M, dim=1)
            else:
                top = keys
            if BN < M:
                # pad the tile to M columns with -inf keys before merging
                top = tl.reshape(tl.join(top, tl.full((BQ, BN), -9223372036854775807 - 1, tl.int64)), (BQ, 2 * BN))
            merged = tl.reshape(tl.join(best, top), (BQ, 2 * M))
            best = tl.topk(merged, M, dim=1)
        rm = tl.arange(0, M)
        out_ptr = OUT + (rq[:, None].to(tl.int64) * n_chunks + pid_c) * M + rm[None, :]
        tl.store(out_ptr, best, mask=qmask[:, None])


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def scan_topk_triton(
    qr: torch.Tensor,
    qs: torch.Tensor | None,
    mse: torch.Tensor,
    qjl: torch.Tensor | None,
    norms: torch.Tensor,
    gammas: torch.Tensor | None,
    centroids: torch.Tensor,
    *,
    mse_bits: int,
    padded_dim: int,
    qjl_scale: float,
    m: int,
    l2: bool = False,
    allowed: torch.Tensor | None = None,
    slot_offset: int = 0,
    fp16: bool = True,
    tiles: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`scan_topk_reference` (same contract; ``m`` <= MAX_M)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, n = qr.shape[0], norms.shape[0]
    if m > MAX_M:
        raise ValueError(f"scan_topk_triton keeps at most {MAX_M} candidates per query, got m={m}")
    if nq == 0 or n == 0:
        return (torch.empty(nq, 0, device=qr.device), torch.empty(nq, 0, dtype=torch.int64, device=qr.device))
    M = max(16, _pow2_at_least(m))
    has_qjl = qjl is not None
    # Unit-norm query rows keep fp16 operands in range; the row norms multiply the result back.
    qr32 = qr.to(torch.float32)
    qrs = torch.linalg.vector_norm(qr32, dim=1).clamp_min(1e-30)
    qr_u = (qr32 / qrs.unsqueeze(1)).contiguous()
    if has_qjl:
        qs32 = qs.to(torch.float32)
        qss = torch.linalg.vector_norm(qs32, dim=1).clamp_min(1e-30)
        qs_u = (qs32 / qss.unsqueeze(1)).contiguous()
    else:
        qss, qs_u = qrs, qr_u
    mse_c = mse.contiguous() if mse_bits > 0 else qjl.contiguous()
    qjl_c = qjl.contiguous() if has_qjl else mse_c
    gam = gammas.contiguous() if has_qjl else norms.contiguous()
    cb = centroids.to(qr.device, torch.float32).contiguous()
    allow = allowed.to(torch.uint8).contiguous() if allowed is not None else mse_c
    BQ = 16 if nq <= 16 else 32
    BN = 64
    BD = 32 if padded_dim <= 32 else 64
    tiles = max(1, min(tiles, triton.cdiv(n, BN)))
    n_chunks = triton.cdiv(n, BN * tiles)
    out = torch.empty(nq, n_chunks, M, dtype=torch.int64, device=qr.device)
    grid = (triton.cdiv(nq, BQ), n_chunks)
    _scan_topk_kernel[grid](
        qr_u, qs_u, qrs.contiguous(), qss.contiguous(), mse_c, qjl_c, norms.contiguous(), gam, cb, allow, out,
        nq, n, mse.shape[1] if mse_bits > 0 else 1, qjl.shape[1] if has_qjl else 1, float(qjl_scale),
        int(slot_offset), n_chunks, qr_u.stride(0), qs_u.stride(0),
        D=padded_dim, MSE_BITS=mse_bits, HAS_QJL=has_qjl, L2=bool(l2), HAS_FILTER=allowed is not None,
        BQ=BQ, BN=BN, BD=BD, TILES=tiles, M=M, FP16=bool(fp16),
    )
    keys = out.reshape(nq, n_chunks * M)
    kk = min(m, n, keys.shape[1])
    top, _ = torch.topk(keys, kk, dim=1)
    sim, slot = decode_keys(top)
    return sim, slot


def scan_topk(*args: object, use_kernel: bool, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the Triton kernel or the torch reference."""
    if use_kernel:
        return scan_topk_triton(*args, **kwargs)  # type: ignore[arg-type]
    kwargs.pop("fp16", None)
    kwargs.pop("tiles", None)
    return scan_topk_reference(*args, **kwargs)  # type: ignore[arg-type]

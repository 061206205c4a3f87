"""Fused code scan + top-k: the best m codes per query without writing the (nq, n) score matrix.

Two Triton passes (see :func:`scan_topk_triton`): tile maxima with tensor-core dots over the
packed codes, then exact scores of the m best tiles per query. Similarity is the estimated inner
product, or 2<q,x> - ||x||^2 for l2 (the squared distance up to the query's ||q||^2, negated).

:func:`scan_topk_reference` is the plain-torch reference with the same contract.
"""

from __future__ import annotations

import torch

from tqindex.kernels.launch import follows_device
from tqindex.kernels.score import HAS_TRITON, CodeArgs, code_args, score_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tqindex.kernels.score import _dot_tile, _unpack_tile

__all__ = ["scan_topk", "scan_topk_reference", "scan_topk_triton", "scan_topk_gemm", "dequantize_scaled", "MAX_M"]

MAX_M = 1024  # most candidates per query the kernel path selects (pass 2 holds nq * m * block_n floats)


def scan_topk_reference(
    qr: torch.Tensor,
    qs: torch.Tensor | None,
    c: CodeArgs,
    *,
    m: int,
    allowed: torch.Tensor | None = None,
    slot_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``m`` (similarity, slot) per query over all n codes of ``c``: ((nq, m') float32, (nq, m') int64),
    m' = min(m, n); qr (nq, D) rotated queries, qs (nq, D) = S qr for PROD codes (else None).

    Disallowed codes (``allowed`` (n,) bool False) get -inf. Slots are offset by ``slot_offset``.
    """
    mse, qjl, norms, gammas, centroids = c.mse, c.qjl, c.norms, c.gammas, c.centroids
    mse_bits, padded_dim, qjl_scale, l2 = c.mse_bits, c.padded_dim, c.qjl_scale, c.l2
    s = score_reference(qr, qs, mse, qjl, norms, gammas, centroids, mse_bits=mse_bits, padded_dim=padded_dim,
                        qjl_scale=qjl_scale)
    if l2:
        s = 2 * s - norms.to(torch.float32).square().unsqueeze(0)
    if allowed is not None:
        s = s.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    v, i = torch.topk(s, min(m, s.shape[1]), dim=1)
    return v, i + slot_offset


def _best_in_tiles(
    tiles: torch.Tensor, sel: torch.Tensor, m: int, n: int, slot_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top min(m, n) of the scores ``tiles`` (nq, n_sel, BN) of the selected tiles ``sel`` (nq, n_sel).

    Returns (values (nq, m'), slots (nq, m') int64): slot = tile * BN + position + slot_offset.
    """
    nq, n_sel, bn = tiles.shape
    v, j = torch.topk(tiles.reshape(nq, n_sel * bn), min(m, n), dim=1)
    return v, sel.to(torch.int64).gather(1, j // bn) * bn + (j % bn) + slot_offset


if HAS_TRITON:

    @triton.jit
    def _finish_scores(acc, acc2, NORM, GAMMA, ALLOW, rn, nmask, qrs, qss, qjl_scale,
                       HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr):
        """Similarities from the accumulated dot products: norms, QJL scale, l2 and filter applied."""
        norm = tl.load(NORM + rn, mask=nmask, other=0.0).to(tl.float32)
        res = acc * qrs
        if HAS_QJL:
            gam = tl.load(GAMMA + rn, mask=nmask, other=0.0).to(tl.float32)
            res = res + acc2 * qss * (gam * qjl_scale)
        res = res * norm
        if L2:
            res = 2.0 * res - norm * norm
        keep = nmask
        if HAS_FILTER:
            keep = keep & (tl.load(ALLOW + rn, mask=nmask, other=0) != 0)
        return tl.where(keep, res, float("-inf"))

    @triton.jit
    def _tile_max_kernel(
        QR, QS, QRS, QSS, MSE, QJL, NORM, GAMMA, CB, ALLOW, OUT,
        nq, n, mse_stride, qjl_stride, qjl_scale, n_tiles,
        stride_qr, stride_qs,
        D: tl.constexpr, MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr,
        HAS_FILTER: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, FP16: tl.constexpr,
    ):
        """Pass 1: OUT[q, t] = max similarity of query q over tile t of BN codes (tensor-core dots)."""
        pid_q = tl.program_id(0)
        pid_n = tl.program_id(1)
        rq = pid_q * BQ + tl.arange(0, BQ)
        rn = pid_n * BN + tl.arange(0, BN)
        qmask = rq < nq
        nmask = rn < n
        rn64 = rn.to(tl.int64)
        acc, acc2 = _dot_tile(QR, QS, MSE, QJL, CB, rq, qmask, rn64, nmask, mse_stride, qjl_stride, stride_qr,
                              stride_qs, D, MSE_BITS, HAS_QJL, BQ, BN, BD, FP16)
        qrs = tl.load(QRS + rq, mask=qmask, other=0.0)[:, None]
        qss = tl.load(QSS + rq, mask=qmask, other=0.0)[:, None]
        res = _finish_scores(acc, acc2, NORM, GAMMA, ALLOW, rn[None, :], nmask[None, :], qrs, qss, qjl_scale,
                             HAS_QJL, L2, HAS_FILTER)
        tl.store(OUT + rq.to(tl.int64) * n_tiles + pid_n, tl.max(res, axis=1), mask=qmask)

    @triton.jit
    def _tile_scores_kernel(
        QR, QS, QRS, QSS, MSE, QJL, NORM, GAMMA, CB, ALLOW, SEL, OUT,
        n, mse_stride, qjl_stride, qjl_scale, n_sel,
        stride_qr, stride_qs,
        D: tl.constexpr, MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr,
        HAS_FILTER: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Pass 2: OUT[q, j, :] = similarities of query q over the BN codes of tile SEL[q, j]."""
        qi = tl.program_id(0)
        j = tl.program_id(1)
        t = tl.load(SEL + qi * n_sel + j)
        rn = t * BN + tl.arange(0, BN)
        nmask = rn < n
        rn64 = rn.to(tl.int64)
        acc = tl.zeros((BN,), dtype=tl.float32)
        acc2 = tl.zeros((BN,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            dmask = rd < D
            c, z = _unpack_tile(MSE, QJL, CB, rn64, d0, nmask, dmask, mse_stride, qjl_stride, MSE_BITS, HAS_QJL, BD)
            q = tl.load(QR + qi * stride_qr + rd, mask=dmask, other=0.0)
            acc += tl.sum(c * q[None, :], axis=1)
            if HAS_QJL:
                qs = tl.load(QS + qi * stride_qs + rd, mask=dmask, other=0.0)
                acc2 += tl.sum(z * qs[None, :], axis=1)
        qrs = tl.load(QRS + qi)
        qss = tl.load(QSS + qi)
        res = _finish_scores(acc, acc2, NORM, GAMMA, ALLOW, rn, nmask, qrs, qss, qjl_scale, HAS_QJL, L2, HAS_FILTER)
        tl.store(OUT + (qi.to(tl.int64) * n_sel + j) * BN + tl.arange(0, BN), res)


def _unit_queries(qr: torch.Tensor, qs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(qr_u, qs_u, |qr|, |qs|): unit rows keep fp16 operands in range; the norms scale results back.

    Without a QJL part ``qs_u``/``|qs|`` repeat ``qr_u``/``|qr|`` (kernels need some pointer)."""
    qr32 = qr.to(torch.float32)
    qrs = torch.linalg.vector_norm(qr32, dim=1).clamp_min(1e-30)
    qr_u = (qr32 / qrs.unsqueeze(1)).contiguous()
    if qs is None:
        return qr_u, qr_u, qrs.contiguous(), qrs.contiguous()
    qs32 = qs.to(torch.float32)
    qss = torch.linalg.vector_norm(qs32, dim=1).clamp_min(1e-30)
    return qr_u, (qs32 / qss.unsqueeze(1)).contiguous(), qrs.contiguous(), qss.contiguous()


def _exact_top_m(
    tmax: torch.Tensor, qprep: tuple[torch.Tensor, ...], args: tuple, common: dict, *, qjl_scale: float,
    m: int, n: int, block_n: int, slot_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2 of both scans: exact float32 scores (from the codes) of each query's m best tiles
    by ``tmax`` (nq, n_tiles), then the top m of those: ((nq, m') float32, (nq, m') int64)."""
    qr_u, qs_u, qrs, qss = qprep
    mse_c, qjl_c, norms_c, gam, cb, allow, mse_stride, qjl_stride = args
    nq, n_tiles = tmax.shape
    n_sel = min(m, n_tiles)
    sel = torch.topk(tmax, n_sel, dim=1).indices.to(torch.int32).contiguous()  # (nq, n_sel) tile ids
    scores = torch.empty(nq, n_sel, block_n, dtype=torch.float32, device=tmax.device)
    _tile_scores_kernel[(nq, n_sel)](
        qr_u, qs_u, qrs, qss, mse_c, qjl_c, norms_c, gam, cb, allow, sel, scores,
        n, mse_stride, qjl_stride, float(qjl_scale), n_sel, qr_u.stride(0), qs_u.stride(0),
        BN=block_n, BD=_bd(common["D"]), **common,
    )
    return _best_in_tiles(scores, sel, m, n, slot_offset)


def _bd(padded_dim: int) -> int:
    return 32 if padded_dim <= 32 else 64


def _bq(nq: int) -> int:
    return 16 if nq <= 16 else (32 if nq <= 32 else (64 if nq <= 64 else 128))


def _constexprs(padded_dim: int, mse_bits: int, has_qjl: bool, l2: bool, filtered: bool) -> dict[str, object]:
    """The compile-time arguments both passes of both scans share."""
    return dict(D=padded_dim, MSE_BITS=mse_bits, HAS_QJL=has_qjl, L2=bool(l2), HAS_FILTER=filtered)


def _kernel_args(mse, qjl, norms, gammas, centroids, allowed, mse_bits: int) -> tuple:
    """:func:`code_args` plus the filter as uint8 (any pointer when there is none):
    (mse, qjl, norms, gammas, centroids, allow, mse_stride, qjl_stride)."""
    mse_c, qjl_c, norms_c, gam, cb, mse_stride, qjl_stride = code_args(mse, qjl, norms, gammas, centroids, mse_bits)
    allow = allowed.to(torch.uint8).contiguous() if allowed is not None else mse_c
    return mse_c, qjl_c, norms_c, gam, cb, allow, mse_stride, qjl_stride


@follows_device
def scan_topk_triton(
    qr: torch.Tensor,
    qs: torch.Tensor | None,
    c: CodeArgs,
    *,
    m: int,
    allowed: torch.Tensor | None = None,
    slot_offset: int = 0,
    fp16: bool = True,
    block_n: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`scan_topk_reference` (same contract), in two passes.

    Pass 1 writes only the maximum similarity of each (query, tile of ``block_n`` codes): an
    (nq, n / block_n) array instead of the (nq, n) scores. The m best codes of a query all lie in
    its m tiles with the largest maxima (a tile holding one of them has a maximum at least that
    large, and at most m - 1 other tiles can beat it), so pass 2 rescores just those m tiles per
    query and a final top-m over (nq, m * block_n) values is exact (up to float rounding ties).
    """
    mse, qjl, norms, gammas, centroids = c.mse, c.qjl, c.norms, c.gammas, c.centroids
    mse_bits, padded_dim, qjl_scale, l2 = c.mse_bits, c.padded_dim, c.qjl_scale, c.l2
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, n = qr.shape[0], norms.shape[0]
    dev = qr.device
    if nq == 0 or n == 0:
        return (torch.empty(nq, 0, device=dev), torch.empty(nq, 0, dtype=torch.int64, device=dev))
    qprep = _unit_queries(qr, qs)
    qr_u, qs_u, qrs, qss = qprep
    args = _kernel_args(mse, qjl, norms, gammas, centroids, allowed, mse_bits)
    mse_c, qjl_c, norms_c, gam, cb, allow, mse_stride, qjl_stride = args
    BN, BQ = block_n, _bq(nq)
    n_tiles = triton.cdiv(n, BN)
    common = _constexprs(padded_dim, mse_bits, qjl is not None, l2, allowed is not None)
    tmax = torch.empty(nq, n_tiles, dtype=torch.float32, device=dev)
    _tile_max_kernel[(triton.cdiv(nq, BQ), n_tiles)](
        qr_u, qs_u, qrs, qss, mse_c, qjl_c, norms_c, gam, cb, allow, tmax,
        nq, n, mse_stride, qjl_stride, float(qjl_scale), n_tiles, qr_u.stride(0), qs_u.stride(0),
        BQ=BQ, BN=BN, BD=_bd(padded_dim), FP16=bool(fp16), num_warps=8 if BQ >= 64 else 4, **common,
    )
    return _exact_top_m(tmax, qprep, args, common, qjl_scale=qjl_scale, m=m, n=n, block_n=BN,
                        slot_offset=slot_offset)


if HAS_TRITON:

    @triton.jit
    def _dequant_kernel(
        MSE, QJL, NORM, GAMMA, CB, OUT, n, mse_stride, qjl_stride, qjl_scale, out_stride,
        D: tl.constexpr, MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """OUT[j] = [norm_j * c[idx_j] | norm_j * gamma_j * qjl_scale * (2 z_j - 1)] for a (BN, BD) tile."""
        pid_n = tl.program_id(0)
        d0 = tl.program_id(1) * BD
        rn = pid_n * BN + tl.arange(0, BN)
        rd = d0 + tl.arange(0, BD)
        nmask = rn < n
        dmask = rd < D
        rn64 = rn.to(tl.int64)
        c, z = _unpack_tile(MSE, QJL, CB, rn64, d0, nmask, dmask, mse_stride, qjl_stride, MSE_BITS, HAS_QJL, BD)
        norm = tl.load(NORM + rn, mask=nmask, other=0.0).to(tl.float32)
        m2 = nmask[:, None] & dmask[None, :]
        base = OUT + rn64[:, None] * out_stride + rd[None, :]
        tl.store(base, (c * norm[:, None]).to(OUT.dtype.element_ty), mask=m2)
        if HAS_QJL:
            gam = tl.load(GAMMA + rn, mask=nmask, other=0.0).to(tl.float32)
            tl.store(base + D, (z * (norm * gam * qjl_scale)[:, None]).to(OUT.dtype.element_ty), mask=m2)


@follows_device
def dequantize_scaled(
    mse: torch.Tensor, qjl: torch.Tensor | None, norms: torch.Tensor, gammas: torch.Tensor | None,
    centroids: torch.Tensor, *, mse_bits: int, padded_dim: int, qjl_scale: float, dtype: torch.dtype,
) -> torch.Tensor:
    """A block of codes -> (n, D) or (n, 2D) rows [norm * c[idx] | norm * gamma * scale * z] (Triton).

    For a query row [Pi q | S Pi q], one matrix product with these rows gives the PROD estimate
    (the MSE estimate when there is no QJL part). The rows are a view with a 64-element pitch
    (128-byte aligned in fp16), so the scan's loads vectorise for any dimension. A transient per-block buffer, not a decoded copy
    of the database: rows stay in the rotated domain and are dropped after the block is scored.
    """
    n, D = norms.shape[0], padded_dim
    has_qjl = qjl is not None
    width = 2 * D if has_qjl else D
    pitch = -(-width // 64) * 64  # rows start 128-byte aligned (fp16): vectorised loads in the scan
    out = torch.empty(n, pitch, dtype=dtype, device=norms.device)[:, :width]
    if n == 0:
        return out
    mse_c, qjl_c, norms_c, gam, cb, mse_stride, qjl_stride = code_args(mse, qjl, norms, gammas, centroids, mse_bits)
    BN, BD = 64, (32 if D <= 32 else 64)
    _dequant_kernel[(triton.cdiv(n, BN), triton.cdiv(D, BD))](
        mse_c, qjl_c, norms_c, gam, cb, out, n, mse_stride, qjl_stride, float(qjl_scale), out.stride(0),
        D=D, MSE_BITS=mse_bits, HAS_QJL=has_qjl, BN=BN, BD=BD,
    )
    return out


if HAS_TRITON:

    @triton.jit
    def _rows_tile_max_kernel(
        Q, QN, ROWS, NORM, ALLOW, OUT, nq, n, q_stride, rows_stride, n_sub,
        K: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr, FP16: tl.constexpr,
        BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SUB: tl.constexpr,
    ):
        """OUT[q, s] = max over the SUB rows of sub-tile s of |q| * <Q[q], ROWS[j]> (2x that - ||x_j||^2 for l2).

        Q (nq, K) unit query rows, ROWS (n, K) dequantized scaled rows; fp32 accumulation, and the
        (nq, n) similarities never leave the chip. A program scores BN rows (BN / SUB sub-tiles).
        """
        pid_q = tl.program_id(0)
        pid_n = tl.program_id(1)
        rq = pid_q * BQ + tl.arange(0, BQ)
        rn = pid_n * BN + tl.arange(0, BN)
        qmask = rq < nq
        nmask = rn < n
        acc = tl.zeros((BQ, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < K
            q = tl.load(Q + rq.to(tl.int64)[:, None] * q_stride + rk[None, :],
                        mask=qmask[:, None] & kmask[None, :], other=0.0)
            r = tl.load(ROWS + rn.to(tl.int64)[:, None] * rows_stride + rk[None, :],
                        mask=nmask[:, None] & kmask[None, :], other=0.0)
            if FP16:
                acc += tl.dot(q.to(tl.float16), tl.trans(r.to(tl.float16)))
            else:
                acc += tl.dot(q.to(tl.float32), tl.trans(r.to(tl.float32)), input_precision="ieee")
        res = acc * tl.load(QN + rq, mask=qmask, other=0.0)[:, None]
        if L2:
            norm = tl.load(NORM + rn, mask=nmask, other=0.0).to(tl.float32)
            res = 2.0 * res - (norm * norm)[None, :]
        keep = nmask
        if HAS_FILTER:
            keep = keep & (tl.load(ALLOW + rn, mask=nmask, other=0) != 0)
        res = tl.where(keep[None, :], res, float("-inf"))
        sub_max = tl.max(tl.reshape(res, (BQ, BN // SUB, SUB)), axis=2)  # (BQ, BN // SUB)
        rs = pid_n * (BN // SUB) + tl.arange(0, BN // SUB)
        tl.store(OUT + rq.to(tl.int64)[:, None] * n_sub + rs[None, :], sub_max,
                 mask=qmask[:, None] & (rs < n_sub)[None, :])


TMAX_BUDGET = 1 << 29  # bytes of sub-tile maxima per block; wider sub-tiles beyond it


@follows_device
def scan_topk_gemm(
    qr: torch.Tensor,
    qs: torch.Tensor | None,
    c: CodeArgs,
    *,
    m: int,
    allowed: torch.Tensor | None = None,
    slot_offset: int = 0,
    block_n: int = 128,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`scan_topk_reference`: unpack once, then a matrix-unit scan.

    A Triton kernel unpacks the block's codes once into scaled fp16 rows (see
    :func:`dequantize_scaled`); pass 1 multiplies them with the unit queries on the tensor cores
    and keeps only the maximum of each (query, sub-tile of 16 rows), fp32-accumulated (the (nq, n)
    scores are never written; sub-tiles widen to 32..``block_n`` rows when the maxima of nq * n / 16
    sub-tiles would pass ``TMAX_BUDGET`` bytes); pass 2 (shared with :func:`scan_topk_triton`) scores
    the m best sub-tiles per query exactly in float32 from the codes. Small sub-tiles keep pass 2
    cheap for wide vectors (m * 16 codes per query instead of m * 128). Unlike the fused scan the
    codes are unpacked once per block, not once per block of queries.
    """
    mse, qjl, norms, gammas, centroids = c.mse, c.qjl, c.norms, c.gammas, c.centroids
    mse_bits, padded_dim, qjl_scale, l2 = c.mse_bits, c.padded_dim, c.qjl_scale, c.l2
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, n = qr.shape[0], norms.shape[0]
    dev = qr.device
    if nq == 0 or n == 0:
        return (torch.empty(nq, 0, device=dev), torch.empty(nq, 0, dtype=torch.int64, device=dev))
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    rows = dequantize_scaled(mse, qjl, norms, gammas, centroids, mse_bits=mse_bits, padded_dim=padded_dim,
                             qjl_scale=qjl_scale, dtype=dtype)
    K = rows.shape[1]
    q = torch.cat([qr, qs], dim=1) if qjl is not None else qr
    q32 = q.to(torch.float32)
    qn = torch.linalg.vector_norm(q32, dim=1).clamp_min(1e-30)
    q_u = torch.zeros(nq, rows.stride(0), dtype=dtype, device=dev)  # same aligned row pitch as rows
    q_u[:, :K] = q32 / qn.unsqueeze(1)
    args = _kernel_args(mse, qjl, norms, gammas, centroids, allowed, mse_bits)
    norms_c, allow = args[2], args[5]
    BN, BQ = block_n, _bq(nq)
    BK = 16 if K <= 16 else (32 if K <= 32 else 64)
    sub = min(16, BN)
    while sub < BN and nq * triton.cdiv(n, sub) * 4 > TMAX_BUDGET:
        sub *= 2
    n_sub = triton.cdiv(n, sub)
    tmax = torch.empty(nq, n_sub, dtype=torch.float32, device=dev)
    _rows_tile_max_kernel[(triton.cdiv(nq, BQ), triton.cdiv(n, BN))](
        q_u, qn.contiguous(), rows, norms_c, allow, tmax, nq, n, q_u.stride(0), rows.stride(0), n_sub,
        K=K, L2=bool(l2), HAS_FILTER=allowed is not None, FP16=dtype == torch.float16,
        BQ=BQ, BN=BN, BK=BK, SUB=sub, num_warps=8 if BQ >= 64 else 4,
    )
    del rows
    common = _constexprs(padded_dim, mse_bits, qjl is not None, l2, allowed is not None)
    return _exact_top_m(tmax, _unit_queries(qr, qs), args, common, qjl_scale=qjl_scale, m=m, n=n,
                        block_n=sub, slot_offset=slot_offset)


def scan_topk(qr: torch.Tensor, qs: torch.Tensor | None, c: CodeArgs, *, m: int, use_kernel: bool,
              method: str = "fused", allowed: torch.Tensor | None = None, slot_offset: int = 0,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the fused Triton scan (``method="fused"``), the GEMM scan ("gemm"), or the torch reference."""
    kw = dict(m=m, allowed=allowed, slot_offset=slot_offset)
    if use_kernel:
        if method == "gemm":
            return scan_topk_gemm(qr, qs, c, **kw)
        return scan_topk_triton(qr, qs, c, **kw)
    return scan_topk_reference(qr, qs, c, **kw)

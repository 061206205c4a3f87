"""Fused code scan + top-k: the best m codes per query without writing the (nq, n) score matrix.

Two Triton passes (see :func:`scan_topk_triton`): tile maxima with tensor-core dots over the
packed codes, then exact scores of the m best tiles per query. Similarity is the estimated inner
product, or 2<q,x> - ||x||^2 for l2 (the squared distance up to the query's ||q||^2, negated).

:func:`scan_topk_reference` is the plain-torch reference with the same contract.
"""

from __future__ import annotations

import torch

from tqindex.kernels.score import HAS_TRITON, score_reference

if HAS_TRITON:
    from tqindex.kernels.score import _unpack_tile

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["scan_topk", "scan_topk_reference", "scan_topk_triton", "MAX_M"]

MAX_M = 1024  # most candidates per query the kernel path selects (pass 2 holds nq * m * block_n floats)


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
        acc = tl.zeros((BQ, BN), dtype=tl.float32)
        acc2 = tl.zeros((BQ, BN), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            dmask = rd < D
            c, z = _unpack_tile(MSE, QJL, CB, rn64, d0, nmask, dmask, mse_stride, qjl_stride, MSE_BITS, HAS_QJL, BD)
            qm = qmask[:, None] & dmask[None, :]
            if MSE_BITS > 0:
                q = tl.load(QR + rq[:, None] * stride_qr + rd[None, :], mask=qm, other=0.0)
                if FP16:
                    acc += tl.dot(q.to(tl.float16), tl.trans(c.to(tl.float16)))
                else:
                    acc += tl.dot(q, tl.trans(c))
            if HAS_QJL:
                qs = tl.load(QS + rq[:, None] * stride_qs + rd[None, :], mask=qm, other=0.0)
                if FP16:
                    acc2 += tl.dot(qs.to(tl.float16), tl.trans(z.to(tl.float16)))
                else:
                    acc2 += tl.dot(qs, tl.trans(z))
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
    block_n: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`scan_topk_reference` (same contract), in two passes.

    Pass 1 writes only the maximum similarity of each (query, tile of ``block_n`` codes): an
    (nq, n / block_n) array instead of the (nq, n) scores. The m best codes of a query all lie in
    its m tiles with the largest maxima (a tile holding one of them has a maximum at least that
    large, and at most m - 1 other tiles can beat it), so pass 2 rescores just those m tiles per
    query and a final top-m over (nq, m * block_n) values is exact (up to float rounding ties).
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, n = qr.shape[0], norms.shape[0]
    dev = qr.device
    if nq == 0 or n == 0:
        return (torch.empty(nq, 0, device=dev), torch.empty(nq, 0, dtype=torch.int64, device=dev))
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
    qrs, qss = qrs.contiguous(), qss.contiguous()
    mse_c = mse.contiguous() if mse_bits > 0 else qjl.contiguous()
    qjl_c = qjl.contiguous() if has_qjl else mse_c
    norms_c = norms.contiguous()
    gam = gammas.contiguous() if has_qjl else norms_c
    cb = centroids.to(dev, torch.float32).contiguous()
    allow = allowed.to(torch.uint8).contiguous() if allowed is not None else mse_c
    mse_stride = mse.shape[1] if mse_bits > 0 else 1
    qjl_stride = qjl.shape[1] if has_qjl else 1
    BN = block_n
    BD = 32 if padded_dim <= 32 else 64
    BQ = 16 if nq <= 16 else (32 if nq <= 32 else (64 if nq <= 64 else 128))
    n_tiles = triton.cdiv(n, BN)
    common = dict(D=padded_dim, MSE_BITS=mse_bits, HAS_QJL=has_qjl, L2=bool(l2), HAS_FILTER=allowed is not None)
    tmax = torch.empty(nq, n_tiles, dtype=torch.float32, device=dev)
    _tile_max_kernel[(triton.cdiv(nq, BQ), n_tiles)](
        qr_u, qs_u, qrs, qss, mse_c, qjl_c, norms_c, gam, cb, allow, tmax,
        nq, n, mse_stride, qjl_stride, float(qjl_scale), n_tiles, qr_u.stride(0), qs_u.stride(0),
        BQ=BQ, BN=BN, BD=BD, FP16=bool(fp16), num_warps=8 if BQ >= 64 else 4, **common,
    )
    n_sel = min(m, n_tiles)
    sel = torch.topk(tmax, n_sel, dim=1).indices.to(torch.int32).contiguous()  # (nq, n_sel) tile ids
    scores = torch.empty(nq, n_sel, BN, dtype=torch.float32, device=dev)
    _tile_scores_kernel[(nq, n_sel)](
        qr_u, qs_u, qrs, qss, mse_c, qjl_c, norms_c, gam, cb, allow, sel, scores,
        n, mse_stride, qjl_stride, float(qjl_scale), n_sel, qr_u.stride(0), qs_u.stride(0),
        BN=BN, BD=BD, **common,
    )
    kk = min(m, n)
    v, j = torch.topk(scores.reshape(nq, n_sel * BN), kk, dim=1)
    slots = sel.to(torch.int64).gather(1, j // BN) * BN + (j % BN) + slot_offset
    return v, slots


def scan_topk(*args: object, use_kernel: bool, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the Triton kernel or the torch reference."""
    if use_kernel:
        return scan_topk_triton(*args, **kwargs)  # type: ignore[arg-type]
    kwargs.pop("fp16", None)
    kwargs.pop("block_n", None)
    return scan_topk_reference(*args, **kwargs)  # type: ignore[arg-type]

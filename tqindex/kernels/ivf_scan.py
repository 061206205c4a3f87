"""Scan of the probed inverted lists: estimated similarities of residual codes, list by list.

Contract (every implementation): for queries (nq, D) already rotated (``qr``, and ``qs`` = S qr for
PROD codes), probed lists ``lists`` (nq, P) with their exact part ``bias`` (nq, P) and the column
where each probe's scores start, ``cum`` (nq, P + 1) (an exclusive prefix sum of the probed lists'
lengths), write into ``out`` (nq, W) float32, pre-filled with -inf, the similarity of every code of
every probed list:

    ip / cosine:  bias + est<q, r>                  (bias = <q, c>)
    l2:           bias + 2 est<q - c, r> - ||r||^2  (bias = -||q - c||^2; q - c rotated = qr - crot[l])

where r is the code's residual to its list centroid c. Codes of list l are rows offsets[l] ..
offsets[l + 1] of the column store; ``allowed`` (n,) bool masks slots to -inf.

Implementations: :func:`ivf_scan_reference` (torch) and :func:`ivf_scan_triton` (CUDA, or the
interpreter); the compiled CPU scan in :mod:`tqindex.kernels.ivf_cpu` (numba) keeps each query's top
m of the same scores in its pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tqindex.kernels.score import HAS_TRITON, score_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tqindex.kernels.score import _unpack_tile

__all__ = ["ListCodes", "ProbedQueries", "ivf_scan", "ivf_scan_reference", "ivf_scan_triton"]


@dataclass(frozen=True)
class ListCodes:
    """The column store in list order, with the codec's constants bound once.

    mse (n, mse_bytes) uint8, qjl (n, qjl_bytes) uint8 or None, norms / gammas (n,) float, offsets
    (nlist + 1,) int64 on the codes' device, crot / cqjl (nlist, D) float32: the rotated centroids
    (and S times them) for the l2 shift; centroids: the (2^mse_bits,) codebook.
    """

    mse: torch.Tensor
    qjl: torch.Tensor | None
    norms: torch.Tensor
    gammas: torch.Tensor | None
    offsets: torch.Tensor
    crot: torch.Tensor
    cqjl: torch.Tensor | None
    centroids: torch.Tensor
    mse_bits: int
    padded_dim: int
    qjl_scale: float
    l2: bool


@dataclass(frozen=True)
class ProbedQueries:
    """Queries bound for one scan: qr / qs (nq, D) rotated, lists / bias (nq, P), cum (nq, P + 1) int64,
    width W = the largest cum[:, -1] possible (a host int, so no sync), allowed (n,) bool or None."""

    qr: torch.Tensor
    qs: torch.Tensor | None
    lists: torch.Tensor
    bias: torch.Tensor
    cum: torch.Tensor
    width: int
    allowed: torch.Tensor | None


def ivf_scan_reference(c: ListCodes, p: ProbedQueries) -> torch.Tensor:
    """Plain torch, one list at a time over the queries that probe it: (nq, W) float32, -inf padded."""
    nq, P = p.lists.shape
    out = torch.full((nq, p.width), float("-inf"), dtype=torch.float32, device=p.qr.device)
    offsets = c.offsets.cpu().tolist()
    lists = p.lists.cpu()
    for l in torch.unique(lists).tolist():
        s, e = offsets[l], offsets[l + 1]
        if e == s:
            continue
        qi, j = (lists == l).nonzero(as_tuple=True)
        qi_d, j_d = qi.to(p.qr.device), j.to(p.qr.device)
        qr = p.qr[qi_d] - c.crot[l] if c.l2 else p.qr[qi_d]
        qs = None
        if p.qs is not None:
            qs = p.qs[qi_d] - c.cqjl[l] if c.l2 and c.cqjl is not None else p.qs[qi_d]
        est = score_reference(qr, qs, c.mse[s:e], c.qjl[s:e] if c.qjl is not None else None, c.norms[s:e],
                              c.gammas[s:e] if c.gammas is not None else None, c.centroids, mse_bits=c.mse_bits,
                              padded_dim=c.padded_dim, qjl_scale=c.qjl_scale)
        if c.l2:
            est = 2 * est - c.norms[s:e].to(torch.float32).square().unsqueeze(0)
        sim = est + p.bias[qi_d, j_d].unsqueeze(1)
        if p.allowed is not None:
            sim = sim.masked_fill(~p.allowed[s:e].unsqueeze(0), float("-inf"))
        cols = p.cum[qi_d, j_d].unsqueeze(1) + torch.arange(e - s, device=p.qr.device).unsqueeze(0)
        out[qi_d.unsqueeze(1).expand_as(cols), cols] = sim
    return out


if HAS_TRITON:

    @triton.jit
    def _ivf_scan_kernel(
        QR, QS, LISTS, BIAS, CUM, MSE, QJL, NORM, GAMMA, OFFS, CROT, CQJL, CB, ALLOW, OUT,
        P, W, D, mse_stride, qjl_stride, qjl_scale,
        MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr,
        BN: tl.constexpr, BD: tl.constexpr,
    ):
        """One program per (query, probe, tile of BN codes of that list)."""
        qi = tl.program_id(0)
        j = tl.program_id(1)
        t = tl.program_id(2)
        l = tl.load(LISTS + qi * P + j)
        start = tl.load(OFFS + l)
        length = tl.load(OFFS + l + 1) - start
        if t * BN >= length:
            return
        pos = t * BN + tl.arange(0, BN)
        nmask = pos < length
        rn64 = (start + pos).to(tl.int64)
        acc = tl.zeros((BN,), dtype=tl.float32)
        acc2 = tl.zeros((BN,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            dmask = rd < D
            q = tl.load(QR + qi * D + rd, mask=dmask, other=0.0)
            if L2:
                q = q - tl.load(CROT + l * D + rd, mask=dmask, other=0.0)
            vals, signs = _unpack_tile(MSE, QJL, CB, rn64, d0, nmask, dmask, mse_stride, qjl_stride,
                                       MSE_BITS=MSE_BITS, HAS_QJL=HAS_QJL, BD=BD)
            acc += tl.sum(vals * q[None, :], axis=1)
            if HAS_QJL:
                qs = tl.load(QS + qi * D + rd, mask=dmask, other=0.0)
                if L2:
                    qs = qs - tl.load(CQJL + l * D + rd, mask=dmask, other=0.0)
                acc2 += tl.sum(signs * qs[None, :], axis=1)
        norm = tl.load(NORM + rn64, mask=nmask, other=0.0).to(tl.float32)
        est = acc
        if HAS_QJL:
            gam = tl.load(GAMMA + rn64, mask=nmask, other=0.0).to(tl.float32)
            est = est + acc2 * gam * qjl_scale
        est = est * norm
        if L2:
            est = 2.0 * est - norm * norm
        sim = est + tl.load(BIAS + qi * P + j)
        if HAS_FILTER:
            ok = tl.load(ALLOW + rn64, mask=nmask, other=0) != 0
            sim = tl.where(ok, sim, float("-inf"))
        col = tl.load(CUM + qi * (P + 1) + j) + pos
        tl.store(OUT + qi.to(tl.int64) * W + col, sim, mask=nmask)


def _tile_shape(D: int, pairs: int) -> tuple[int, int]:
    """(codes, coordinates) per program, from the H200 sweep of bench/ivf_profile.py (ivf_profile.md):
    wide vectors want short, deep tiles; at 128 dims few (query, probe) pairs want 32 codes, many 128."""
    if D >= 1024:
        return 16, 128
    bd = min(128, max(16, triton.next_power_of_2(D)))
    return (32 if pairs <= 256 else 128), bd


def ivf_scan_triton(c: ListCodes, p: ProbedQueries, max_list: int, block_n: int | None = None,
                    block_d: int | None = None) -> torch.Tensor:
    """The scan as one Triton launch over (query, probe, code tile): (nq, W) float32, -inf padded.

    ``max_list`` is the longest list (a host int kept by the index): the grid's third axis. The tile
    shape defaults to :func:`_tile_shape`'s.
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, P = p.lists.shape
    dev = p.qr.device
    out = torch.full((nq, p.width), float("-inf"), dtype=torch.float32, device=dev)
    if nq == 0 or max_list == 0:
        return out
    D = c.padded_dim
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    allow = p.allowed.to(torch.uint8) if p.allowed is not None else torch.empty(1, dtype=torch.uint8, device=dev)
    bn, bd = _tile_shape(D, nq * P)
    block_n, BD = block_n or bn, block_d or bd
    qjl = c.qjl if c.qjl is not None else torch.empty((1, 1), dtype=torch.uint8, device=dev)
    grid = (nq, P, triton.cdiv(max_list, block_n))
    _ivf_scan_kernel[grid](
        p.qr.contiguous(), p.qs.contiguous() if p.qs is not None else dummy, p.lists.contiguous(),
        p.bias.contiguous(), p.cum.contiguous(), c.mse, qjl, c.norms,
        c.gammas if c.gammas is not None else dummy, c.offsets, c.crot,
        c.cqjl if c.cqjl is not None else dummy, c.centroids.to(torch.float32), allow, out,
        P, p.width, D, c.mse.stride(0), qjl.stride(0), float(c.qjl_scale),
        MSE_BITS=c.mse_bits, HAS_QJL=c.qjl is not None, L2=c.l2, HAS_FILTER=p.allowed is not None,
        BN=block_n, BD=BD,
    )
    return out


def ivf_scan(c: ListCodes, p: ProbedQueries, *, max_list: int, impl: str) -> torch.Tensor:
    """Dispatch to ``impl``: "triton" or "reference" (the CPU index runs :mod:`tqindex.kernels.ivf_cpu`,
    which keeps the top k in its scan instead of writing this buffer)."""
    if impl == "triton":
        return ivf_scan_triton(c, p, max_list)
    return ivf_scan_reference(c, p)

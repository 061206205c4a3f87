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

The index needs only each query's best m of those scores (:func:`ivf_topk`): the torch reference
takes the top m of :func:`ivf_scan_reference`'s buffer; :func:`ivf_topk_triton` (CUDA, or the
interpreter) gets the same in two passes without the buffer; the compiled CPU scan in
:mod:`tqindex.kernels.ivf_cpu` (numba) keeps each query's top m in its single pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tqindex.kernels.launch import follows_device
from tqindex.kernels.score import HAS_TRITON, CodeArgs, score_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tqindex.kernels.scan_topk import _unit_queries
    from tqindex.kernels.score import _unpack_tile

__all__ = ["ListCodes", "ProbedQueries", "columns_to_slots", "ivf_scan_reference", "ivf_topk", "ivf_topk_reference",
           "ivf_topk_triton", "scratch_bytes"]


@dataclass(frozen=True)
class ListCodes(CodeArgs):
    """The column store in list order (a :class:`CodeArgs` over every code) with the lists bound once.

    offsets (nlist + 1,) int64 on the codes' device; crot / cqjl (nlist, D) float32: the rotated
    centroids (and S times them) for the l2 shift; lens_desc (nlist,) int64 numpy: the list lengths,
    largest first (on the host, so kernels size their grids without a device sync).
    """

    offsets: torch.Tensor
    crot: torch.Tensor
    cqjl: torch.Tensor | None
    lens_desc: np.ndarray


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


def columns_to_slots(c: ListCodes, p: ProbedQueries, col: torch.Tensor) -> torch.Tensor:
    """Columns (nq, m) of the (nq, W) score layout -> slots (nq, m) int64 of the column store.

    A column lies in probe j = the last with cum[j] <= col; its slot is offsets[list] + col - cum[j]
    (padding columns map to some slot the caller masks)."""
    j, off = _probe_of(p.cum, col)
    return c.offsets[p.lists.gather(1, j)] + off


def _probe_of(cum: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns col (nq, m) of a per-query layout whose probe j starts at cum[:, j] (cum (nq, P + 1), an
    exclusive prefix sum) -> (probe j, position within probe j), both (nq, m) int64; padding columns
    past the last probe's end land in the last probe."""
    j = (torch.searchsorted(cum, col, right=True) - 1).clamp(0, cum.shape[1] - 2)
    return j, col - cum.gather(1, j)


def ivf_topk_reference(c: ListCodes, p: ProbedQueries, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best min(m, W) (similarity, slot) per query, best first, from :func:`ivf_scan_reference`:
    ((nq, m') float32, (nq, m') int64); -inf entries point at slot 0."""
    scores = ivf_scan_reference(c, p)
    v, col = torch.topk(scores, min(m, p.width), dim=1)
    slot = columns_to_slots(c, p, col)
    return v, torch.where(torch.isfinite(v), slot, torch.zeros_like(slot))


if HAS_TRITON:

    @triton.jit
    def _list_tile(
        QR, QS, BIAS, MSE, QJL, NORM, GAMMA, CROT, CQJL, CB, ALLOW, qi, j, l, start, length, t,
        P, D, mse_stride, qjl_stride, qjl_scale,
        MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr,
        BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Similarities (BN,) of query qi with codes t * BN + [0, BN) of list l (probe j), -inf past its end."""
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
        keep = nmask
        if HAS_FILTER:
            keep = keep & (tl.load(ALLOW + rn64, mask=nmask, other=0) != 0)
        return tl.where(keep, sim, float("-inf"))

    @triton.jit
    def _ivf_tile_max_kernel(
        QR, QS, LISTS, BIAS, TCUM, MSE, QJL, NORM, GAMMA, OFFS, CROT, CQJL, CB, ALLOW, TMAX,
        P, WT, D, mse_stride, qjl_stride, qjl_scale,
        MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr,
        BN: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr,
    ):
        """Pass 1, one program per (query, probe, tile of BN codes): the best of each run of SUB codes,
        TMAX[q, tcum[q, j] + u] for the list's sub-tile u (sub-tiles past the list's end not written)."""
        qi = tl.program_id(0)
        j = tl.program_id(1)
        t = tl.program_id(2)
        l = tl.load(LISTS + qi * P + j)
        start = tl.load(OFFS + l)
        length = tl.load(OFFS + l + 1) - start
        if t * BN >= length:
            return
        sim = _list_tile(QR, QS, BIAS, MSE, QJL, NORM, GAMMA, CROT, CQJL, CB, ALLOW, qi, j, l, start, length, t,
                         P, D, mse_stride, qjl_stride, qjl_scale, MSE_BITS, HAS_QJL, L2, HAS_FILTER, BN, BD)
        best = tl.max(tl.reshape(sim, (BN // SUB, SUB)), axis=1)
        u = t * (BN // SUB) + tl.arange(0, BN // SUB)
        col = tl.load(TCUM + qi * (P + 1) + j) + u
        tl.store(TMAX + qi.to(tl.int64) * WT + col, best, mask=u * SUB < length)

    @triton.jit
    def _ivf_tile_scores_kernel(
        QR, QS, LISTS, BIAS, SELJ, SELT, MSE, QJL, NORM, GAMMA, OFFS, CROT, CQJL, CB, ALLOW, OUT,
        P, S, D, mse_stride, qjl_stride, qjl_scale,
        MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr,
        BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Pass 2, one program per (query, selected sub-tile s): OUT[q, s, :] = its BN (= pass 1's SUB) similarities."""
        qi = tl.program_id(0)
        s = tl.program_id(1)
        j = tl.load(SELJ + qi * S + s)
        t = tl.load(SELT + qi * S + s)
        l = tl.load(LISTS + qi * P + j)
        start = tl.load(OFFS + l)
        length = tl.load(OFFS + l + 1) - start
        sim = _list_tile(QR, QS, BIAS, MSE, QJL, NORM, GAMMA, CROT, CQJL, CB, ALLOW, qi, j, l, start, length, t,
                         P, D, mse_stride, qjl_stride, qjl_scale, MSE_BITS, HAS_QJL, L2, HAS_FILTER, BN, BD)
        tl.store(OUT + (qi.to(tl.int64) * S + s) * BN + tl.arange(0, BN), sim)


if HAS_TRITON:

    @triton.jit
    def _ivf_group_max_kernel(
        QU, QSU, QRS, QSS, PQ, PJ, GLIST, GFIRST, GCOUNT, BIAS, TCUM, MSE, QJL, NORM, GAMMA, OFFS, CROT, CQJL, CB,
        ALLOW, TMAX, P, WT, D, mse_stride, qjl_stride, qjl_scale,
        MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, L2: tl.constexpr, HAS_FILTER: tl.constexpr,
        BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr, ONE_CHUNK: tl.constexpr,
    ):
        """Pass 1 grouped by list, one program per group of <= BQ (query, probe) pairs of one list, looping
        over the list's tiles of BN codes: each tile is unpacked once and multiplied with the group's unit
        queries on the tensor cores (fp16 in, fp32 accumulated; with ONE_CHUNK (D <= BD) the queries are
        loaded once); the l2 shift <c, r> is query-free, once per code. Writes what
        :func:`_ivf_tile_max_kernel` writes, for every pair of the group."""
        g = tl.program_id(0)
        cnt = tl.load(GCOUNT + g)
        if cnt == 0:
            return
        l = tl.load(GLIST + g)
        start = tl.load(OFFS + l)
        length = tl.load(OFFS + l + 1) - start
        first = tl.load(GFIRST + g)
        r = tl.arange(0, BQ)
        qmask = r < cnt
        qi = tl.load(PQ + first + r, mask=qmask, other=0)
        jj = tl.load(PJ + first + r, mask=qmask, other=0)
        qrs = tl.load(QRS + qi, mask=qmask, other=0.0)[:, None]
        qss = tl.load(QSS + qi, mask=qmask, other=0.0)[:, None]
        bias = tl.load(BIAS + qi * P + jj, mask=qmask, other=0.0)[:, None]
        col0 = tl.load(TCUM + qi * (P + 1) + jj, mask=qmask, other=0)[:, None]
        rd0 = tl.arange(0, BD)
        qm0 = qmask[:, None] & (rd0 < D)[None, :]
        if ONE_CHUNK:
            q0 = tl.load(QU + qi[:, None] * D + rd0[None, :], mask=qm0, other=0.0).to(tl.float16)
            qs0 = q0
            if HAS_QJL:
                qs0 = tl.load(QSU + qi[:, None] * D + rd0[None, :], mask=qm0, other=0.0).to(tl.float16)
        for t in range(0, tl.cdiv(length, BN)):
            pos = t * BN + tl.arange(0, BN)
            nmask = pos < length
            rn64 = (start + pos).to(tl.int64)
            acc = tl.zeros((BQ, BN), dtype=tl.float32)
            acc2 = tl.zeros((BQ, BN), dtype=tl.float32)
            accc = tl.zeros((BN,), dtype=tl.float32)
            accc2 = tl.zeros((BN,), dtype=tl.float32)
            for d0 in range(0, D, BD):
                rd = d0 + rd0
                dmask = rd < D
                c, z = _unpack_tile(MSE, QJL, CB, rn64, d0, nmask, dmask, mse_stride, qjl_stride,
                                    MSE_BITS=MSE_BITS, HAS_QJL=HAS_QJL, BD=BD)
                qm = qmask[:, None] & dmask[None, :]
                if MSE_BITS > 0:
                    if ONE_CHUNK:
                        q = q0
                    else:
                        q = tl.load(QU + qi[:, None] * D + rd[None, :], mask=qm, other=0.0).to(tl.float16)
                    acc += tl.dot(q, tl.trans(c.to(tl.float16)))
                    if L2:
                        accc += tl.sum(c * tl.load(CROT + l * D + rd, mask=dmask, other=0.0)[None, :], axis=1)
                if HAS_QJL:
                    if ONE_CHUNK:
                        qs = qs0
                    else:
                        qs = tl.load(QSU + qi[:, None] * D + rd[None, :], mask=qm, other=0.0).to(tl.float16)
                    acc2 += tl.dot(qs, tl.trans(z.to(tl.float16)))
                    if L2:
                        accc2 += tl.sum(z * tl.load(CQJL + l * D + rd, mask=dmask, other=0.0)[None, :], axis=1)
            norm = tl.load(NORM + rn64, mask=nmask, other=0.0).to(tl.float32)
            est = acc * qrs
            if HAS_QJL:
                gs = tl.load(GAMMA + rn64, mask=nmask, other=0.0).to(tl.float32) * qjl_scale
                est += acc2 * qss * gs[None, :]
            if L2:
                shift = accc
                if HAS_QJL:
                    shift += accc2 * gs
                est = 2.0 * (est - shift[None, :]) * norm[None, :] - (norm * norm)[None, :]
            else:
                est = est * norm[None, :]
            keep = nmask
            if HAS_FILTER:
                keep = keep & (tl.load(ALLOW + rn64, mask=nmask, other=0) != 0)
            sim = tl.where(qmask[:, None] & keep[None, :], est + bias, float("-inf"))
            best = tl.max(tl.reshape(sim, (BQ, BN // SUB, SUB)), axis=2)
            u = t * (BN // SUB) + tl.arange(0, BN // SUB)
            tl.store(TMAX + qi.to(tl.int64)[:, None] * WT + col0 + u[None, :], best,
                     mask=qmask[:, None] & (u * SUB < length)[None, :])


def _groups(lists: torch.Tensor, nlist: int, bq: int) -> tuple[torch.Tensor, ...]:
    """The (query, probe) pairs grouped by list in runs of at most ``bq``, on the device, static shapes.

    Returns (pq, pj) (nq * P,) int64: query and probe of each pair, sorted by list; and per group
    (glist, gfirst, gcount) (G,) int64: its list, first pair, pair count (0 for the unused tail),
    G = min(nq * P, ceil(nq * P / bq) + nlist) the most groups there can be (a host int: no sync).
    """
    nq, P = lists.shape
    npairs = nq * P
    flat = lists.reshape(-1)
    order = torch.argsort(flat, stable=True)
    cnt = torch.zeros(nlist, dtype=torch.int64, device=lists.device).index_add_(0, flat, torch.ones_like(flat))
    pstart = torch.zeros(nlist + 1, dtype=torch.int64, device=lists.device)
    pstart[1:] = torch.cumsum(cnt, 0)
    gcum = torch.zeros(nlist + 1, dtype=torch.int64, device=lists.device)
    gcum[1:] = torch.cumsum((cnt + bq - 1) // bq, 0)
    G = min(npairs, -(-npairs // bq) + nlist)
    g = torch.arange(G, device=lists.device)
    glist = (torch.searchsorted(gcum, g, right=True) - 1).clamp(0, nlist - 1)
    gfirst = pstart[glist] + (g - gcum[glist]) * bq
    gcount = torch.where(g < gcum[-1], (pstart[glist + 1] - gfirst).clamp(0, bq), torch.zeros_like(g))
    return order // P, order % P, glist, gfirst, gcount


def _tile_width(lens_desc: np.ndarray, P: int, sub: int) -> int:
    """The most runs of ``sub`` codes P probed lists can hold (a host int from the list lengths, largest
    first: no sync)."""
    return int(((lens_desc[:P] + sub - 1) // sub).sum())


def scratch_bytes(lens_desc: np.ndarray, padded_dim: int, nq: int, P: int, m: int) -> int:
    """Device bytes :func:`ivf_topk_triton` allocates for nq queries probing P lists for m candidates
    (``lens_desc``: ListCodes.lens_desc; from the host state alone, so a caller need not bind a scan)."""
    WT = _tile_width(lens_desc, P, _SUB)
    S = min(m, WT)
    grouped = nq * P * 48 + nq * padded_dim * 8 + (len(lens_desc) + 2) * 32  # pairs, groups, unit queries
    return nq * (4 * WT + 8 * (P + 1) + 16 * S + 4 * S * _SUB + 12 * m) + grouped


_SUB = 16  # codes per pass-1 maximum: pass 2 rescores m runs of this many codes per query


def _use_groups(pairs: int, nlist: int, D: int) -> bool:
    """Group pairs by list when lists are probed by enough queries on average: 12 at >= 1024 dims,
    32 below (H200, GPU time of the candidate scan, bench/results/ivf_profile_grouped.md: grouped
    2.4x faster at 1536 dims with 16 pairs per list, 1.5x on GloVe-50 with 62, even at 128 dims with
    16, and 2-5x slower with 2-8)."""
    return pairs >= (12 if D >= 1024 else 32) * nlist


def _group_size(pairs: int, nlist: int) -> int:
    """Queries per tensor-core tile: 16, 32 or 64 by the mean pairs per list (same sweep)."""
    per = pairs / max(nlist, 1)
    return 16 if per < 12 else (32 if per < 48 else 64)


def _tile_shape(D: int, pairs: int) -> tuple[int, int]:
    """(codes, coordinates) per program, from the H200 sweep of bench/ivf_profile.py (ivf_profile.md):
    wide vectors want short, deep tiles; at 128 dims few (query, probe) pairs want 32 codes, many 128."""
    if D >= 1024:
        return 16, 128
    bd = min(128, max(16, triton.next_power_of_2(D)))
    return (32 if pairs <= 256 else 128), bd


@follows_device
def ivf_topk_triton(c: ListCodes, p: ProbedQueries, m: int, block_n: int | None = None,
                    block_d: int | None = None, method: str = "auto", block_q: int | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ivf_topk_reference`'s result in two Triton passes, without the (nq, W) score buffer.

    Pass 1, one program per (query, probe, tile of BN codes), keeps only the best similarity of each
    run of 16 codes: (nq, WT) floats, WT the most runs any query can probe (from ``c.lens_desc`` on
    the host: no sync). The m best codes of a query lie in its m runs with the largest maxima (a run
    holding one of them has a maximum at least as large, and at most m - 1 other runs can beat it),
    so pass 2 scores just those m * 16 codes and a top-m over them is exact (up to float rounding
    ties). The tile shape defaults to :func:`_tile_shape`'s.

    ``method`` picks pass 1: "pairs" (one program per (query, probe, tile): each query unpacks the
    codes it scans), "grouped" (pairs grouped by list, each tile unpacked once per group of up to
    BQ queries and multiplied on the tensor cores) or "auto" (grouped where a list is probed by
    enough queries on average: :func:`_use_groups`).
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, P = p.lists.shape
    dev = p.qr.device
    m = min(m, p.width)
    if nq == 0 or m == 0:
        return torch.empty(nq, 0, device=dev), torch.zeros(nq, 0, dtype=torch.int64, device=dev)
    D = c.padded_dim
    bn, bd = _tile_shape(D, nq * P)
    BN, BD = block_n or bn, block_d or bd
    SUB = _SUB
    WT = _tile_width(c.lens_desc, P, SUB)
    max_tiles = int((c.lens_desc[0] + BN - 1) // BN)
    lens = torch.diff(p.cum, dim=1)  # the probed lists' lengths, (nq, P)
    tcum = torch.zeros(nq, P + 1, dtype=torch.int64, device=dev)
    tcum[:, 1:] = torch.cumsum((lens + SUB - 1) // SUB, dim=1)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    allow = p.allowed.to(torch.uint8) if p.allowed is not None else torch.empty(1, dtype=torch.uint8, device=dev)
    qjl = c.qjl if c.qjl is not None else torch.empty((1, 1), dtype=torch.uint8, device=dev)
    qr, qs = p.qr.contiguous(), (p.qs.contiguous() if p.qs is not None else dummy)
    lists, bias = p.lists.contiguous(), p.bias.contiguous()
    codes = (c.mse, qjl, c.norms, c.gammas if c.gammas is not None else dummy, c.offsets, c.crot,
             c.cqjl if c.cqjl is not None else dummy, c.centroids.to(torch.float32), allow)
    flags = dict(MSE_BITS=c.mse_bits, HAS_QJL=c.qjl is not None, L2=c.l2, HAS_FILTER=p.allowed is not None, BD=BD)
    consts = (D, c.mse.stride(0), qjl.stride(0), float(c.qjl_scale))
    tmax = torch.full((nq, WT), float("-inf"), dtype=torch.float32, device=dev)
    nlist = c.offsets.shape[0] - 1
    if method == "grouped" or (method == "auto" and _use_groups(nq * P, nlist, D)):
        bq = block_q or _group_size(nq * P, nlist)
        gbn = block_n or 128
        pq_, pj_, glist, gfirst, gcount = _groups(lists, nlist, bq)
        qu, qsu, qrs, qss = _unit_queries(p.qr, p.qs)
        gflags = {**flags, "BD": block_d or (max(16, triton.next_power_of_2(D)) if D <= 128 else 64)}
        _ivf_group_max_kernel[(glist.shape[0],)](
            qu, qsu, qrs, qss, pq_, pj_, glist, gfirst, gcount, bias, tcum, *codes, tmax, P, WT, *consts,
            BQ=bq, BN=gbn, SUB=SUB, ONE_CHUNK=D <= gflags["BD"], **gflags)
    else:
        _ivf_tile_max_kernel[(nq, P, max_tiles)](qr, qs, lists, bias, tcum, *codes, tmax, P, WT, *consts, BN=BN,
                                                 SUB=SUB, **flags)
    S = min(m, WT)
    tcol = torch.topk(tmax, S, dim=1).indices  # (nq, S) the best runs of SUB codes
    selj, selt = _probe_of(tcum, tcol)
    scores = torch.empty(nq, S, SUB, dtype=torch.float32, device=dev)
    _ivf_tile_scores_kernel[(nq, S)](qr, qs, lists, bias, selj.contiguous(), selt.contiguous(), *codes, scores,
                                     P, S, *consts, BN=SUB, **flags)
    v, f = torch.topk(scores.reshape(nq, S * SUB), min(m, S * SUB), dim=1)
    s_idx = f // SUB
    start = c.offsets[lists.gather(1, selj.gather(1, s_idx))]
    slot = start + selt.gather(1, s_idx) * SUB + f % SUB
    return v, torch.where(torch.isfinite(v), slot, torch.zeros_like(slot))


def ivf_topk(c: ListCodes, p: ProbedQueries, m: int, *, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The best min(m, W) (similarity, slot) per query, best first: ((nq, m') float32, (nq, m') int64),
    -inf entries at slot 0. ``impl``: "triton" (CUDA), "cpu" (the compiled scan of
    :mod:`tqindex.kernels.ivf_cpu`) or "reference"."""
    if impl == "triton":
        return ivf_topk_triton(c, p, m)
    if impl == "cpu":
        from tqindex.kernels.ivf_cpu import ivf_topk_cpu  # numba compiles on first import

        return ivf_topk_cpu(c, p, m)
    return ivf_topk_reference(c, p, m)

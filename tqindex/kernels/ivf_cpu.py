"""Compiled CPU scan of probed inverted lists (numba), scores as in :mod:`tqindex.kernels.ivf_scan`.

Per (query, probed list) a lookup table ``lut[t, v] = q'_t * codebook[v]`` (D x 2^bits floats) is
built once, then every code of the list costs D table reads (and D/8 sign-byte reads for PROD):
no decoded block is ever materialised. Queries run in parallel threads (``numba.prange``; fewer
queries than threads run on the calling thread alone).
:func:`ivf_topk_cpu` keeps each query's top m in the same pass, so the (nq, W) score buffer of the
contract is never written; tests check it against the top m of the torch reference's buffer.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from tqindex.kernels.ivf_scan import ListCodes, ProbedQueries

__all__ = ["ivf_topk_cpu"]


@numba.njit(inline="always")
def _code_score(r, mse, qjl, norms, gammas, lut, qv, qsum, bits, mask, nbytes, aligned, has_qjl, l2,
                qjl_scale):  # pragma: no cover - compiled
    """Estimated similarity part of code ``r`` (before the list's bias): est, or 2 est - ||r||^2 for l2."""
    D = lut.shape[0]
    acc = np.float32(0.0)
    if bits == 4:  # two coordinates per byte, low nibble first
        for b in range(D >> 1):
            byte = np.int32(mse[r, b])
            acc += lut[2 * b, byte & 15] + lut[2 * b + 1, byte >> 4]
        if D & 1:
            acc += lut[D - 1, np.int32(mse[r, D >> 1]) & 15]
    elif bits == 8:
        for t in range(D):
            acc += lut[t, mse[r, t]]
    elif bits > 0:
        if aligned:  # 1 or 2 bits: a value never straddles two bytes
            for t in range(D):
                bit = t * bits
                acc += lut[t, (np.int32(mse[r, bit >> 3]) >> (bit & 7)) & mask]
        else:
            for t in range(D):
                bit = t * bits
                byte = bit >> 3
                w = np.int32(mse[r, byte])
                if byte + 1 < nbytes:
                    w |= np.int32(mse[r, byte + 1]) << 8
                acc += lut[t, (w >> (bit & 7)) & mask]
    if has_qjl:
        pos = np.float32(0.0)
        for t in range(D):
            if (qjl[r, t >> 3] >> (t & 7)) & 1:
                pos += qv[t]
        acc += (2.0 * pos - qsum) * gammas[r] * qjl_scale
    est = acc * norms[r]
    if l2:
        est = 2.0 * est - norms[r] * norms[r]
    return est


@numba.njit(inline="always")
def _bind_list(qr, qs, crot, cqjl, cb, i, lst, lut, qv, has_qjl, l2):  # pragma: no cover - compiled
    """Query i against list lst: fill lut[t, v] = q'_t * cb[v] and the QJL query qv; returns sum(qv).
    q' is the rotated query, minus the list's rotated centroid for l2."""
    D, nv = lut.shape
    for t in range(D):
        q = qr[i, t] - crot[lst, t] if l2 else qr[i, t]
        for v in range(nv):
            lut[t, v] = q * cb[v]
    qsum = np.float32(0.0)
    if has_qjl:
        for t in range(D):
            qv[t] = qs[i, t] - cqjl[lst, t] if l2 else qs[i, t]
            qsum += qv[t]
    return qsum


@numba.njit(parallel=True, cache=True)
def _scan_topk(qr, qs, lists, bias, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out_s, out_i,
               bits, has_qjl, l2, has_filter, qjl_scale):  # pragma: no cover - compiled
    """Per query the best m = out_s.shape[1] (similarity, slot) over its probed lists, best first;
    -inf / -1 where fewer exist. One pass, no score buffer: a sorted insertion keeps the top m."""
    nq, P = lists.shape
    D = qr.shape[1]
    nv = cb.shape[0]
    m = out_s.shape[1]
    mask = (1 << bits) - 1
    nbytes = mse.shape[1]
    aligned = bits > 0 and 8 % bits == 0
    for i in numba.prange(nq):
        lut = np.empty((D, nv), dtype=np.float32)
        qv = np.zeros(D, dtype=np.float32)
        best_s = np.full(m, -np.inf, dtype=np.float32)
        best_i = np.full(m, -1, dtype=np.int64)
        for j in range(P):
            lst = lists[i, j]
            s = offsets[lst]
            e = offsets[lst + 1]
            if e <= s:
                continue
            qsum = _bind_list(qr, qs, crot, cqjl, cb, i, lst, lut, qv, has_qjl, l2)
            b = bias[i, j]
            for r in range(s, e):
                if has_filter and not allowed[r]:
                    continue
                sim = _code_score(r, mse, qjl, norms, gammas, lut, qv, qsum, bits, mask, nbytes, aligned,
                                  has_qjl, l2, qjl_scale) + b
                if sim > best_s[m - 1]:
                    k = m - 1
                    while k > 0 and best_s[k - 1] < sim:
                        best_s[k] = best_s[k - 1]
                        best_i[k] = best_i[k - 1]
                        k -= 1
                    best_s[k] = sim
                    best_i[k] = r
        out_s[i] = best_s
        out_i[i] = best_i


def _np(t: torch.Tensor | None, dtype: type, shape: tuple[int, ...] = (1,)) -> np.ndarray:
    if t is None:
        return np.zeros(shape, dtype=dtype)
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))


def ivf_topk_cpu(c: ListCodes, p: ProbedQueries, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate stage in one compiled pass: per query the best min(m, W) (similarity, slot) over its
    probed lists, best first: ((nq, m') float32, (nq, m') int64), -inf / 0 padding (slot 0 is never
    read for a -inf entry)."""
    nq = p.lists.shape[0]
    D = c.padded_dim
    m = min(m, p.width)
    out_s = np.full((nq, m), -np.inf, dtype=np.float32)
    out_i = np.zeros((nq, m), dtype=np.int64)
    if nq and m:
        # Fewer queries than threads: the parallel region runs on this thread alone. With more threads
        # than queries the region gains nothing, and on a busy machine its barrier waits out the
        # scheduler (8 ms a query instead of 0.5, measured on 2 shared cores). Not a serial njit of the
        # same function: numba's disk cache keys by function, so that build overwrote the parallel one's
        # entry, and uncached it measured 1.4x slower than the parallel build on one thread.
        threads = numba.get_num_threads()
        if nq < threads:
            numba.set_num_threads(1)  # per calling thread in numba
        try:
            _scan_topk(_np(p.qr, np.float32), _np(p.qs, np.float32, (nq, D)), _np(p.lists, np.int64),
                       _np(p.bias, np.float32), _np(c.mse, np.uint8), _np(c.qjl, np.uint8, (1, 1)),
                       _np(c.norms, np.float32), _np(c.gammas, np.float32), _np(c.offsets, np.int64),
                       _np(c.crot, np.float32), _np(c.cqjl, np.float32, (1, D)), _np(c.centroids, np.float32),
                       _np(p.allowed, np.bool_), out_s, out_i, c.mse_bits, c.qjl is not None, c.l2,
                       p.allowed is not None, np.float32(c.qjl_scale))
        finally:
            numba.set_num_threads(threads)
        np.maximum(out_i, 0, out=out_i)
    return torch.from_numpy(out_s), torch.from_numpy(out_i)

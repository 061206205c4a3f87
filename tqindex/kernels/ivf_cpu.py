"""Compiled CPU scan of probed inverted lists (numba), scores as in :mod:`tqindex.kernels.ivf_scan`.

Per query (ip / cosine) or per (query, probed list) (l2: the query is shifted by the list's centroid)
a lookup table ``lut[t, v] = q'_t * codebook[v]`` (D x 2^bits floats) is built once, then every
code costs D table reads (D/2 at 4 bits for ip / cosine, through a table per byte; and D/8
sign-byte reads for PROD): no decoded block is ever materialised. Queries run in parallel threads (``numba.prange``; fewer
queries than threads run serially).
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
def _code_score(r, mse, qjl, norms, gammas, lut, lut2, use_lut2, qv, qsum, bits, mask, nbytes, aligned, has_qjl,
                l2, qjl_scale):  # pragma: no cover - compiled
    """Estimated similarity part of code ``r`` (before the list's bias): est, or 2 est - ||r||^2 for l2."""
    D = lut.shape[0]
    acc = np.float32(0.0)
    if use_lut2:  # 4 bits, a table per byte: one read per two coordinates
        for b in range(nbytes):
            acc += lut2[b, mse[r, b]]
    elif bits == 4:  # two coordinates per byte, low nibble first
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


@numba.njit(inline="always")
def _byte_table(lut, lut2):  # pragma: no cover - compiled
    """lut2[b, byte] = lut[2b, low nibble] + lut[2b + 1, high nibble] (the high nibble of an odd D's last
    byte is padding)."""
    D = lut.shape[0]
    for b in range(lut2.shape[0]):
        for v in range(256):
            x = lut[2 * b, v & 15]
            if 2 * b + 1 < D:
                x += lut[2 * b + 1, v >> 4]
            lut2[b, v] = x


@numba.njit(cache=True)
def _scan_one(i, qr, qs, lists, bias, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out_s, out_i,
              bits, has_qjl, l2, has_filter, qjl_scale):  # pragma: no cover - compiled
    """Query i: its best m = out_s.shape[1] (similarity, slot) over its probed lists, best first, into
    out_s[i] / out_i[i]; -inf / -1 where fewer exist. One pass, no score buffer: a sorted insertion
    keeps the top m."""
    P = lists.shape[1]
    D = qr.shape[1]
    nv = cb.shape[0]
    m = out_s.shape[1]
    mask = (1 << bits) - 1
    nbytes = mse.shape[1]
    aligned = bits > 0 and 8 % bits == 0
    # ip / cosine: the query's tables do not depend on the list, so they are built once per query, and
    # at 4 bits folded into a table per byte (nbytes x 256: 6,400 floats at 50 dims).
    use_lut2 = bits == 4 and not l2
    lut = np.empty((D, nv), dtype=np.float32)
    lut2 = np.empty((nbytes if use_lut2 else 1, 256), dtype=np.float32)
    qv = np.zeros(D, dtype=np.float32)
    best_s = np.full(m, -np.inf, dtype=np.float32)
    best_i = np.full(m, -1, dtype=np.int64)
    qsum = np.float32(0.0)
    if not l2:
        qsum = _bind_list(qr, qs, crot, cqjl, cb, i, 0, lut, qv, has_qjl, l2)
        if use_lut2:
            _byte_table(lut, lut2)
    for j in range(P):
        lst = lists[i, j]
        s = offsets[lst]
        e = offsets[lst + 1]
        if e <= s:
            continue
        if l2:
            qsum = _bind_list(qr, qs, crot, cqjl, cb, i, lst, lut, qv, has_qjl, l2)
        b = bias[i, j]
        for r in range(s, e):
            if has_filter and not allowed[r]:
                continue
            sim = _code_score(r, mse, qjl, norms, gammas, lut, lut2, use_lut2, qv, qsum, bits, mask, nbytes,
                              aligned, has_qjl, l2, qjl_scale) + b
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


@numba.njit(parallel=True, cache=True)
def _scan_parallel(qr, qs, lists, bias, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out_s, out_i,
                   bits, has_qjl, l2, has_filter, qjl_scale):  # pragma: no cover - compiled
    """Every query, in parallel threads."""
    for i in numba.prange(lists.shape[0]):
        _scan_one(i, qr, qs, lists, bias, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out_s, out_i,
                  bits, has_qjl, l2, has_filter, qjl_scale)


@numba.njit(cache=True)
def _scan_serial(qr, qs, lists, bias, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out_s, out_i,
                 bits, has_qjl, l2, has_filter, qjl_scale):  # pragma: no cover - compiled
    """Every query in this thread: for fewer queries than threads a parallel region gains nothing, and on
    a busy machine its barrier waits out the scheduler (8 ms a query instead of 0.5, measured on 2 shared
    cores). A function of its own, not ``njit(_scan_parallel.py_func)``: numba's on-disk cache keys a
    function by its source, so the two builds of one function overwrite each other there."""
    for i in range(lists.shape[0]):
        _scan_one(i, qr, qs, lists, bias, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out_s, out_i,
                  bits, has_qjl, l2, has_filter, qjl_scale)


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
        scan = _scan_parallel if nq >= numba.get_num_threads() else _scan_serial
        scan(_np(p.qr, np.float32), _np(p.qs, np.float32, (nq, D)), _np(p.lists, np.int64),
                   _np(p.bias, np.float32), _np(c.mse, np.uint8), _np(c.qjl, np.uint8, (1, 1)), _np(c.norms, np.float32),
                   _np(c.gammas, np.float32), _np(c.offsets, np.int64), _np(c.crot, np.float32),
                   _np(c.cqjl, np.float32, (1, D)), _np(c.centroids, np.float32), _np(p.allowed, np.bool_), out_s,
                   out_i, c.mse_bits, c.qjl is not None, c.l2, p.allowed is not None, np.float32(c.qjl_scale))
        np.maximum(out_i, 0, out=out_i)
    return torch.from_numpy(out_s), torch.from_numpy(out_i)

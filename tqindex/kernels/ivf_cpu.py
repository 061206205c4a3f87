"""Compiled CPU scan of probed inverted lists (numba): the contract of :mod:`tqindex.kernels.ivf_scan`.

Per (query, probed list) a lookup table ``lut[t, v] = q'_t * codebook[v]`` (D x 2^bits floats) is
built once, then every code of the list costs D table reads (and D/8 sign-byte reads for PROD):
no decoded block is ever materialised. Queries run in parallel threads (``numba.prange``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from tqindex.kernels.ivf_scan import ListCodes, ProbedQueries

__all__ = ["ivf_scan_cpu"]


@numba.njit(parallel=True, cache=True, fastmath=False)
def _scan(qr, qs, lists, bias, cum, mse, qjl, norms, gammas, offsets, crot, cqjl, cb, allowed, out,
          bits, has_qjl, l2, has_filter, qjl_scale):  # pragma: no cover - compiled
    nq, P = lists.shape
    D = qr.shape[1]
    nv = cb.shape[0]
    mask = (1 << bits) - 1
    nbytes = mse.shape[1]
    for i in numba.prange(nq):
        lut = np.empty((D, nv), dtype=np.float32)
        qv = np.empty(D, dtype=np.float32)
        for j in range(P):
            lst = lists[i, j]
            s = offsets[lst]
            e = offsets[lst + 1]
            if e <= s:
                continue
            for t in range(D):
                q = qr[i, t] - crot[lst, t] if l2 else qr[i, t]
                for v in range(nv):
                    lut[t, v] = q * cb[v]
            qsum = np.float32(0.0)
            if has_qjl:
                for t in range(D):
                    qv[t] = qs[i, t] - cqjl[lst, t] if l2 else qs[i, t]
                    qsum += qv[t]
            b = bias[i, j]
            base = cum[i, j]
            for r in range(s, e):
                col = base + (r - s)
                if has_filter and not allowed[r]:
                    out[i, col] = -np.inf
                    continue
                acc = np.float32(0.0)
                if bits > 0:
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
                out[i, col] = est + b


def _np(t: torch.Tensor | None, dtype: type, shape: tuple[int, ...] = (1,)) -> np.ndarray:
    if t is None:
        return np.zeros(shape, dtype=dtype)
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))


def ivf_scan_cpu(c: ListCodes, p: ProbedQueries) -> torch.Tensor:
    """Compiled scan on the CPU: (nq, W) float32 torch tensor, -inf padded (see the module contract)."""
    nq = p.lists.shape[0]
    out = np.full((nq, p.width), -np.inf, dtype=np.float32)
    D = c.padded_dim
    if nq and p.width:
        _scan(_np(p.qr, np.float32), _np(p.qs, np.float32, (nq, D)), _np(p.lists, np.int64),
              _np(p.bias, np.float32), _np(p.cum, np.int64), _np(c.mse, np.uint8),
              _np(c.qjl, np.uint8, (1, 1)), _np(c.norms, np.float32), _np(c.gammas, np.float32),
              _np(c.offsets, np.int64), _np(c.crot, np.float32), _np(c.cqjl, np.float32, (1, D)),
              _np(c.centroids, np.float32), _np(p.allowed, np.bool_), out,
              c.mse_bits, c.qjl is not None, c.l2, p.allowed is not None, np.float32(c.qjl_scale))
    return torch.from_numpy(out)

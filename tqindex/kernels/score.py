"""Inner-product scores straight from packed TurboQuant codes: Triton kernel and its torch reference.

Both compute, for rotated queries qr (nq, D) and, for PROD, projected queries qs = S qr (nq, D):

    score[i, j] = norm[j] * ( <qr[i], c[idx[j]]> + qjl_scale * gamma[j] * <qs[i], 2 z[j] - 1> )

where idx[j] are the ``mse_bits``-bit Lloyd-Max indices and z[j] the QJL sign bits of code j,
both in the LSB-first bit-stream layout of :mod:`tqindex.packing`. The database is never
dequantized in memory: the kernel unpacks a tile of codes in registers and feeds tl.dot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from tqindex.kernels.launch import follows_device
from tqindex.packing import unpack_to_values

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = ["CodeArgs", "score_codes", "score_reference", "score_triton", "code_args", "HAS_TRITON", "use_triton"]

_REF_BLOCK = 16384  # codes dequantized at a time by the reference (bounds its memory)
_SIGNS = torch.tensor([-1.0, 1.0])  # value of a QJL sign bit 0 / 1


@dataclass(frozen=True)
class CodeArgs:
    """What every scan reads: a run of codes with the codec's constants bound once.

    mse (n, mse_bytes) uint8 Lloyd-Max indices, qjl (n, qjl_bytes) uint8 sign bits or None, norms /
    gammas (n,) float, centroids the (2^mse_bits,) codebook; mse_bits, padded_dim and qjl_scale from the
    codec; l2: similarities are 2 <q, x> - ||x||^2 instead of <q, x>. The flat scans
    (:mod:`tqindex.kernels.scan_topk`) take one; the IVF scans take its subclass
    :class:`tqindex.kernels.ivf_scan.ListCodes`, which adds the lists.
    """

    mse: torch.Tensor
    qjl: torch.Tensor | None
    norms: torch.Tensor
    gammas: torch.Tensor | None
    centroids: torch.Tensor
    mse_bits: int
    padded_dim: int
    qjl_scale: float
    l2: bool

    def rows(self, start: int, stop: int) -> "CodeArgs":
        """The codes start .. stop (views), same constants."""
        s = slice(start, stop)
        return replace(self, mse=self.mse[s], qjl=self.qjl[s] if self.qjl is not None else None,
                       norms=self.norms[s], gammas=self.gammas[s] if self.gammas is not None else None)


def use_triton(device: torch.device) -> bool:
    """Whether scoring on ``device`` goes through the Triton kernel (CUDA, or the interpreter if forced)."""
    if not HAS_TRITON or os.environ.get("TQINDEX_DISABLE_TRITON") == "1":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(
        "TQINDEX_FORCE_TRITON"
    ) == "1"


def score_reference(
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
) -> torch.Tensor:
    """Plain-torch scores (nq, n) float32; dequantizes at most ``_REF_BLOCK`` codes at a time."""
    n = norms.shape[0]
    out = torch.empty(qr.shape[0], n, dtype=torch.float32, device=qr.device)
    cents = centroids.to(qr.device, torch.float32)
    for s in range(0, n, _REF_BLOCK):
        e = min(n, s + _REF_BLOCK)
        acc = torch.zeros(qr.shape[0], e - s, dtype=torch.float32, device=qr.device)
        if mse_bits > 0:
            vals = unpack_to_values(mse[s:e], mse_bits, padded_dim, cents)
            acc += qr @ vals.T
        if qjl is not None and qs is not None and gammas is not None:
            z = unpack_to_values(qjl[s:e], 1, padded_dim, _SIGNS.to(qr.device))
            acc += (qs @ z.T) * (gammas[s:e].to(torch.float32) * qjl_scale).unsqueeze(0)
        out[:, s:e] = acc * norms[s:e].to(torch.float32).unsqueeze(0)
    return out


if HAS_TRITON:

    @triton.jit
    def _spread8(v0, v1, v2, v3, v4, v5, v6, v7):
        """Eight (BN, G) tensors -> (BN, 8G) with column 8g + k = v_k[:, g] (joins in bit-reversed order)."""
        e = tl.join(tl.join(v0, v4), tl.join(v2, v6))
        o = tl.join(tl.join(v1, v5), tl.join(v3, v7))
        t = tl.join(e, o)  # (BN, G, 2, 2, 2): [.., a, b, c] = v_{4a + 2b + c}
        return tl.reshape(t, (v0.shape[0], v0.shape[1] * 8))

    @triton.jit
    def _unpack_values(P, rn64, nmask, g, stride, BITS: tl.constexpr):
        """(BN, 8G) int32 values of BITS bits for coordinate groups g (G,) of rows rn64 (BN,).

        Group g (8 coordinates) is bytes [g*BITS, g*BITS + BITS) of a row: BITS strided byte
        loads per 8 coordinates instead of one or two gathers per coordinate. 4 and 8 bits take
        direct byte paths (nibble split, or the byte itself) instead of assembling a 64-bit word.
        """
        if BITS == 8:  # one byte per value
            col = tl.reshape((g * 8)[:, None] + tl.arange(0, 8)[None, :], (g.shape[0] * 8,))
            return tl.load(P + rn64[:, None] * stride + col[None, :], mask=nmask[:, None] & (col < stride)[None, :],
                           other=0).to(tl.int32)
        if BITS == 4:  # two values per byte, low nibble first: int32 nibble splits, no 64-bit word
            col = tl.reshape((g * 4)[:, None] + tl.arange(0, 4)[None, :], (g.shape[0] * 4,))
            b = tl.load(P + rn64[:, None] * stride + col[None, :], mask=nmask[:, None] & (col < stride)[None, :],
                        other=0).to(tl.int32)
            return tl.reshape(tl.join(b & 15, b >> 4), (rn64.shape[0], g.shape[0] * 8))
        word = tl.zeros((rn64.shape[0], g.shape[0]), dtype=tl.int64)
        for j in tl.static_range(BITS):
            col = g * BITS + j
            byte = tl.load(P + rn64[:, None] * stride + col[None, :], mask=nmask[:, None] & (col < stride)[None, :],
                           other=0)
            word = word | (byte.to(tl.int64) << (8 * j))
        m = (1 << BITS) - 1
        return _spread8(
            (word & m).to(tl.int32), ((word >> BITS) & m).to(tl.int32), ((word >> 2 * BITS) & m).to(tl.int32),
            ((word >> 3 * BITS) & m).to(tl.int32), ((word >> 4 * BITS) & m).to(tl.int32),
            ((word >> 5 * BITS) & m).to(tl.int32), ((word >> 6 * BITS) & m).to(tl.int32),
            ((word >> 7 * BITS) & m).to(tl.int32),
        )

    @triton.jit
    def _unpack_tile(MSE, QJL, CB, rn64, d0, nmask, dmask, mse_stride, qjl_stride,
                     MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, BD: tl.constexpr):
        """Centroid values (BN, BD) float32 and QJL signs (BN, BD) +-1 of codes rn64, coordinates d0 + [0, BD)."""
        g = d0 // 8 + tl.arange(0, BD // 8)
        m2 = nmask[:, None] & dmask[None, :]
        c = tl.zeros(m2.shape, dtype=tl.float32)
        z = tl.zeros(m2.shape, dtype=tl.float32)
        if MSE_BITS > 0:
            v = _unpack_values(MSE, rn64, nmask, g, mse_stride, MSE_BITS)
            c = tl.where(m2, tl.load(CB + v), 0.0)
        if HAS_QJL:
            b = _unpack_values(QJL, rn64, nmask, g, qjl_stride, 1)
            z = tl.where(m2, b.to(tl.float32) * 2.0 - 1.0, 0.0)
        return c, z

    @triton.jit
    def _dot_tile(QR, QS, MSE, QJL, CB, rq, qmask, rn64, nmask, mse_stride, qjl_stride, stride_qr, stride_qs,
                  D: tl.constexpr, MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr, BQ: tl.constexpr,
                  BN: tl.constexpr, BD: tl.constexpr, FP16: tl.constexpr):
        """(BQ, BN) dot products of queries rq with codes rn64: <qr, c[idx]> and <qs, 2z - 1> (tensor cores)."""
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
        return acc, acc2

    @triton.jit
    def _score_kernel(
        QR, QS, MSE, QJL, NORM, GAMMA, CB, OUT,
        nq, n, mse_stride, qjl_stride, qjl_scale,
        stride_qr, stride_qs, stride_out,
        D: tl.constexpr, MSE_BITS: tl.constexpr, HAS_QJL: tl.constexpr,
        BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_n = tl.program_id(1)
        rq = pid_q * BQ + tl.arange(0, BQ)
        rn = pid_n * BN + tl.arange(0, BN)
        qmask = rq < nq
        nmask = rn < n
        rn64 = rn.to(tl.int64)
        acc, acc2 = _dot_tile(QR, QS, MSE, QJL, CB, rq, qmask, rn64, nmask, mse_stride, qjl_stride, stride_qr,
                              stride_qs, D, MSE_BITS, HAS_QJL, BQ, BN, BD, False)
        norm = tl.load(NORM + rn, mask=nmask, other=0.0).to(tl.float32)
        res = acc
        if HAS_QJL:
            gam = tl.load(GAMMA + rn, mask=nmask, other=0.0).to(tl.float32)
            res = res + acc2 * (gam * qjl_scale)[None, :]
        res = res * norm[None, :]
        tl.store(OUT + rq[:, None].to(tl.int64) * stride_out + rn64[None, :], res, mask=qmask[:, None] & nmask[None, :])


def code_args(
    mse: torch.Tensor,
    qjl: torch.Tensor | None,
    norms: torch.Tensor,
    gammas: torch.Tensor | None,
    centroids: torch.Tensor,
    mse_bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Kernel arguments for a block of codes: (mse, qjl, norms, gammas, centroids, mse_stride, qjl_stride).

    Every tensor contiguous; an absent part (no MSE bits, no QJL) gets another valid pointer and
    stride 1, never read because the kernel's MSE_BITS / HAS_QJL constants switch it off.
    """
    has_qjl = qjl is not None
    mse_c = mse.contiguous() if mse_bits > 0 else qjl.contiguous()
    qjl_c = qjl.contiguous() if has_qjl else mse_c
    norms_c = norms.contiguous()
    gam = gammas.contiguous() if has_qjl else norms_c
    cb = centroids.to(norms.device, torch.float32).contiguous()
    return mse_c, qjl_c, norms_c, gam, cb, (mse.shape[1] if mse_bits > 0 else 1), (qjl.shape[1] if has_qjl else 1)


def _blocks(nq: int, D: int) -> tuple[int, int, int]:
    bq = 16 if nq <= 16 else (32 if nq <= 32 else 64)
    bd = 32 if D <= 32 else 64
    return bq, 64, bd


@follows_device
def score_triton(
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton scores (nq, n) float32 (same contract as :func:`score_reference`)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    nq, n = qr.shape[0], norms.shape[0]
    if out is None:
        out = torch.empty(nq, n, dtype=torch.float32, device=qr.device)
    if nq == 0 or n == 0:
        return out
    qr = qr.contiguous().to(torch.float32)
    has_qjl = qjl is not None
    qs_t = qs.contiguous().to(torch.float32) if has_qjl else qr
    mse_c, qjl_c, norms_c, gam, cb, mse_stride, qjl_stride = code_args(mse, qjl, norms, gammas, centroids, mse_bits)
    bq, bn, bd = _blocks(nq, padded_dim)
    grid = (triton.cdiv(nq, bq), triton.cdiv(n, bn))
    _score_kernel[grid](
        qr, qs_t, mse_c, qjl_c, norms_c, gam, cb, out,
        nq, n, mse_stride, qjl_stride, float(qjl_scale),
        qr.stride(0), qs_t.stride(0), out.stride(0),
        D=padded_dim, MSE_BITS=mse_bits, HAS_QJL=has_qjl, BQ=bq, BN=bn, BD=bd,
    )
    return out


def score_codes(
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
) -> torch.Tensor:
    """Scores (nq, n): the Triton kernel on CUDA, the torch reference elsewhere."""
    fn = score_triton if use_triton(qr.device) else score_reference
    return fn(qr, qs, mse, qjl, norms, gammas, centroids, mse_bits=mse_bits, padded_dim=padded_dim,
              qjl_scale=qjl_scale)

"""Attention straight from TurboQuant-coded keys/values: torch reference and a Triton decode kernel.

Layout (what :mod:`tqindex.kvcache` stores, per layer): B sequences, H key/value heads, head_dim d.
A stream (keys or values) is split into channel groups ("parts": the outlier channels and the rest);
each part p has its own codec of dimension d_p, with a Haar rotation R_p (d_p, d_p) and codes

    mse    (B, H, N, ceil(mse_bits * d_p / 8)) uint8, Lloyd-Max indices, LSB-first bit stream
    norms  (B, H, N) float16/float32, ||x_p|| of each token's slice
    qjl    (B, H, N, ceil(d_p / 8)) uint8 sign bits (PROD keys only), gammas (B, H, N) their residual norms

so that x_p ~ norms * R_p^T c[idx] (+ the QJL term for PROD). Scores are computed in the rotated
domain (<R q, c[idx]>), values are accumulated in the rotated domain and rotated back once per
query row: the dequantized cache is never materialised (the reference dequantizes one block of
``_REF_BLOCK`` tokens at a time; the kernel unpacks a tile in registers).

Query heads are grouped as in transformers' ``repeat_kv``: query head ``h * G + g`` reads kv head ``h``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tqindex.kernels.launch import follows_device
from tqindex.kernels.score import use_triton
from tqindex.packing import unpack_bits

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    from tqindex.kernels.score import _unpack_values

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = [
    "CodePart",
    "QuantizedKV",
    "quantized_attention",
    "quantized_attention_reference",
    "quantized_attention_triton",
    "coded_attention_lse_triton",
    "use_triton_attention",
    "HAS_TRITON",
]

_REF_BLOCK = 4096  # tokens dequantized at a time by the reference


@dataclass
class CodePart:
    """Codes of one channel group of a key or value stream.

    Attributes:
        mse: (B, H, N, mse_bytes) uint8 packed Lloyd-Max indices (N may be a view of a larger buffer).
        norms: (B, H, N) float, norm of each token's slice.
        qjl: (B, H, N, ceil(d_p/8)) uint8 QJL sign bits, PROD keys only, else None.
        gammas: (B, H, N) float residual norms, PROD keys only, else None.
        channels: (H, d_p) int64 channel indices of this part per head, or None for "all channels in order".
        rotation: (d_p, d_p) float32 orthogonal matrix; rotated = x @ rotation.T.
        centroids: (2**mse_bits,) float32 Lloyd-Max centroids (unused when mse_bits == 0).
        mse_bits: bits per index.
        qjl_matrix: (d_p, d_p) float32 QJL projection S (PROD only).
        qjl_scale: scale of the QJL term (sqrt(pi/2)/d_p for a Gaussian S).
    """

    mse: torch.Tensor
    norms: torch.Tensor
    qjl: torch.Tensor | None
    gammas: torch.Tensor | None
    channels: torch.Tensor | None
    rotation: torch.Tensor
    centroids: torch.Tensor
    mse_bits: int
    qjl_matrix: torch.Tensor | None = None
    qjl_scale: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.rotation.shape[0])

    def slice(self, n: int) -> "CodePart":
        """The first ``n`` tokens."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, :, :n]

        return CodePart(cut(self.mse), cut(self.norms), cut(self.qjl), cut(self.gammas), self.channels,
                        self.rotation, self.centroids, self.mse_bits, self.qjl_matrix, self.qjl_scale)


@dataclass
class QuantizedKV:
    """The quantized part of one layer's cache: N tokens of keys and values as codes.

    Attributes:
        keys: the key parts (channel groups), covering all head_dim channels once.
        values: the value parts.
        key_mean: (B, H, d) float32 mean key subtracted before encoding (added back as q . mean), or None.
        length: N, the number of coded tokens (the first N positions of the sequence).
        head_dim: d.
    """

    keys: list[CodePart]
    values: list[CodePart]
    key_mean: torch.Tensor | None
    length: int
    head_dim: int


# ---------------------------------------------------------------------------------------------
# helpers shared by both paths
# ---------------------------------------------------------------------------------------------
def _select(x: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, ..., d) -> (B, H, ..., d_p): the part's channels of each head."""
    if channels is None:
        return x
    idx = channels.to(x.device).view(1, channels.shape[0], *([1] * (x.dim() - 3)), channels.shape[1])
    return torch.gather(x, -1, idx.expand(*x.shape[:-1], channels.shape[1]))


def _scatter_add(out: torch.Tensor, part: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """out (B, H, ..., d) += part (B, H, ..., d_p) placed at the part's channels."""
    if channels is None:
        return out + part
    idx = channels.to(out.device).view(1, channels.shape[0], *([1] * (out.dim() - 3)), channels.shape[1])
    return out.scatter_add(-1, idx.expand(*part.shape), part)


def _grouped_query(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, Hq, L, d) -> (B, H, G, L, d) float32, G = Hq / H."""
    b, hq, L, d = query.shape
    if hq % n_kv:
        raise ValueError(f"query has {hq} heads, which is not a multiple of the cache's {n_kv} key/value heads")
    return query.to(torch.float32).view(b, n_kv, hq // n_kv, L, d)


def _grouped_mask(mask: torch.Tensor | None, b: int, h: int, g: int, L: int, n: int,
                  device: torch.device) -> torch.Tensor:
    """Attention mask -> additive float32 bias broadcastable to (B, H, G, L, n).

    ``mask`` follows transformers: (B, 1 or Hq, L, n) bool (True = attend) or float (added to the
    scores); None means causal with the queries at the last L positions.
    """
    if mask is None:
        qpos = torch.arange(n - L, n, device=device).view(L, 1)
        allowed = torch.arange(n, device=device).view(1, n) <= qpos
        return torch.zeros(L, n, device=device).masked_fill(~allowed, float("-inf")).view(1, 1, 1, L, n)
    if mask.dim() != 4 or mask.shape[-1] != n or mask.shape[-2] != L:
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected (batch, 1 or heads, {L}, {n})")
    m = mask.to(device)
    bias = (torch.zeros(m.shape, device=device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool
            else m.to(torch.float32))
    if bias.shape[1] == 1:
        return bias.unsqueeze(2)
    return bias.view(bias.shape[0], h, g, L, n)


def _rotated_queries(qg: torch.Tensor, part: CodePart) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H, G, L, d) queries -> this part's rotated queries and (PROD) QJL projections, float32."""
    qr = _select(qg, part.channels) @ part.rotation.to(qg.device, torch.float32).T
    qs = qr @ part.qjl_matrix.to(qg.device, torch.float32).T if part.qjl is not None else None
    return qr, qs


def _dequant_rotated(part: CodePart, s: int, e: int) -> torch.Tensor:
    """Tokens [s, e) of a part -> (B, H, e - s, d_p) float32 values in the rotated domain, times norms."""
    b, h = part.norms.shape[:2]
    n = e - s
    if part.mse_bits > 0:
        packed = part.mse[:, :, s:e].reshape(b * h * n, -1)
        idx = unpack_bits(packed.contiguous(), part.mse_bits, part.dim).long()
        vals = part.centroids.to(packed.device, torch.float32)[idx].view(b, h, n, part.dim)
    else:
        vals = torch.zeros(b, h, n, part.dim, device=part.norms.device)
    return vals * part.norms[:, :, s:e].to(torch.float32).unsqueeze(-1)


def _code_scores(qg: torch.Tensor, kv: QuantizedKV) -> torch.Tensor:
    """Scores <q, k~> (B, H, G, L, N) float32 of grouped queries against the coded keys (unscaled)."""
    b, h, g, L, d = qg.shape
    n = kv.length
    out = torch.zeros(b, h, g, L, n, device=qg.device)
    for part in kv.keys:
        qr, qs = _rotated_queries(qg, part)
        for s in range(0, n, _REF_BLOCK):
            e = min(n, s + _REF_BLOCK)
            vals = _dequant_rotated(part, s, e)
            out[..., s:e] += torch.einsum("bhgld,bhnd->bhgln", qr, vals)
            if part.qjl is not None:
                z = unpack_bits(part.qjl[:, :, s:e].reshape(b * h * (e - s), -1).contiguous(), 1, part.dim)
                z = z.to(torch.float32).view(b, h, e - s, part.dim) * 2 - 1
                w = (part.gammas[:, :, s:e].to(torch.float32) * part.norms[:, :, s:e].to(torch.float32)
                     * part.qjl_scale)
                out[..., s:e] += torch.einsum("bhgld,bhnd->bhgln", qs, z) * w[:, :, None, None, :]
    if kv.key_mean is not None:
        out += torch.einsum("bhgld,bhd->bhgl", qg, kv.key_mean.to(torch.float32)).unsqueeze(-1)
    return out


def _code_values(p: torch.Tensor, kv: QuantizedKV) -> torch.Tensor:
    """p (B, H, G, L, N) weights @ decoded values -> (B, H, G, L, d) float32."""
    b, h, g, L, n = p.shape
    out = torch.zeros(b, h, g, L, kv.head_dim, device=p.device)
    for part in kv.values:
        acc = torch.zeros(b, h, g, L, part.dim, device=p.device)
        for s in range(0, n, _REF_BLOCK):
            e = min(n, s + _REF_BLOCK)
            acc += torch.einsum("bhgln,bhnd->bhgld", p[..., s:e], _dequant_rotated(part, s, e))
        out = _scatter_add(out, acc @ part.rotation.to(p.device, torch.float32), part.channels)
    return out


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------
def quantized_attention_reference(
    query: torch.Tensor,
    kv: QuantizedKV | None,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V over [coded tokens | full-precision tokens].

    Args:
        query: (B, Hq, L, d) float, the L newest positions' queries.
        kv: the coded tokens (positions 0..N-1), or None when nothing is coded yet.
        k_fp, v_fp: (B, H, M, d) float, positions N..N+M-1 in full precision.
        mask: (B, 1 or Hq, L, N+M) bool (True = attend) or additive float, or None for causal.
        scaling: score scale, usually head_dim ** -0.5.
    Returns:
        (B, Hq, L, d) attention output in ``query``'s dtype.
    """
    b, hq, L, d = query.shape
    h = k_fp.shape[1]
    qg = _grouped_query(query, h)
    g = qg.shape[2]
    n = kv.length if kv is not None else 0
    parts = []
    if n:
        parts.append(_code_scores(qg, kv))
    if k_fp.shape[2]:
        parts.append(torch.einsum("bhgld,bhmd->bhglm", qg, k_fp.to(torch.float32)))
    scores = torch.cat(parts, dim=-1) * scaling
    scores = scores + _grouped_mask(mask, b, h, g, L, scores.shape[-1], query.device)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (padding) -> zeros
    out = torch.zeros(b, h, g, L, d, device=query.device)
    if n:
        out = out + _code_values(p[..., :n], kv)
    if k_fp.shape[2]:
        out = out + torch.einsum("bhglm,bhmd->bhgld", p[..., n:], v_fp.to(torch.float32))
    return out.view(b, hq, L, d).to(query.dtype)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def use_triton_attention(device: torch.device) -> bool:
    """Whether decode attention on ``device`` runs the Triton kernel: the same rule as the scan kernels."""
    return HAS_TRITON and use_triton(device)


def quantized_attention(
    query: torch.Tensor,
    kv: QuantizedKV | None,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Same contract as :func:`quantized_attention_reference`, in O(rows) memory.

    Decode calls on CUDA (one query row, one MSE part per stream) run
    :func:`tqindex.kernels.decode_attention.decode_attention_triton`; other decode-like calls (few
    query rows, outlier splits, PROD keys) the split kernel below; everything else (prefill,
    chunks, the CPU) runs :func:`tqindex.kernels.online_attention.quantized_attention_online`: SDPA
    over the full-precision tokens, blocks of codes under an online softmax, a log-sum-exp merge.
    """
    from tqindex.kernels.decode_attention import decode_attention_triton, decode_ok

    if decode_ok(query, kv, mask):  # one token per sequence, one MSE part per stream: two launches
        return decode_attention_triton(query, kv, k_fp, v_fp, mask, scaling)
    if kv is not None and kv.length > 0 and use_triton_attention(query.device) and _kernel_ok(query, kv, mask):
        return quantized_attention_triton(query, kv, k_fp, v_fp, mask, scaling)
    from tqindex.kernels.online_attention import quantized_attention_online  # imports this module's helpers

    return quantized_attention_online(query, kv, k_fp, v_fp, mask, scaling)


def _kernel_ok(query: torch.Tensor, kv: QuantizedKV, mask: torch.Tensor | None) -> bool:
    """The kernel handles decode-like calls: few query rows, <= 2 parts per stream, a head-shared mask."""
    b, hq, L, d = query.shape
    g = hq // kv.keys[0].norms.shape[1]
    return (
        HAS_TRITON
        and g * L <= 64
        and (mask is None or mask.shape[1] == 1)
        and _kernel_parts_ok(kv)
    )


# ---------------------------------------------------------------------------------------------
# Triton decode kernel (split-K "flash decoding" over the coded tokens)
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _centroid_tile(MSE, CB, rows, nmask, rd, dmask, nbytes, BITS: tl.constexpr):
        """(BN, BD) float32 centroid values of tokens ``rows`` (int64 row ids), dims ``rd`` (= arange(BD)).

        Groups of 8 coordinates are BITS whole bytes, unpacked with BITS strided byte loads
        (tqindex.kernels.score._unpack_values) instead of one or two byte gathers per coordinate.
        """
        m2 = nmask[:, None] & dmask[None, :]
        v = _unpack_values(MSE, rows, nmask, tl.arange(0, rd.shape[0] // 8), nbytes, BITS)
        return tl.where(m2, tl.load(CB + v), 0.0)

    @triton.jit
    def _centroid_tile_gather(MSE, CB, rows, nmask, rd, dmask, nbytes, BITS: tl.constexpr):
        """Per-coordinate byte-gather version of :func:`_centroid_tile` (kept as a reference point)."""
        bit = rd * BITS
        byte = bit >> 3
        sh = bit & 7
        m2 = nmask[:, None] & dmask[None, :]
        ptr = MSE + rows[:, None] * nbytes + byte[None, :]
        lo = tl.load(ptr, mask=m2, other=0).to(tl.int32)
        if (8 % BITS) != 0:
            hmask = m2 & (byte[None, :] + 1 < nbytes)
            hi = tl.load(ptr + 1, mask=hmask, other=0).to(tl.int32)
            lo = lo | (hi << 8)
        v = (lo >> sh[None, :]) & ((1 << BITS) - 1)
        c = tl.load(CB + v)
        return tl.where(m2, c, 0.0)

    @triton.jit
    def _sign_tile(QJL, rows, nmask, rd, dmask, nbytes):
        """(BN, BD) float32 QJL signs (+-1) of tokens ``rows``."""
        m2 = nmask[:, None] & dmask[None, :]
        b = _unpack_values(QJL, rows, nmask, tl.arange(0, rd.shape[0] // 8), nbytes, 1)
        return tl.where(m2, b.to(tl.float32) * 2.0 - 1.0, 0.0)

    @triton.jit
    def _load_queries(QR, bh, rm, rmask, dp, nrows, BD: tl.constexpr):
        """(BM, BD) float32 rotated queries of program ``bh`` (loaded once, before the token loop)."""
        rd = tl.arange(0, BD)
        qoff = (bh * nrows + rm)[:, None].to(tl.int64) * dp + rd[None, :]
        return tl.load(QR + qoff, mask=rmask[:, None] & (rd < dp)[None, :], other=0.0)

    @triton.jit
    def _key_part_scores(q, qs, MSE, NRM, QJL, GAM, CB, rows, nmask, dp, mse_nb, qjl_nb, qjl_scale,
                         BITS: tl.constexpr, PROD: tl.constexpr, BD: tl.constexpr):
        """(BM, BN) scores <R q, k~> of one key part (norms applied)."""
        rd = tl.arange(0, BD)
        dmask = rd < dp
        c = _centroid_tile(MSE, CB, rows, nmask, rd, dmask, mse_nb, BITS)  # BITS >= 1 (see _kernel_ok)
        s = tl.dot(q, tl.trans(c))
        nrm = tl.load(NRM + rows, mask=nmask, other=0.0).to(tl.float32)
        if PROD:
            z = _sign_tile(QJL, rows, nmask, rd, dmask, qjl_nb)
            gam = tl.load(GAM + rows, mask=nmask, other=0.0).to(tl.float32)
            s += tl.dot(qs, tl.trans(z)) * (gam * qjl_scale)[None, :]
        return s * nrm[None, :]

    @triton.jit
    def _value_part_tile(MSE, NRM, CB, rows, nmask, dp, mse_nb, BITS: tl.constexpr, BD: tl.constexpr):
        """(BN, BD) rotated-domain values times norms of one value part."""
        rd = tl.arange(0, BD)
        c = _centroid_tile(MSE, CB, rows, nmask, rd, rd < dp, mse_nb, BITS)
        nrm = tl.load(NRM + rows, mask=nmask, other=0.0).to(tl.float32)
        return c * nrm[:, None]

    @triton.jit
    def _softmax_step(s, m_i, l_i):
        """One online-softmax step over a (BM, BN) score tile (masked scores -inf): returns
        (new running max, factor for the old sums, exp(s - new max), new running sum); rows with
        nothing visible yet keep max -inf and contribute zeros."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)

    @triton.jit
    def _tq_decode_kernel(
        QR0, QS0, QR1, QS1, QMU, KBIAS,
        KM0, KN0, KQ0, KG0, KC0, KM1, KN1, KQ1, KG1, KC1,
        VM0, VN0, VC0, VM1, VN1, VC1,
        OM, OL, OA0, OA1,
        n_tok, cap, n_heads, nrows, rows_pad, tok_per_split, scale,
        kd0, kd1, vd0, vd1, km0_nb, km1_nb, kq0_nb, kq1_nb, vm0_nb, vm1_nb, qjl_scale0, qjl_scale1,
        KB0: tl.constexpr, KB1: tl.constexpr, VB0: tl.constexpr, VB1: tl.constexpr,
        PROD: tl.constexpr, TWO: tl.constexpr, HAS_MU: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr,
        BV0: tl.constexpr, BV1: tl.constexpr,
    ):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        nsplit = tl.num_programs(1)
        rm = tl.program_id(2) * BM + tl.arange(0, BM)  # this program's query rows (row blocks: prefill chunks)
        rmask = rm < nrows
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc0 = tl.zeros((BM, BV0), dtype=tl.float32)
        acc1 = tl.zeros((BM, BV1), dtype=tl.float32)
        mu = tl.zeros((BM,), dtype=tl.float32)
        if HAS_MU:
            mu = tl.load(QMU + bh * nrows + rm, mask=rmask, other=0.0)
        q0 = _load_queries(QR0, bh, rm, rmask, kd0, nrows, BK0)
        qs0 = q0
        if PROD:
            qs0 = _load_queries(QS0, bh, rm, rmask, kd0, nrows, BK0)
        q1 = q0
        qs1 = q0
        if TWO:
            q1 = _load_queries(QR1, bh, rm, rmask, kd1, nrows, BK1)
            qs1 = q1
            if PROD:
                qs1 = _load_queries(QS1, bh, rm, rmask, kd1, nrows, BK1)
        start = sp * tok_per_split
        b = bh // n_heads
        it = 0
        while it < tok_per_split:  # a while loop: Triton 3.6's interpreter cannot index a runtime range bound
            rn = start + it + tl.arange(0, BN)
            nmask = (rn < n_tok) & (rn < start + tok_per_split)
            rows = bh.to(tl.int64) * cap + rn
            s = _key_part_scores(q0, qs0, KM0, KN0, KQ0, KG0, KC0, rows, nmask, kd0, km0_nb, kq0_nb, qjl_scale0,
                                 KB0, PROD, BK0)
            if TWO:
                s += _key_part_scores(q1, qs1, KM1, KN1, KQ1, KG1, KC1, rows, nmask, kd1, km1_nb, kq1_nb, qjl_scale1,
                                      KB1, PROD, BK1)
            s = (s + mu[:, None]) * scale
            if HAS_BIAS:
                s += tl.load(KBIAS + b.to(tl.int64) * n_tok + rn, mask=nmask, other=0.0)[None, :]
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
            v0 = _value_part_tile(VM0, VN0, VC0, rows, nmask, vd0, vm0_nb, VB0, BV0)
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v0)
            if TWO:
                v1 = _value_part_tile(VM1, VN1, VC1, rows, nmask, vd1, vm1_nb, VB1, BV1)
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v1)
            m_i = m_new
            it += BN
        o = (bh * nsplit + sp).to(tl.int64)
        tl.store(OM + o * rows_pad + rm, m_i)
        tl.store(OL + o * rows_pad + rm, l_i)
        rv0 = tl.arange(0, BV0)
        tl.store(OA0 + (o * rows_pad + rm)[:, None] * BV0 + rv0[None, :], acc0)
        if TWO:
            rv1 = tl.arange(0, BV1)
            tl.store(OA1 + (o * rows_pad + rm)[:, None] * BV1 + rv1[None, :], acc1)


def _rows_layout(t: torch.Tensor, cap: int) -> torch.Tensor:
    """A (B, H, n, ...) view of a (B, H, cap, ...) buffer as-is if it has that layout, else a contiguous copy
    padded to ``cap`` rows (so that token row r of head bh sits at bh * cap + r)."""
    b, h, n = t.shape[:3]
    inner = t[0, 0, 0].numel() if n else 1
    if t.stride(2) == inner and t.stride(1) == cap * inner and t.stride(0) == h * cap * inner and (
        t.dim() == 3 or t.stride(3) == 1
    ):
        return t
    out = torch.zeros(b, h, cap, *t.shape[3:], dtype=t.dtype, device=t.device)
    out[:, :, :n] = t
    return out


def _buffer_cap(norms: torch.Tensor, n: int) -> int:
    """Token capacity of the (B, H, cap) buffer a (B, H, n) norms view sits in (n if it is not such a view)."""
    return max(n, norms.stride(1) if norms.stride(2) == 1 else n)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (``triton.cdiv`` there is a constexpr-function call: ~7 us on the H200 machine)."""
    return -(-a // b)


def _split_tokens(n: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(tokens per split, a multiple of block_n; splits) covering n coded tokens in about ``num_splits`` pieces."""
    tok = _cdiv(_cdiv(n, num_splits), block_n) * block_n
    return tok, _cdiv(n, tok)


def _pow2(n: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _kernel_parts_ok(kv: QuantizedKV) -> bool:
    """The kernel reads <= 2 parts per stream, as many for keys as for values, each with MSE bits and d_p % 8 == 0."""
    return (len(kv.keys) <= 2 and len(kv.keys) == len(kv.values)
            and all(p.mse_bits > 0 and p.dim % 8 == 0 for p in kv.keys + kv.values))


@dataclass
class _Splits:
    """Per-split partial softmax state of the coded tokens, as the kernel leaves it (rows = G * L per (b, h)).

    m, l: (BH, S, rows) running max and sum; acc: per value part (BH, S, rows, BV_p) rotated-domain sums."""

    m: torch.Tensor
    l: torch.Tensor
    acc: list[torch.Tensor]
    qg: torch.Tensor
    nrows: int


def _coded_splits(query: torch.Tensor, kv: QuantizedKV, mask: torch.Tensor | None, scaling: float, *, block_n: int,
                  block_m: int | None, num_splits: int | None, num_warps: int) -> _Splits:
    """Launch the kernel over the coded tokens: grid (B * H, splits, row blocks of ``block_m`` rows)."""
    b, hq, L, d = query.shape
    h = kv.keys[0].norms.shape[1]
    qg = _grouped_query(query, h)
    g = qg.shape[2]
    nrows = g * L
    n = kv.length
    bm = _pow2(nrows) if block_m is None else max(16, min(_pow2(nrows), _pow2(block_m)))
    row_blocks = _cdiv(nrows, bm)
    rows_pad = row_blocks * bm
    two = len(kv.keys) == 2
    if two != (len(kv.values) == 2):
        raise ValueError("the kernel needs the same number of parts (1 or 2) for keys and values")
    prod = kv.keys[0].qjl is not None
    cap = _buffer_cap(kv.keys[0].norms, n)

    def lay(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else _rows_layout(t, cap)

    qrs, qss = [], []
    for part in kv.keys:
        qr, qs = _rotated_queries(qg, part)
        qrs.append(qr.reshape(b * h, nrows, part.dim).contiguous())
        qss.append(qs.reshape(b * h, nrows, part.dim).contiguous() if qs is not None else qrs[-1])
    qmu = (torch.einsum("bhgld,bhd->bhgl", qg, kv.key_mean.to(torch.float32)).reshape(b * h, nrows).contiguous()
           if kv.key_mean is not None else qrs[0])
    kbias = None
    if mask is not None:
        m_last = mask[:, 0, -1, :n]
        kbias = (torch.zeros(b, n, device=query.device).masked_fill(~m_last, float("-inf")) if m_last.dtype == torch.bool
                 else m_last.to(torch.float32)).contiguous()
    kp = [kv.keys[0], kv.keys[1] if two else kv.keys[0]]
    vp = [kv.values[0], kv.values[1] if two else kv.values[0]]
    km = [lay(p.mse) for p in kp]
    kn = [lay(p.norms) for p in kp]
    kq = [lay(p.qjl) if prod else km[i] for i, p in enumerate(kp)]
    kg = [lay(p.gammas) if prod else kn[i] for i, p in enumerate(kp)]
    kc = [p.centroids.to(query.device, torch.float32).contiguous() for p in kp]
    vm = [lay(p.mse) for p in vp]
    vn = [lay(p.norms) for p in vp]
    vc = [p.centroids.to(query.device, torch.float32).contiguous() for p in vp]
    if num_splits is None:
        sms = _sm_count(query.device.index or 0) if query.is_cuda else 4
        num_splits = max(1, min(_cdiv(4 * sms, b * h * row_blocks), _cdiv(n, block_n)))
    tok_per_split, num_splits = _split_tokens(n, num_splits, block_n)
    bv = [_pow2(p.dim) for p in vp]
    bk = [_pow2(p.dim) for p in kp]
    dev = query.device
    om = torch.empty(b * h, num_splits, rows_pad, device=dev)
    ol = torch.empty(b * h, num_splits, rows_pad, device=dev)
    oa = [torch.empty(b * h, num_splits, rows_pad, bv[0], device=dev),
          torch.empty(b * h, num_splits, rows_pad, bv[1], device=dev) if two else om]
    _tq_decode_kernel[(b * h, num_splits, row_blocks)](
        qrs[0], qss[0], qrs[-1], qss[-1], qmu, kbias if kbias is not None else qmu,
        km[0], kn[0], kq[0], kg[0], kc[0], km[1], kn[1], kq[1], kg[1], kc[1],
        vm[0], vn[0], vc[0], vm[1], vn[1], vc[1],
        om, ol, oa[0], oa[1],
        n, cap, h, nrows, rows_pad, tok_per_split, float(scaling),
        kp[0].dim, kp[1].dim, vp[0].dim, vp[1].dim,
        km[0].shape[-1], km[1].shape[-1], kq[0].shape[-1], kq[1].shape[-1], vm[0].shape[-1], vm[1].shape[-1],
        float(kp[0].qjl_scale), float(kp[1].qjl_scale),
        KB0=kp[0].mse_bits, KB1=kp[1].mse_bits, VB0=vp[0].mse_bits, VB1=vp[1].mse_bits,
        PROD=prod, TWO=two, HAS_MU=kv.key_mean is not None, HAS_BIAS=kbias is not None,
        BM=bm, BN=block_n, BK0=bk[0], BK1=bk[1], BV0=bv[0], BV1=bv[1], num_warps=num_warps,
    )
    return _Splits(m=om[:, :, :nrows], l=ol[:, :, :nrows], acc=[a[:, :, :nrows] for a in oa[: len(kv.values)]],
                   qg=qg, nrows=nrows)


@follows_device
def coded_attention_lse_triton(query: torch.Tensor, kv: QuantizedKV, mask: torch.Tensor | None, scaling: float, *,
                               block_n: int = 32, block_m: int = 64, num_splits: int | None = None,
                               num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`tqindex.kernels.online_attention.coded_attention_lse` (any number of rows).

    Query rows are cut into blocks of ``block_m`` (one program each, per split of the coded tokens);
    the mask over the coded tokens must be the same for every row and head (padding: it is read from
    the last row of head 0), as it is for every full-attention layer. Memory O(splits * rows * d).
    Returns out (B, Hq, L, d) float32 normalised over the coded tokens and lse (B, Hq, L) (-inf: none visible).
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    b, hq, L, d = query.shape
    h = kv.keys[0].norms.shape[1]
    sp = _coded_splits(query, kv, mask, scaling, block_n=block_n, block_m=block_m, num_splits=num_splits,
                       num_warps=num_warps)
    m_all = sp.m.amax(dim=1)  # (BH, rows)
    m_safe = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    w = torch.exp(sp.m - m_safe.unsqueeze(1))  # (BH, S, rows)
    denom = (w * sp.l).sum(1)
    out = torch.zeros(b, h, hq // h, L, d, device=query.device)
    for part, a in zip(kv.values, sp.acc):
        acc = (w.unsqueeze(-1) * a).sum(1)[..., : part.dim] @ part.rotation.to(query.device, torch.float32)
        out = _scatter_add(out, acc.view(b, h, hq // h, L, part.dim), part.channels)
    seen = (denom > 0).view(b, h, hq // h, L)
    den = torch.where(seen, denom.view_as(seen), torch.ones_like(denom).view_as(seen))
    out = out / den.unsqueeze(-1)
    lse = torch.where(seen, m_safe.view_as(seen) + torch.log(den), torch.full_like(den, float("-inf")))
    return out.view(b, hq, L, d), lse.view(b, hq, L)


@follows_device
def quantized_attention_triton(
    query: torch.Tensor,
    kv: QuantizedKV,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    *,
    block_n: int = 32,
    num_splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton decode attention; same contract as :func:`quantized_attention_reference`.

    The coded tokens are read once, split over ``num_splits`` programs per (sequence, kv head)
    (default: enough programs to fill the GPU); each program keeps a running softmax over its
    tokens with the value sums in the rotated domain. Torch then merges the splits with the
    full-precision tokens and rotates the value sums back (one small matmul per part).
    The mask over the coded tokens must be the same for every query row (padding only; coded
    tokens always precede the queries); it is taken from the last query row.
    For many query rows (prefill chunks) use :func:`quantized_attention` (row blocks, SDPA on the
    full-precision tokens): this function scores them against every full-precision token at once.
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")
    b, hq, L, d = query.shape
    h = kv.keys[0].norms.shape[1]
    n = kv.length
    sp = _coded_splits(query, kv, mask, scaling, block_n=block_n, block_m=None, num_splits=num_splits,
                       num_warps=num_warps)
    qg, g, nrows, dev = sp.qg, sp.qg.shape[2], sp.nrows, query.device
    om, ol, oa = sp.m, sp.l, sp.acc
    # merge the splits with the full-precision tokens
    m_all = om.amax(dim=1)  # (BH, rows)
    fp_scores = None
    if k_fp.shape[2]:
        fp_scores = torch.einsum("bhgld,bhmd->bhglm", qg, k_fp.to(torch.float32)) * scaling
        if mask is not None or L > 1:
            full = _grouped_mask(mask, b, h, g, L, n + k_fp.shape[2], dev)[..., n:]
            fp_scores = fp_scores + full
        fp_scores = fp_scores.reshape(b * h, nrows, -1)
        m_all = torch.maximum(m_all, fp_scores.amax(-1))
    m_safe = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    w = torch.exp(om - m_safe.unsqueeze(1))  # (BH, S, rows)
    denom = (w * ol).sum(1)
    out = torch.zeros(b, h, g, L, d, device=dev)
    for i, part in enumerate(kv.values):
        acc = (w.unsqueeze(-1) * oa[i]).sum(1)[..., : part.dim]  # (BH, rows, d_p)
        acc = acc @ part.rotation.to(dev, torch.float32)
        out = _scatter_add(out, acc.view(b, h, g, L, part.dim), part.channels)
    if fp_scores is not None:
        p = torch.exp(fp_scores - m_safe.unsqueeze(-1))
        denom = denom + p.sum(-1)
        out = out + torch.einsum("bhglm,bhmd->bhgld", p.view(b, h, g, L, -1), v_fp.to(torch.float32))
    out = out / denom.view(b, h, g, L, 1).clamp_min(1e-30)
    return out.view(b, hq, L, d).to(query.dtype)

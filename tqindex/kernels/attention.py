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

import math
import os
from dataclasses import dataclass

import torch

from tqindex.packing import unpack_bits

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = [
    "CodePart",
    "QuantizedKV",
    "quantized_attention",
    "quantized_attention_reference",
    "quantized_attention_triton",
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
    """Whether decode attention on ``device`` runs the Triton kernel (CUDA, or the interpreter if forced)."""
    if not HAS_TRITON or os.environ.get("TQINDEX_DISABLE_TRITON") == "1":
        return False
    return device.type == "cuda" or (
        os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TQINDEX_FORCE_TRITON") == "1"
    )


def quantized_attention(
    query: torch.Tensor,
    kv: QuantizedKV | None,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Same contract as :func:`quantized_attention_reference`; the Triton kernel for decode on CUDA."""
    if kv is not None and kv.length > 0 and use_triton_attention(query.device) and _kernel_ok(query, kv, mask):
        return quantized_attention_triton(query, kv, k_fp, v_fp, mask, scaling)
    return quantized_attention_reference(query, kv, k_fp, v_fp, mask, scaling)


def _kernel_ok(query: torch.Tensor, kv: QuantizedKV, mask: torch.Tensor | None) -> bool:
    """The kernel handles decode-like calls: few query rows, <= 2 parts per stream, a head-shared mask."""
    b, hq, L, d = query.shape
    g = hq // kv.keys[0].norms.shape[1]
    return (
        HAS_TRITON
        and g * L <= 64
        and len(kv.keys) <= 2
        and len(kv.values) <= 2
        and (mask is None or mask.shape[1] == 1)
    )


def quantized_attention_triton(*args, **kwargs) -> torch.Tensor:  # replaced below when Triton is present
    raise RuntimeError("Triton is not installed: pip install triton (or tqindex[triton])")

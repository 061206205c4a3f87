"""Attention of any number of query rows (prefill chunks, decode) over coded history + full-precision tokens in O(rows) memory.

The reference (:func:`tqindex.kernels.attention.quantized_attention_reference`) builds a
(rows x history) score matrix; at 32k tokens that is what ran the H200 out of memory. Here:

* the full-precision tokens (the window plus the tokens of this call, present before encoding)
  go through SDPA, which also gives each row's log-sum-exp (:func:`fp_attention_lse`);
* the coded history is read in blocks of ``block`` tokens under an online softmax, scores in the
  rotated domain and value sums in the rotated domain, rotated back once per part at the end
  (:func:`coded_attention_lse`): memory is O(rows x block), never O(rows x history);
* the two partial results are merged by their log-sum-exps (:func:`merge_lse`).

Shapes follow :mod:`tqindex.kernels.attention`: query (B, Hq, L, d), kv heads H, G = Hq / H, query
head ``h * G + g`` reads kv head ``h``; masks (B, 1 or Hq, L, N + M), bool (True = attend) or additive float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tqindex.kernels.attention import (
    HAS_TRITON,
    QuantizedKV,
    _dequant_rotated,
    _grouped_mask,
    _grouped_query,
    _kernel_parts_ok,
    _rotated_queries,
    _scatter_add,
    coded_attention_lse_triton,
    use_triton_attention,
)
from tqindex.packing import unpack_bits

__all__ = ["coded_attention_lse", "fp_attention_lse", "merge_lse", "quantized_attention_online", "block_tokens"]

_SCORE_BUDGET = 1 << 21  # float32 score elements per block (8 MiB): rows x block stays below this (but block >= 64)
_MIN_BLOCK, _MAX_BLOCK = 64, 4096


def block_tokens(rows: int) -> int:
    """Coded tokens per block for ``rows`` = B * Hq * L query rows: rows * block <= 2**21, in [64, 4096]."""
    return int(max(_MIN_BLOCK, min(_MAX_BLOCK, _SCORE_BUDGET // max(rows, 1))))


def _rows_visible(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1|Hq, L, M) bool/additive mask -> (B, 1|Hq, L) bool: the row attends to at least one column."""
    if mask.dtype == torch.bool:
        return mask.any(-1)
    return (mask > float("-inf")).any(-1)


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
              scale: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA (top-left causal if ``causal``) returning (out (B, Hq, L, d) float32, lse (B, Hq, L) float32).

    ``fused``: torch's CPU flash kernel, which returns the log-sum-exp itself (it reads GQA heads
    without repeating them). Otherwise: public SDPA for the output and the log-sum-exp from blocks
    of q . k (O(rows x block) memory). Rows with nothing to attend get lse = -inf, out = 0.
    """
    b, hq, L, d = q.shape
    h = k.shape[1]
    if mask is not None and mask.dtype == torch.bool:
        add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    else:
        add = None if mask is None else mask.to(q.dtype)
    if fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=add,
                                                                              scale=scale)
        out, lse = out.to(torch.float32), lse.to(torch.float32)
    else:
        kk, vv, gqa = k, v, hq != h
        if gqa and add is not None and q.is_cuda:  # masked GQA would fall back to the (L x M) math kernel
            kk, vv, gqa = k.repeat_interleave(hq // h, dim=1), v.repeat_interleave(hq // h, dim=1), False
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=add, is_causal=causal, scale=scale,
                                             enable_gqa=gqa).to(torch.float32)
        qg = _grouped_query(q, h)  # (B, H, G, L, d)
        m_tok = k.shape[2]
        step = block_tokens(b * hq * L)
        lse = torch.full((b, h, hq // h, L), float("-inf"), device=q.device)
        for s in range(0, m_tok, step):
            e = min(m_tok, s + step)
            sc = torch.einsum("bhgld,bhmd->bhglm", qg, k[:, :, s:e].to(torch.float32)) * scale
            if causal:
                allowed = torch.arange(s, e, device=q.device).view(1, -1) <= torch.arange(L, device=q.device).view(-1, 1)
                sc = sc.masked_fill(~allowed, float("-inf"))
            if add is not None:
                blk = add[..., s:e].to(torch.float32)
                sc = sc + (blk.unsqueeze(2) if blk.shape[1] == 1 else blk.view(b, h, hq // h, L, e - s))
            lse = torch.logaddexp(lse, torch.logsumexp(sc, dim=-1))
        lse = lse.view(b, hq, L)
    if mask is not None:
        seen = _rows_visible(mask).expand(b, hq, L)
    elif causal:
        seen = torch.ones(b, hq, L, dtype=torch.bool, device=q.device)
    else:
        seen = torch.full((b, hq, L), k.shape[2] > 0, dtype=torch.bool, device=q.device)
    lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
    out = torch.where(seen.unsqueeze(-1), out.nan_to_num(0.0), torch.zeros_like(out))
    return out, lse


def fp_attention_lse(query: torch.Tensor, k_fp: torch.Tensor, v_fp: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, *, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the L newest rows over the M full-precision tokens, with each row's log-sum-exp.

    Args:
        query: (B, Hq, L, d); the rows are the last L of the M tokens.
        k_fp, v_fp: (B, H, M, d), M >= L.
        mask: (B, 1|Hq, L, M) over these tokens, or None for causal (bottom-right aligned).
        scaling: score scale.
        fused: use torch's CPU flash kernel's log-sum-exp (default: on CPU).
    Returns:
        out (B, Hq, L, d) float32 normalised over these tokens; lse (B, Hq, L) float32 (-inf: nothing visible).
    """
    b, hq, L, d = query.shape
    m_tok = k_fp.shape[2]
    if fused is None:
        fused = query.device.type == "cpu"
    if mask is not None or L == 1 or m_tok == L:
        return _sdpa_lse(query, k_fp, v_fp, mask, mask is None and L > 1, scaling, fused)
    if m_tok < L:
        raise ValueError(f"{L} query rows but only {m_tok} full-precision tokens; the rows must be the newest tokens")
    # mask None, M > L: the first M - L tokens are seen by every row, the last L causally (SDPA's
    # top-left is_causal is then right); two SDPA calls, merged by log-sum-exp
    w = m_tok - L
    old = _sdpa_lse(query, k_fp[:, :, :w], v_fp[:, :, :w], None, False, scaling, fused)
    new = _sdpa_lse(query, k_fp[:, :, w:], v_fp[:, :, w:], None, True, scaling, fused)
    return merge_lse([old, new])


def coded_attention_lse(query: torch.Tensor, kv: QuantizedKV, mask: torch.Tensor | None, scaling: float,
                        *, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows over the N coded tokens, block by block under an online softmax.

    Args:
        query: (B, Hq, L, d).
        kv: N coded tokens (positions 0..N-1, all before the query rows).
        mask: (B, 1|Hq, L, N) over the coded tokens, or None (every coded token visible).
        scaling: score scale.
        block: coded tokens decoded per step (default :func:`block_tokens`); memory is
            O(B * Hq * L * block) floats plus one (B, H, block, d) decoded tile.
    Returns:
        out (B, Hq, L, d) float32 normalised over the coded tokens; lse (B, Hq, L) float32 (-inf: none visible).
    """
    b, hq, L, d = query.shape
    h = kv.keys[0].norms.shape[1]
    qg = _grouped_query(query, h)
    g = qg.shape[2]
    n = kv.length
    step = block or block_tokens(b * hq * L)
    dev = query.device
    rq = [_rotated_queries(qg, p) for p in kv.keys]
    mu = torch.einsum("bhgld,bhd->bhgl", qg, kv.key_mean.to(torch.float32)) if kv.key_mean is not None else None
    m_i = torch.full((b, h, g, L), float("-inf"), device=dev)
    l_i = torch.zeros(b, h, g, L, device=dev)
    acc = [torch.zeros(b, h, g, L, p.dim, device=dev) for p in kv.values]
    for s in range(0, n, step):
        e = min(n, s + step)
        sc = torch.zeros(b, h, g, L, e - s, device=dev)
        for part, (qr, qs) in zip(kv.keys, rq):
            sc += torch.einsum("bhgld,bhnd->bhgln", qr, _dequant_rotated(part, s, e))
            if part.qjl is not None:
                z = unpack_bits(part.qjl[:, :, s:e].reshape(b * h * (e - s), -1).contiguous(), 1, part.dim)
                z = z.to(torch.float32).view(b, h, e - s, part.dim) * 2 - 1
                w = (part.gammas[:, :, s:e].to(torch.float32) * part.norms[:, :, s:e].to(torch.float32)
                     * part.qjl_scale)
                sc += torch.einsum("bhgld,bhnd->bhgln", qs, z) * w[:, :, None, None, :]
        if mu is not None:
            sc += mu.unsqueeze(-1)
        sc *= scaling
        if mask is not None:
            sc += _grouped_mask(mask[..., s:e], b, h, g, L, e - s, dev)
        m_new = torch.maximum(m_i, sc.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_i - m_safe)
        p = torch.exp(sc - m_safe.unsqueeze(-1))
        l_i = l_i * alpha + p.sum(-1)
        for i, part in enumerate(kv.values):
            acc[i] = acc[i] * alpha.unsqueeze(-1) + torch.einsum("bhgln,bhnd->bhgld", p, _dequant_rotated(part, s, e))
        m_i = m_new
    out = torch.zeros(b, h, g, L, d, device=dev)
    for part, a in zip(kv.values, acc):
        out = _scatter_add(out, a @ part.rotation.to(dev, torch.float32), part.channels)
    seen = l_i > 0
    out = out / torch.where(seen, l_i, torch.ones_like(l_i)).unsqueeze(-1)
    lse = torch.where(seen, m_i + torch.log(torch.where(seen, l_i, torch.ones_like(l_i))),
                      torch.full_like(l_i, float("-inf")))
    return out.view(b, hq, L, d), lse.view(b, hq, L)


def merge_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine softmax attentions over disjoint token sets: [(out (..., d), lse (...))] -> (out, lse).

    Rows that see no token in any part get out = 0, lse = -inf.
    """
    lse = torch.stack([p[1] for p in parts])  # (P, ...)
    top = lse.amax(0)
    top_safe = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(lse - top_safe)  # (P, ...)
    total = w.sum(0)
    out = sum(wi.unsqueeze(-1) * p[0] for wi, p in zip(w, parts))
    seen = total > 0
    out = out / torch.where(seen, total, torch.ones_like(total)).unsqueeze(-1)
    return out, torch.where(seen, top_safe + torch.log(torch.where(seen, total, torch.ones_like(total))),
                            torch.full_like(total, float("-inf")))


def quantized_attention_online(query: torch.Tensor, kv: QuantizedKV | None, k_fp: torch.Tensor, v_fp: torch.Tensor,
                               mask: torch.Tensor | None, scaling: float, *, block: int | None = None,
                               fused: bool | None = None) -> torch.Tensor:
    """Same contract as :func:`tqindex.kernels.attention.quantized_attention_reference`, in O(rows) memory.

    With nothing coded (a first prefill) this is one SDPA call. Otherwise SDPA over the
    full-precision tokens and, over the codes: for prefill chunks on CUDA with one MSE part per stream
    and no padding, :func:`tqindex.kernels.decode_attention.coded_attention_lse_flash` (fp16 history
    blocks through flash attention); else the blocked online softmax (on CUDA, or forced in
    Triton's interpreter, :func:`tqindex.kernels.attention.coded_attention_lse_triton`; the mask over
    the codes is then read from one row: padding), merged by log-sum-exp.
    Returns (B, Hq, L, d) in ``query``'s dtype.
    """
    n = kv.length if kv is not None else 0
    b, hq, L, d = query.shape
    if mask is not None and (mask.dim() != 4 or mask.shape[-1] != n + k_fp.shape[2] or mask.shape[-2] != L):
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected (batch, 1 or heads, {L}, "
                         f"{n + k_fp.shape[2]})")
    mask_fp = None if mask is None else mask[..., n:]
    if n == 0 and (mask is not None or L == 1 or k_fp.shape[2] == L):  # a first prefill: one plain SDPA call
        add = mask if mask is None or mask.dtype == torch.bool else mask.to(query.dtype)
        k, v, gqa = k_fp, v_fp, hq != k_fp.shape[1]
        if gqa and mask is not None and query.device.type == "cuda":  # masked GQA would fall back to the math kernel
            k = k_fp.repeat_interleave(hq // k_fp.shape[1], dim=1)
            v = v_fp.repeat_interleave(hq // v_fp.shape[1], dim=1)
            gqa = False
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=add, is_causal=mask is None and L > 1,
                                             scale=scaling, enable_gqa=gqa)
        return out.nan_to_num(0.0)
    if n == 0:
        return fp_attention_lse(query, k_fp, v_fp, mask_fp, scaling, fused=fused)[0].to(query.dtype)
    mask_c = None if mask is None else mask[..., :n]
    from tqindex.kernels.decode_attention import coded_attention_lse_flash, flash_history_ok

    if L > 1 and flash_history_ok(query, kv, mask_c):  # prefill chunks: fp16 history blocks through flash attention
        parts = [coded_attention_lse_flash(query, kv, scaling)]
    elif HAS_TRITON and use_triton_attention(query.device) and _kernel_parts_ok(kv) and (mask is None or mask.shape[1] == 1):
        parts = [coded_attention_lse_triton(query, kv, mask_c, scaling)]
    else:
        parts = [coded_attention_lse(query, kv, mask_c, scaling, block=block)]
    if k_fp.shape[2]:
        parts.append(fp_attention_lse(query, k_fp, v_fp, mask_fp, scaling, fused=fused))
    return merge_lse(parts)[0].to(query.dtype)

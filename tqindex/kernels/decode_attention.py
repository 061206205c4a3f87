"""Decode attention (one new token per sequence) straight from TurboQuant-MSE codes: two Triton launches per layer.

Shapes as in :mod:`tqindex.kernels.attention`: query (B, Hq, 1, d), kv heads H, G = Hq / H query
heads per kv head, coded tokens (B, H, N, ...) in (B, H, cap, ...) buffers, full-precision tokens
k_fp / v_fp (B, H, M, d).

The codes of a row are a bit stream; a group of ``PH = 8 / gcd(8, bits)`` coordinates fills
``GB = bits * PH / 8`` whole bytes. "Phase" t of a row is its coordinates ``g * PH + t`` over the
groups g: the t-th value of every group word, ``(word >> t * bits) & mask``. A tile of BN tokens is
read once as (BN, d / PH) group words and turned into PH (BN, d / PH) tiles of centroid values in
fp16, one per phase, with no interleaving; the split kernel rotates the query into the same
phase-major order (PH dots with column blocks of a row-permuted rotation, :func:`_phase_rotation`),
so scores are PH tensor-core dots and value sums are kept per phase.

1. ``_split_kernel``, grid (B * H, S): each program runs an online softmax over its slice of the
   coded tokens for the G query heads of one kv head (each code tile loaded once for all G),
   writing its running max, sum and phase-major value sums (split-K, "flash decoding").
2. ``_reduce_kernel``, grid (B * H,): merges the S splits, attends over the full-precision tokens
   (the window and the current token), rotates the value sums back once (one (G, d) x (d, d) dot)
   and writes the output in the (B, 1, Hq, d) layout transformers reads.

Centroid lookups of 4- and 3-bit codes on CUDA are done in registers: an inline-PTX block turns 4 code
bytes (4-bit: 8 coordinates, both phases) or one 3-byte group word (3-bit: its 8 phases) into fp16 values
with byte permutes (``prmt``) over the codebook held in 8 / 4 registers (:func:`_lut4_words`), instead of
one cached global load per coordinate (half the split kernel's time at 128k x 8 on an H200 for 4-bit:
docs/kvcache.md). Triton's interpreter has no inline assembly, so there (and for other bit widths) the
lookup is a gather from the fp16 codebook; tests/test_lut_asm.py emulates the assembly instead.

Both take only tensors of fixed shape for a given (B, N rounded to the split size): no host
synchronisation, CUDA-graph capturable. Operands of the dots are fp16 (as SDPA's on an fp16 model),
accumulation fp32; the rotation back is fp32 to about fp32 accuracy (tf32x3).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch

from tqindex.kernels.attention import (HAS_TRITON, QuantizedKV, _buffer_cap, _cdiv, _pow2, _rows_layout, _sm_count,
                                      _split_tokens, use_triton_attention)
from tqindex.kernels.launch import _raw_stream, follows_device, int_spec, launch, resident_programs
from tqindex.kernels.tensor_cache import per_tensor

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tqindex.kernels.attention import _softmax_step

__all__ = ["DecodePlan", "coded_attention_lse_flash", "decode_attention_triton", "decode_call_ok", "decode_ok",
           "decode_parts_ok", "decode_plan", "decode_run", "flash_history_ok", "wave_splits"]

_MAX_GROUP = 64  # query heads per kv head handled by one program
_BITS = (1, 2, 3, 4, 6, 8)  # group words of <= 3 bytes (int32); 5 and 7 bits (5- and 7-byte words) take the split kernel


def _phases(bits: int) -> tuple[int, int]:
    """(PH coordinates per group word, GB bytes per group word) of a ``bits``-bit stream."""
    ph = 8 // math.gcd(8, bits)
    return ph, bits * ph // 8


def decode_parts_ok(kv: QuantizedKV | None, n_query_heads: int) -> bool:
    """The part of :func:`decode_ok` that does not depend on the call: one MSE part per stream (no outlier split,
    no QJL), bits 1, 2, 3, 4, 6 or 8 with a power of two >= 16 coordinates per phase, a whole number <= 64 of
    query heads per kv head, and a device the kernels run on."""
    if not HAS_TRITON or kv is None or kv.length == 0 or len(kv.keys) != 1 or len(kv.values) != 1:
        return False
    kp, vp = kv.keys[0], kv.values[0]
    if kp.qjl is not None or kp.channels is not None or vp.channels is not None:
        return False
    if not use_triton_attention(kp.norms.device):
        return False
    d = kv.head_dim
    h = kp.norms.shape[1]
    if n_query_heads % h or n_query_heads // h > _MAX_GROUP or kp.dim != d or vp.dim != d:
        return False
    for p in (kp, vp):
        if p.mse_bits not in _BITS or d % _phases(p.mse_bits)[0]:
            return False
        per = d // _phases(p.mse_bits)[0]  # coordinates per phase: a tl.dot side, a power of two >= 16
        if per < 16 or per & (per - 1):
            return False
    return True


def decode_call_ok(query: torch.Tensor, n_query_heads: int, mask: torch.Tensor | None) -> bool:
    """The per-call part of :func:`decode_ok`: one query row per sequence, the heads planned for, a head-shared mask."""
    return (query.dim() == 4 and query.shape[2] == 1 and query.shape[1] == n_query_heads
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)))


def decode_ok(query: torch.Tensor, kv: QuantizedKV | None, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention_triton` takes this call: :func:`decode_call_ok` and :func:`decode_parts_ok`."""
    return query.dim() == 4 and decode_call_ok(query, query.shape[1], mask) and decode_parts_ok(kv, query.shape[1])


@per_tensor
def _phase_rotation(rotation: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_perm^T fp16 (d, d) for q @ it = phase-major rotated queries, R_perm fp32 (d, d) to rotate sums back).

    Cached per rotation tensor (its storage and version), so a decode step builds neither."""
    d = rotation.shape[0]
    ph, _ = _phases(bits)
    kp = d // ph
    perm = torch.arange(d, device=rotation.device).view(kp, ph).T.reshape(-1)  # phase-major: t * kp + g <- g * ph + t
    r = rotation.to(torch.float32)[perm]  # (d, d): rows in phase-major order
    return r.T.contiguous().to(torch.float16), r.contiguous()


@per_tensor
def _centroids16(c: torch.Tensor) -> torch.Tensor:
    """The codebook in fp16, contiguous (cached per tensor)."""
    return c.to(torch.float16).contiguous()


def _lut4_words(c16: torch.Tensor) -> list[int]:
    """A 16-entry (4-bit) or 8-entry (3-bit) fp16 codebook as the 8 int32 words :func:`_lut4` / :func:`_lut3`
    permute: the low bytes of the entries, 4 per word (byte j of word i = entry 4i + j), then their high bytes;
    an 8-entry codebook fills words 0-1 (low) and 2-3 (high), the rest zero."""
    raw = [v & 0xFFFF for v in c16.detach().to("cpu", torch.float16).view(torch.int16).tolist()]
    if len(raw) not in (8, 16):
        raise ValueError(f"a 3- or 4-bit codebook has 8 or 16 centroids, got {len(raw)}")
    out = []
    for shift in (0, 8):
        for i in range(len(raw) // 4):
            w = sum(((raw[4 * i + j] >> shift) & 0xFF) << (8 * j) for j in range(4))
            out.append(w - (1 << 32) if w >= 1 << 31 else w)  # as a signed int32 kernel argument
    return out + [0] * (8 - len(out))


@per_tensor
def _lut4_table(c16: torch.Tensor, magnitudes: bool = False) -> torch.Tensor:
    """(8,) int32 on the codebook's device: :func:`_lut4_words` of a 3- or 4-bit fp16 codebook, or with
    ``magnitudes`` of the upper half c[8:] of a symmetric 4-bit one (cached on the codebook itself: a view made
    per call would be a new key, and a copy to the device every plan)."""
    words = _lut4_words(c16[c16.shape[0] // 2:] if magnitudes else c16)
    return torch.tensor(words, dtype=torch.int32, device=c16.device)


@per_tensor
def _symmetric(c16: torch.Tensor) -> bool:
    """Whether an fp16 codebook (sorted) is exactly symmetric, c[k - 1 - j] == -c[j] (cached per tensor)."""
    c = c16.detach().to("cpu")
    return bool(torch.equal(c, -c.flip(0)))


def _lut_mode(bits: int, c16: torch.Tensor, *, symmetric: bool) -> int:
    """The split kernel's LUT constexpr for a stream on compiled CUDA: 2 for 4-bit codes over a symmetric codebook
    (an 8-entry magnitude table: half the asm's table operands), 1 for other 4- and 3-bit codebooks, else 0."""
    if bits == 4 and symmetric and _symmetric(c16):
        return 2
    return 1 if bits in (3, 4) else 0


def _lut_table(c16: torch.Tensor, mode: int, dev: torch.device) -> torch.Tensor:
    """The (8,) int32 table words of a stream's LUT mode (:func:`_lut4_words`; mode 2: of the magnitudes c[8:])."""
    if mode == 2:
        return _lut4_table(c16, True)
    return _lut4_table(c16) if mode else _no_table(str(dev))


@functools.lru_cache(maxsize=16)
def _no_table(device: str) -> torch.Tensor:
    """8 int32 zeros: the table argument of a stream that gathers from its codebook instead."""
    return torch.zeros(8, dtype=torch.int32, device=device)


def _use_lut(device: torch.device) -> bool:
    """Register lookups by inline PTX: compiled CUDA only (Triton's interpreter runs no assembly)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


if HAS_TRITON:

    @triton.jit
    def _group_words(P, rows, nmask, rg, gmask, nbytes, GB: tl.constexpr):
        """(BN, BG) int32 group words (GB <= 3 little-endian bytes each) of token rows ``rows`` (int64), groups ``rg``."""
        m2 = nmask[:, None] & gmask[None, :]
        ptr = P + rows[:, None] * nbytes + (rg * GB)[None, :]
        w = tl.load(ptr, mask=m2, other=0).to(tl.int32)
        for j in tl.static_range(1, GB):
            w = w | (tl.load(ptr + j, mask=m2, other=0).to(tl.int32) << (8 * j))
        return w

    @triton.jit
    def _phase(W, CB, t: tl.constexpr, BITS: tl.constexpr):
        """(BN, BG) fp16 centroid values of phase t of group words W."""
        idx = ((W >> (t * BITS)) & ((1 << BITS) - 1)).to(tl.int32)
        return tl.load(CB + idx)

    # One lookup step of 4 coordinates: selector nibbles = index & 7, byte permutes of the low-byte and high-byte
    # tables of entries 0-7 and 8-15, then per byte the 8-15 one where index bit 3 is set, then the two bytes of
    # each fp16 interleaved. $4 holds 4 code bytes (low nibble phase 0, high nibble phase 1); tables at $5 + 4i.
    _LUT4_STEP = """
    and.b32 t, {src}, 0x07070707;
    shr.b32 s, t, 4;
    or.b32 s, s, t;
    prmt.b32 s, s, 0, 0x3320;
    prmt.b32 la, $5, $9, s;
    prmt.b32 lb, $13, $17, s;
    prmt.b32 ha, $21, $25, s;
    prmt.b32 hb, $29, $33, s;
    {mask}
    lop3.b32 la, la, lb, m, 0xD8;
    lop3.b32 ha, ha, hb, m, 0xD8;
    prmt.b32 {o0}, la, ha, 0x5140;
    prmt.b32 {o1}, la, ha, 0x7362;
    """
    _LUT4_ASM = tl.constexpr(
        "{\n.reg .b32 t, s, m, la, lb, ha, hb, w1;\n"
        + _LUT4_STEP.format(src="$4", o0="$0", o1="$1", mask="shl.b32 m, $4, 4;\nprmt.b32 m, m, 0, 0xBA98;")
        + "shr.b32 w1, $4, 4;\n"
        + _LUT4_STEP.format(src="w1", o0="$2", o1="$3", mask="prmt.b32 m, $4, 0, 0xBA98;")
        + "}")

    # 4-bit codes over a symmetric codebook (c[15 - j] = -c[j], as TurboQuant's Lloyd-Max codebooks are): the
    # lookup of code j reads magnitude m = j & 7 if bit 3 is set, else 7 - (j & 7), from an 8-entry table of
    # c[8..15] (2 words of low bytes, $5 and $9; 2 of high bytes, $13 and $17: half the table operands of the
    # full table, which ptxas copies into registers for every use), and sets the sign bit where bit 3 is clear
    # (m: 0xFF in the bytes whose code has bit 3 set, by a sign-replicating byte permute).
    _LUT4S_STEP = """
    and.b32 t, {src}, 0x0F0F0F0F;
    shl.b32 m, t, 4;
    prmt.b32 m, m, 0, 0xBA98;
    lop3.b32 t, t, m, 0x07070707, 0x82;
    shr.b32 s, t, 4;
    or.b32 s, s, t;
    prmt.b32 s, s, 0, 0x3320;
    prmt.b32 la, $5, $9, s;
    prmt.b32 ha, $13, $17, s;
    lop3.b32 ha, ha, m, 0x80808080, 0xF2;
    prmt.b32 {o0}, la, ha, 0x5140;
    prmt.b32 {o1}, la, ha, 0x7362;
    """
    _LUT4S_ASM = tl.constexpr(
        "{\n.reg .b32 t, m, s, la, ha, w1;\n"
        + _LUT4S_STEP.format(src="$4", o0="$0", o1="$1")
        + "shr.b32 w1, $4, 4;\n"
        + _LUT4S_STEP.format(src="w1", o0="$2", o1="$3")
        + "}")

    # 3-bit: a group word (3 bytes, 8 codes of 3 bits) -> 8 fp16 values, one per phase. The 3-bit fields are
    # spread into selector nibbles (4 per selector), then one byte permute per selector and byte plane over the
    # 8-entry tables ($9, $10 low bytes; $11, $12 high bytes) and two interleaves per 4 values.
    _LUT3_SEL = """
    and.b32 {s}, {w}, 7;
    shl.b32 t, {w}, 1;
    and.b32 t, t, 0x70;
    or.b32 {s}, {s}, t;
    shl.b32 t, {w}, 2;
    and.b32 t, t, 0x700;
    or.b32 {s}, {s}, t;
    shl.b32 t, {w}, 3;
    and.b32 t, t, 0x7000;
    or.b32 {s}, {s}, t;
    """
    _LUT3_ASM = tl.constexpr(
        "{\n.reg .b32 t, u, sa, sb, la, ha, lb, hb, r0, r1, r2, r3;\n"
        + _LUT3_SEL.format(s="sa", w="$8")
        + "shr.b32 u, $8, 12;\n"
        + _LUT3_SEL.format(s="sb", w="u")
        + """
    prmt.b32 la, $9, $10, sa;
    prmt.b32 ha, $11, $12, sa;
    prmt.b32 lb, $9, $10, sb;
    prmt.b32 hb, $11, $12, sb;
    prmt.b32 r0, la, ha, 0x5140;
    prmt.b32 r1, la, ha, 0x7362;
    prmt.b32 r2, lb, hb, 0x5140;
    prmt.b32 r3, lb, hb, 0x7362;
    mov.b32 {$0, $1}, r0;
    mov.b32 {$2, $3}, r1;
    mov.b32 {$4, $5}, r2;
    mov.b32 {$6, $7}, r3;
    }""")

    @triton.jit
    def _lut3(w, t0, t1, t2, t3):
        """(BN, BG) int32 group words of 3-bit codes -> the 8 phases' fp16 centroid values, in registers."""
        return tl.inline_asm_elementwise(
            asm=_LUT3_ASM, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", args=[w, t0, t1, t2, t3],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _lut4(w8, t0, t1, t2, t3, t4, t5, t6, t7):
        """(BN, BG) uint8 code bytes of 4-bit codes -> (phase 0, phase 1) fp16 centroid values, in registers."""
        return tl.inline_asm_elementwise(
            asm=_LUT4_ASM, constraints="=r,=r,=r,=r,r" + ",r" * 32, args=[w8, t0, t1, t2, t3, t4, t5, t6, t7],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=4)

    @triton.jit
    def _lut4s(w8, t0, t1, t2, t3):
        """(BN, BG) uint8 code bytes of 4-bit codes over a symmetric codebook -> (phase 0, phase 1) fp16 values."""
        return tl.inline_asm_elementwise(
            asm=_LUT4S_ASM, constraints="=r,=r,=r,=r,r" + ",r" * 16, args=[w8, t0, t1, t2, t3],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=4)

    @triton.jit
    def _code_tile(P, rows, nmask, rg, nbytes, CB, t0, t1, t2, t3, t4, t5, t6, t7, BITS: tl.constexpr,
                   GB: tl.constexpr, PH: tl.constexpr, LUT: tl.constexpr):
        """The PH phase tiles (fp16 (BN, BG); the unused ones of PH < 8 repeat phase 0) of a tile of codes.
        ``LUT``: 4- and 3-bit codes looked up in registers (tables t0..t7 of :func:`_lut4_words`), other widths
        gathered from the fp16 codebook CB."""
        gmask = rg < rg.shape[0]  # every group of the row (the caller's BG is d / PH exactly)
        if LUT and BITS == 4:
            m2 = nmask[:, None] & gmask[None, :]
            w8 = tl.load(P + rows[:, None] * nbytes + rg[None, :], mask=m2, other=0)
            if LUT == 2:
                p0, p1 = _lut4s(w8, t0, t1, t2, t3)
            else:
                p0, p1 = _lut4(w8, t0, t1, t2, t3, t4, t5, t6, t7)
            return p0, p1, p0, p0, p0, p0, p0, p0
        w = _group_words(P, rows, nmask, rg, gmask, nbytes, GB)
        if LUT and BITS == 3:
            return _lut3(w, t0, t1, t2, t3)
        p0 = _phase(w, CB, 0, BITS)
        p1 = p0
        p2 = p0
        p3 = p0
        p4 = p0
        p5 = p0
        p6 = p0
        p7 = p0
        if PH > 1:
            p1 = _phase(w, CB, 1, BITS)
        if PH > 2:
            p2 = _phase(w, CB, 2, BITS)
            p3 = _phase(w, CB, 3, BITS)
        if PH > 4:
            p4 = _phase(w, CB, 4, BITS)
            p5 = _phase(w, CB, 5, BITS)
            p6 = _phase(w, CB, 6, BITS)
            p7 = _phase(w, CB, 7, BITS)
        return p0, p1, p2, p3, p4, p5, p6, p7

    @triton.jit
    def _lut_regs(T):
        """The 8 int32 table words at T (a LUT stream's :func:`_lut4_table`, else any 8 int32s), loaded once."""
        return (tl.load(T), tl.load(T + 1), tl.load(T + 2), tl.load(T + 3), tl.load(T + 4), tl.load(T + 5),
                tl.load(T + 6), tl.load(T + 7))

    @triton.jit
    def _q_phase(q, RQ, rd, rg, d, t: tl.constexpr, KG):
        """(BM, BG) fp16 phase-major rotated queries of phase t (columns t * KG + g): q (BM, d) fp16 @ those
        columns of RQ (d, d) fp16, fp32 accumulation rounded to fp16 (as torch's fp16 matmul)."""
        r = tl.load(RQ + rd[:, None] * d + (t * KG + rg)[None, :])
        return tl.dot(q, r).to(tl.float16)

    @triton.jit
    def _split_kernel(
        Q, RQ, QMU, KBIAS, KM, KN, KC, KT, VM, VN, VC, VT, OM, OL, OA,
        n_tok, cap, n_heads, nrows, tok_per_split, scale, d, k_nb, v_nb, kg, oa_cols, q_sb, q_sh,
        KBITS: tl.constexpr, VBITS: tl.constexpr, KPH: tl.constexpr, VPH: tl.constexpr,
        KGB: tl.constexpr, VGB: tl.constexpr, BKG: tl.constexpr, BVG: tl.constexpr,
        KLUT: tl.constexpr, VLUT: tl.constexpr,
        HAS_MU: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        nsplit = tl.num_programs(1)
        rm = tl.arange(0, BM)
        rmask = rm < nrows
        rk = tl.arange(0, BKG)  # BKG = d / KPH and BVG = d / VPH exactly (decode_ok): no mask over groups
        rv = tl.arange(0, BVG)
        kt0, kt1, kt2, kt3, kt4, kt5, kt6, kt7 = _lut_regs(KT)
        vt0, vt1, vt2, vt3, vt4, vt5, vt6, vt7 = _lut_regs(VT)
        # the G query rows of this kv head (query head h * G + m), rotated here: no separate matmul launch
        rdq = tl.arange(0, BD)  # BD = d: a power of two (decode_parts_ok)
        qrow = (bh // n_heads).to(tl.int64) * q_sb + ((bh % n_heads) * nrows + rm).to(tl.int64) * q_sh
        q = tl.load(Q + qrow[:, None] + rdq[None, :], mask=rmask[:, None], other=0.0).to(tl.float16)
        q0 = _q_phase(q, RQ, rdq, rk, d, 0, kg)
        q1 = q0
        q2 = q0
        q3 = q0
        q4 = q0
        q5 = q0
        q6 = q0
        q7 = q0
        if KPH > 1:
            q1 = _q_phase(q, RQ, rdq, rk, d, 1, kg)
        if KPH > 2:
            q2 = _q_phase(q, RQ, rdq, rk, d, 2, kg)
            q3 = _q_phase(q, RQ, rdq, rk, d, 3, kg)
        if KPH > 4:
            q4 = _q_phase(q, RQ, rdq, rk, d, 4, kg)
            q5 = _q_phase(q, RQ, rdq, rk, d, 5, kg)
            q6 = _q_phase(q, RQ, rdq, rk, d, 6, kg)
            q7 = _q_phase(q, RQ, rdq, rk, d, 7, kg)
        mu = tl.zeros((BM,), dtype=tl.float32)
        if HAS_MU:
            mu = tl.load(QMU + bh * nrows + rm, mask=rmask, other=0.0)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        a0 = tl.zeros((BM, BVG), dtype=tl.float32)
        a1 = a0
        a2 = a0
        a3 = a0
        a4 = a0
        a5 = a0
        a6 = a0
        a7 = a0
        start = sp * tok_per_split
        b = bh // n_heads
        for it in range(0, tok_per_split, BN):
            rn = start + it + tl.arange(0, BN)
            nmask = rn < n_tok
            rows = bh.to(tl.int64) * cap + rn
            k0, k1, k2, k3, k4, k5, k6, k7 = _code_tile(KM, rows, nmask, rk, k_nb, KC, kt0, kt1, kt2, kt3, kt4,
                                                        kt5, kt6, kt7, KBITS, KGB, KPH, KLUT)
            s = tl.dot(q0, tl.trans(k0))
            if KPH > 1:
                s += tl.dot(q1, tl.trans(k1))
            if KPH > 2:
                s += tl.dot(q2, tl.trans(k2))
                s += tl.dot(q3, tl.trans(k3))
            if KPH > 4:
                s += tl.dot(q4, tl.trans(k4))
                s += tl.dot(q5, tl.trans(k5))
                s += tl.dot(q6, tl.trans(k6))
                s += tl.dot(q7, tl.trans(k7))
            kn = tl.load(KN + rows, mask=nmask, other=0.0).to(tl.float32)
            s = (s * kn[None, :] + mu[:, None]) * scale
            if HAS_BIAS:
                s += tl.load(KBIAS + b.to(tl.int64) * n_tok + rn, mask=nmask, other=0.0)[None, :]
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
            vn = tl.load(VN + rows, mask=nmask, other=0.0).to(tl.float32)
            pv = (p * vn[None, :]).to(tl.float16)
            v0, v1, v2, v3, v4, v5, v6, v7 = _code_tile(VM, rows, nmask, rv, v_nb, VC, vt0, vt1, vt2, vt3, vt4,
                                                        vt5, vt6, vt7, VBITS, VGB, VPH, VLUT)
            a0 = a0 * alpha[:, None] + tl.dot(pv, v0)
            if VPH > 1:
                a1 = a1 * alpha[:, None] + tl.dot(pv, v1)
            if VPH > 2:
                a2 = a2 * alpha[:, None] + tl.dot(pv, v2)
                a3 = a3 * alpha[:, None] + tl.dot(pv, v3)
            if VPH > 4:
                a4 = a4 * alpha[:, None] + tl.dot(pv, v4)
                a5 = a5 * alpha[:, None] + tl.dot(pv, v5)
                a6 = a6 * alpha[:, None] + tl.dot(pv, v6)
                a7 = a7 * alpha[:, None] + tl.dot(pv, v7)
            m_i = m_new
        # the nrows real rows only (BM pads G to a dot side): the reduce kernel reads G / BM of the padded size
        o = (bh * nsplit + sp).to(tl.int64)
        tl.store(OM + o * nrows + rm, m_i, mask=rmask)
        tl.store(OL + o * nrows + rm, l_i, mask=rmask)
        base = OA + (o * nrows + rm)[:, None] * oa_cols + rv[None, :]
        amask = rmask[:, None]
        tl.store(base, a0, mask=amask)
        if VPH > 1:
            tl.store(base + BVG, a1, mask=amask)
        if VPH > 2:
            tl.store(base + 2 * BVG, a2, mask=amask)
            tl.store(base + 3 * BVG, a3, mask=amask)
        if VPH > 4:
            tl.store(base + 4 * BVG, a4, mask=amask)
            tl.store(base + 5 * BVG, a5, mask=amask)
            tl.store(base + 6 * BVG, a6, mask=amask)
            tl.store(base + 7 * BVG, a7, mask=amask)

    # the split count and the full-precision window's length are loop bounds here (and the window moves every
    # decode step): not specialised, so a new split count or a window length divisible by 16 compiles nothing
    @triton.jit(do_not_specialize=["nsplit", "m_tok"])
    def _reduce_kernel(
        OM, OL, OA, RB, QF, KF, VF, FBIAS, O,
        nsplit, nrows, n_heads, m_tok, d, scale,
        q_sb, q_sh, kf_sb, kf_sh, kf_sn, vf_sb, vf_sh, vf_sn,
        HAS_FBIAS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, FL: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // n_heads
        h = bh % n_heads
        rm = tl.arange(0, BM)
        rmask = rm < nrows
        rd = tl.arange(0, BD)
        dmask = rd < d
        # 1. the coded tokens: merge the splits (their max first, then the rescaled sums), FL flat (split, row)
        #    entries of the nrows real rows per load; the sum over splits of a row is one dot with a (BM, FL)
        #    weight matrix that is nonzero where the flat entry's row is the output row (tensor cores, not a
        #    cross-warp reduction)
        rc = tl.arange(0, FL)
        base = (bh * nsplit).to(tl.int64) * nrows
        flat = nsplit * nrows
        m_c = tl.full((BM,), float("-inf"), dtype=tl.float32)
        for f0 in range(0, flat, FL):
            cmask = f0 + rc < flat
            same = ((f0 + rc) % nrows)[None, :] == rm[:, None]  # (BM, FL)
            om = tl.load(OM + base + f0 + rc, mask=cmask, other=float("-inf"))
            m_c = tl.maximum(m_c, tl.max(tl.where(same, om[None, :], float("-inf")), axis=1))
        m_i = m_c
        m_safe = tl.where(m_c == float("-inf"), 0.0, m_c)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc_c = tl.zeros((BM, BD), dtype=tl.float32)
        for f0 in range(0, flat, FL):
            cmask = f0 + rc < flat
            same = ((f0 + rc) % nrows)[None, :] == rm[:, None]
            om = tl.load(OM + base + f0 + rc, mask=cmask, other=float("-inf"))
            w = tl.where(same, tl.exp(om[None, :] - m_safe[:, None]), 0.0)  # (BM, FL)
            l_i += tl.sum(w * tl.load(OL + base + f0 + rc, mask=cmask, other=0.0)[None, :], axis=1)
            oa = tl.load(OA + (base + f0 + rc)[:, None] * d + rd[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0)  # (FL, BD)
            acc_c += tl.dot(w, oa, input_precision="tf32x3")
        # 2. the full-precision tokens, online on top of that state
        acc_f = tl.zeros((BM, BD), dtype=tl.float32)
        qrow = b.to(tl.int64) * q_sb + (h * nrows + rm).to(tl.int64) * q_sh
        qf = tl.load(QF + qrow[:, None] + rd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float16)
        kb = KF + b.to(tl.int64) * kf_sb + h.to(tl.int64) * kf_sh
        vb = VF + b.to(tl.int64) * vf_sb + h.to(tl.int64) * vf_sh
        for w0 in range(0, m_tok, BW):
            rw = w0 + tl.arange(0, BW)
            wmask = rw < m_tok
            m2 = wmask[:, None] & dmask[None, :]
            kf = tl.load(kb + rw[:, None].to(tl.int64) * kf_sn + rd[None, :], mask=m2, other=0.0).to(tl.float16)
            sc = tl.dot(qf, tl.trans(kf)) * scale
            if HAS_FBIAS:
                sc += tl.load(FBIAS + b.to(tl.int64) * m_tok + rw, mask=wmask, other=0.0)[None, :]
            sc = tl.where(wmask[None, :], sc, float("-inf"))
            m_new, alpha, p, l_i = _softmax_step(sc, m_i, l_i)
            vf = tl.load(vb + rw[:, None].to(tl.int64) * vf_sn + rd[None, :], mask=m2, other=0.0).to(tl.float16)
            acc_f = acc_f * alpha[:, None] + tl.dot(p.to(tl.float16), vf)
            acc_c = acc_c * alpha[:, None]
            m_i = m_new
        # 3. rotate the coded sums back once (phase-major rows of R), normalise, store (B, Hq, d)
        rb = tl.load(RB + rd[:, None] * d + rd[None, :], mask=dmask[:, None] & dmask[None, :], other=0.0)
        # tf32x3: about fp32's accuracy on the tensor cores (an "ieee" dot spilled registers: 0.1-0.2 ms a call)
        out = tl.dot(acc_c, rb, input_precision="tf32x3") + acc_f
        den = tl.where(l_i > 0, l_i, 1.0)
        out = out / den[:, None]
        orow = (b * n_heads * nrows + h * nrows + rm).to(tl.int64) * d
        tl.store(O + orow[:, None] + rd[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _additive(mask_row: torch.Tensor) -> torch.Tensor:
    """(B, n) bool (True = attend) or additive mask -> (B, n) float32 additive, contiguous."""
    if mask_row.dtype == torch.bool:
        return torch.zeros(mask_row.shape, device=mask_row.device).masked_fill_(~mask_row, float("-inf"))
    return mask_row.to(torch.float32).contiguous()


@dataclass
class DecodePlan:
    """What decode calls over one layer's coded tokens share from step to step (built by :func:`decode_plan`).

    Holds the (B, H, cap, ...) code buffers (a view whose storage the kernels index by row; a call reads
    its first ``n`` rows), the phase-major rotations, fp16 codebooks and register tables, and the launch
    settings. Valid while the buffers are not reallocated (the cache rebuilds it when they grow).
    """

    km: torch.Tensor  # (B, H, cap, key bytes) uint8
    kn: torch.Tensor  # (B, H, cap) norms
    vm: torch.Tensor
    vn: torch.Tensor
    cap: int
    h: int
    g: int
    kbits: int
    vbits: int
    rq16: torch.Tensor  # (d, d) fp16: q @ rq16 = phase-major rotated query
    rb: torch.Tensor  # (d, d) fp32: rotation back of the value sums
    kc: torch.Tensor  # codebooks, fp16
    vc: torch.Tensor
    ktab: torch.Tensor  # (8,) int32 register tables (zeros for a gather stream)
    vtab: torch.Tensor
    klut: int  # 0: gather from the codebook; 1: register lookup (full table); 2: 4-bit over a symmetric codebook
    vlut: int
    key_mean: torch.Tensor | None  # (B, H, d) float32
    num_warps: int  # of the split kernel
    block_n: int  # coded tokens per tile of the split kernel
    sms: int
    kernels: dict | None = field(default_factory=dict)  # compiled launches (tqindex.kernels.launch); None: keep none
    resident: int | None = None  # split-kernel programs one multiprocessor holds (:func:`_resident`), once known
    memo: dict = field(default_factory=dict)  # decode_run's per-plan constants and its last step's splits and key


def decode_plan(kv: QuantizedKV, n_query_heads: int, *, lut: bool | None = None, num_warps: int | None = None,
                block_n: int | None = None, symmetric: bool = True) -> DecodePlan:
    """The :class:`DecodePlan` of coded tokens ``kv`` (accepted by :func:`decode_parts_ok`) for queries of
    ``n_query_heads`` heads. ``lut``, ``num_warps`` and ``block_n`` as in :func:`decode_attention_triton`.
    ``symmetric``: 4-bit register lookups over a symmetric codebook read an 8-entry magnitude table
    (:data:`_LUT4S_ASM`; 7.5% fewer instructions in the sm_90 loop of the default tile, 4.6% more with
    64 tokens x 2 warps); the default: 2.5-3% faster at 128 tokens x 4 warps on the H200 at 32k x 8, 128k x 1/8
    (bench/results/kv_split_sweep_h200_sym.md); ``False`` keeps the full 16-entry table (lut 1)."""
    kp, vp = kv.keys[0], kv.values[0]
    h = kp.norms.shape[1]
    n, d = kv.length, kv.head_dim
    dev = kp.norms.device
    cap = _buffer_cap(kp.norms, n)
    rq16, _ = _phase_rotation(kp.rotation, kp.mse_bits)
    _, rb = _phase_rotation(vp.rotation, vp.mse_bits)
    kc, vc = _centroids16(kp.centroids.to(dev)), _centroids16(vp.centroids.to(dev))
    lut = _use_lut(dev) if lut is None else lut
    klut, vlut = (_lut_mode(p.mse_bits, c, symmetric=symmetric) if lut else 0 for p, c in ((kp, kc), (vp, vc)))
    # tile and warps of the split kernel, from the H200 sweeps (bench/results/kv_split_sweep_h200*.md, best split
    # count of each): 4-bit register lookups 128 tokens x 4 warps (128k x 8: 1.07 ms; 64 x 2: 1.02; 64 x 4: 1.16;
    # 32k x 8: 0.296 vs 0.299 / 0.321), 3-bit 64 x 2 (128k x 8: 1.86 ms vs 2.65 at 128 x 4; every 3-bit build holds
    # 255 registers), the gathers and d = 256 (4 warps spill there in the sm_90 build; not measured on a GPU) 128 x 8
    three = 3 in (kp.mse_bits, vp.mse_bits)
    if block_n is None:
        block_n = 64 if klut and vlut and three and d <= 128 else 128
    if num_warps is None:
        num_warps = (2 if three else 4) if klut and vlut and d <= 128 else 8
    sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 4
    return DecodePlan(
        km=_rows_layout(kp.mse, cap), kn=_rows_layout(kp.norms, cap), vm=_rows_layout(vp.mse, cap),
        vn=_rows_layout(vp.norms, cap), cap=cap, h=h, g=n_query_heads // h, kbits=kp.mse_bits,
        vbits=vp.mse_bits, rq16=rq16, rb=rb, kc=kc, vc=vc,
        ktab=_lut_table(kc, klut, dev), vtab=_lut_table(vc, vlut, dev),
        klut=klut, vlut=vlut, key_mean=kv.key_mean, num_warps=num_warps, block_n=block_n, sms=sms)


def wave_splits(bh: int, n: int, block_n: int, slots: int, *, min_tokens: int | None = None) -> int:
    """Splits of ``n`` coded tokens per (b, h) for ``bh`` pairs on a GPU running ``slots`` programs at once.

    Programs of one launch take about the same time, so a launch lasts (waves) x (tokens per program):
    the candidates fill 1, 2, 3 or 4 whole waves (``w * slots // bh`` splits), each split at least
    ``min_tokens`` (default 4 tiles); the one with the least waves x tokens wins, the fewest splits on a
    tie (less for the reduce kernel). Rounding the splits up instead (the earlier rule, about ``slots``
    programs) left a second, mostly idle wave: 576 programs where 396 fit at 128k x 8 on an H200."""
    min_tokens = 4 * block_n if min_tokens is None else min_tokens
    most = max(1, _cdiv(n, min_tokens))
    best, best_cost = 1, None
    for w in range(1, 5):
        s = min(most, max(1, w * slots // bh))
        tok, s = _split_tokens(n, s, block_n)
        cost = _cdiv(bh * s, slots) * tok
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


_RESIDENT: dict[tuple, int] = {}


def _resident(args: tuple, splits: int, consts: dict, dev: torch.device) -> int:
    """Split-kernel programs per multiprocessor for these arguments and splits (compiled, not launched;
    remembered per device and constants, so a plan built for one call does not compile-check again); 4 where
    nothing is compiled (Triton's interpreter, CPU)."""
    if dev.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 4
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    key = (index, *consts.items())
    got = _RESIDENT.get(key)
    if got is not None:
        return got
    try:
        k = _split_kernel.warmup(*args, grid=(1, splits), **consts)
        if hasattr(k, "result"):
            k = k.result()
        k._init_handles()
        got = resident_programs(k, consts["num_warps"], index)
    except (AttributeError, TypeError):  # pragma: no cover - a Triton without warmup / these attributes
        got = 4
    _RESIDENT[key] = got
    return got


_SCRATCH: dict[tuple, tuple[torch.Tensor, dict]] = {}


def _partials(dev: torch.device, rows: int, splits: int, g: int, d: int) -> tuple[torch.Tensor, ...]:
    """(max, sum, value sums) scratch of the split kernel for the ``g`` query rows (heads of a group, unpadded)
    of each of ``rows`` (b, h) pairs: (rows, splits, g), (rows, splits, g), (rows, splits, g, d)
    float32, shared by every call on this device and stream with these sizes (calls on one stream run in order,
    and the reduce kernel consumes them before the next call's split kernel writes them; two threads decoding
    on one stream at once would need a stream each)."""
    stream = _raw_stream(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 0
    key = (str(dev), stream, rows, g, d)
    flat, views = _SCRATCH.get(key, (None, None))
    per = rows * g * (d + 2)
    if flat is None or flat.numel() < per * splits:
        if len(_SCRATCH) >= 16:  # many shapes seen (benchmarks): let the old ones go
            _SCRATCH.clear()
        flat, views = torch.empty(per * splits, device=dev), {}
        _SCRATCH[key] = (flat, views)
    v = views.get(splits)
    if v is None:
        n1 = rows * splits * g
        v = views[splits] = (flat[:n1].view(rows, splits, g), flat[n1:2 * n1].view(rows, splits, g),
                             flat[2 * n1:n1 * (d + 2)].view(rows, splits, g, d))
    return v


def decode_run(plan: DecodePlan, query: torch.Tensor, n: int, k_fp: torch.Tensor, v_fp: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, *, num_splits: int | None = None,
               programs_per_sm: int | None = None) -> torch.Tensor:
    """:func:`decode_attention_triton` over the first ``n`` >= 1 coded tokens of ``plan``: (B, Hq, 1, d)."""
    block_n = plan.block_n
    b, hq, _, d = query.shape
    h, g = plan.h, plan.g
    dev = query.device
    qmu = None
    if plan.key_mean is not None:
        qmu = torch.einsum("bhgd,bhd->bhg", query.reshape(b, h, g, d).to(torch.float32),
                           plan.key_mean.to(torch.float32)).reshape(b * h, g).contiguous()
    kbias = fbias = None
    m_fp = k_fp.shape[2]
    if mask is not None:
        if mask.shape[-1] != n + m_fp:
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected (batch, 1, 1, {n + m_fp})")
        row = _additive(mask[:, 0, -1, :])
        kbias, fbias = row[:, :n].contiguous(), row[:, n:].contiguous()
    km, vm = plan.km, plan.vm
    qs = query.stride()
    if qs[3] != 1:
        query = query.contiguous()
        qs = query.stride()
    ck = (qmu is not None, kbias is not None)
    consts = plan.memo.get(ck)  # the split kernel's constexprs and options: fixed by the plan and these two
    if consts is None:
        bm = _pow2(g)  # >= 16: a tl.dot side
        kph, kgb = _phases(plan.kbits)
        vph, vgb = _phases(plan.vbits)
        consts = plan.memo[ck] = dict(
            KBITS=plan.kbits, VBITS=plan.vbits, KPH=kph, VPH=vph, KGB=kgb, VGB=vgb, BKG=d // kph, BVG=d // vph,
            KLUT=plan.klut, VLUT=plan.vlut, HAS_MU=ck[0], HAS_BIAS=ck[1], BM=bm, BN=block_n, BD=d,
            num_warps=plan.num_warps)
    bm = consts["BM"]

    def split_args(tok: int, splits: int) -> tuple[tuple, tuple]:
        om, ol, oa = _partials(dev, b * h, splits, g, d)
        return (query, plan.rq16, qmu if qmu is not None else om, kbias if kbias is not None else om,
                km, plan.kn, plan.kc, plan.ktab, vm, plan.vn, plan.vc, plan.vtab, om, ol, oa,
                n, plan.cap, h, g, tok, float(scaling), d, km.shape[-1], vm.shape[-1], consts["BKG"], d, qs[0],
                qs[1]), (om, ol, oa)

    # the splits depend on n only through its tile count (wave_splits and _split_tokens round to tiles), so a step
    # with the previous step's tile count, query layout and constants reuses its splits and launch key
    auto = num_splits is None and programs_per_sm is None
    sk = (b * h, _cdiv(n, block_n), ck, query.dtype, qs[0], qs[1])
    step = plan.memo.get("step") if auto else None
    if step is not None and step[0] == sk:
        tok, num_splits, kpre = step[1]
    else:
        if auto:
            if plan.resident is None:
                plan.resident = _resident(split_args(*_split_tokens(n, 1, block_n))[0], 1, consts, dev)
            programs_per_sm = plan.resident
        if num_splits is None:
            num_splits = wave_splits(b * h, n, block_n, programs_per_sm * plan.sms)
        tok, num_splits = _split_tokens(n, num_splits, block_n)
        kpre = (0, ck, query.dtype, bm, block_n, int_spec(tok), int_spec(qs[0]), int_spec(qs[1]))
        if auto:
            plan.memo["step"] = (sk, (tok, num_splits, kpre))
    # what the compiled kernels depend on beyond the plan's constants (tqindex.kernels.launch)
    key = kpre + (int_spec(n),)
    args, (om, ol, oa) = split_args(tok, num_splits)
    launch(_split_kernel, (b * h, num_splits), *args, cache=plan.kernels, key=key, **consts)
    out = torch.empty(b, hq, d, device=dev, dtype=query.dtype)
    kf = k_fp if k_fp.stride(-1) == 1 else k_fp.contiguous()
    vf = v_fp if v_fp.stride(-1) == 1 else v_fp.contiguous()
    ks, vs = kf.stride(), vf.stride()
    key = (1, fbias is not None, query.dtype, kf.dtype, vf.dtype, bm) + tuple(
        map(int_spec, (qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2])))  # nsplit, m_tok: not specialised
    launch(_reduce_kernel, (b * h,),
           om, ol, oa, plan.rb, query, kf, vf, fbias if fbias is not None else om, out,
           num_splits, g, h, m_fp, d, float(scaling), qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
           cache=plan.kernels, key=key,
           HAS_FBIAS=fbias is not None, BM=bm, BD=d, BW=64, FL=max(64, bm), num_warps=8)  # d: a power of two
    return out.view(b, hq, 1, d)


@follows_device
def decode_attention_triton(query: torch.Tensor, kv: QuantizedKV, k_fp: torch.Tensor, v_fp: torch.Tensor,
                            mask: torch.Tensor | None, scaling: float, *, block_n: int | None = None,
                            num_splits: int | None = None, programs_per_sm: int | None = None,
                            num_warps: int | None = None, lut: bool | None = None) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V of one query token per sequence over [coded | full-precision] tokens.

    Same contract as :func:`tqindex.kernels.attention.quantized_attention_reference` for the calls
    :func:`decode_ok` accepts (L = 1). Two kernel launches (the query rotated inside the first):
    :func:`decode_plan` then :func:`decode_run` (a cache keeps the plan from step to step).

    Args:
        query: (B, Hq, 1, d) float16 (other float dtypes are cast to fp16 for the dots).
        kv: N >= 1 coded tokens, one MSE part per stream.
        k_fp, v_fp: (B, H, M, d) the full-precision tokens after them (M may be 0).
        mask: (B, 1, 1, N + M) bool (True = attend) or additive float, or None (all visible).
        scaling: score scale.
        block_n: coded tokens per tile (16-128; default 128, 64 for 3-bit register lookups: bench/results/
            kv_split_sweep_h200*.md); num_splits: splits of the coded tokens per (b, h) (default:
            :func:`wave_splits` for ``programs_per_sm`` programs per multiprocessor, by default as many as the
            compiled kernel's registers and shared memory let one hold; splits of >= 4 * block_n tokens).
        lut: 4- and 3-bit lookups in registers by inline PTX (default: on compiled CUDA; False = the gather).
        num_warps: of the split kernel (default with register lookups for both streams and d <= 128: 4, or 2 when
            a stream has 3 bits; else 8).
    Returns:
        (B, Hq, 1, d) in ``query``'s dtype (memory laid out as (B, 1, Hq, d): transposing it is free).
    """
    plan = decode_plan(kv, query.shape[1], lut=lut, num_warps=num_warps, block_n=block_n)
    plan.kernels = None  # a plan for one call: Triton's own launch (nothing worth keeping)
    return decode_run(plan, query, kv.length, k_fp, v_fp, mask, scaling, num_splits=num_splits,
                      programs_per_sm=programs_per_sm)


# ---------------------------------------------------------------------------------------------
# prefill chunks: the coded history block by block, dequantized to fp16 and read by flash attention
# ---------------------------------------------------------------------------------------------
_FLASH_BLOCK_BYTES = 1 << 27  # fp16 keys (or values) of one history block: 128 MiB


if HAS_TRITON:

    @triton.jit
    def _dequant_kernel(MSE, NRM, CB, OUT, s0, n_end, cap, blk, d, nbytes, kg,
                        BITS: tl.constexpr, PH: tl.constexpr, GB: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr):
        """Tokens [s0, n_end) of each (b, h) -> OUT (BH, blk, d) fp16 norms * centroids, phase-major columns."""
        bh = tl.program_id(0)
        rn = s0 + tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = rn < n_end
        rg = tl.arange(0, BG)
        gmask = rg < kg
        rows = bh.to(tl.int64) * cap + rn
        w = _group_words(MSE, rows, nmask, rg, gmask, nbytes, GB)
        nrm = tl.load(NRM + rows, mask=nmask, other=0.0).to(tl.float32)
        orow = (bh.to(tl.int64) * blk + (rn - s0))[:, None] * d
        m2 = nmask[:, None] & gmask[None, :]
        for t in tl.static_range(PH):
            v = (_phase(w, CB, t, BITS).to(tl.float32) * nrm[:, None]).to(tl.float16)
            tl.store(OUT + orow + t * kg + rg[None, :], v, mask=m2)


def flash_history_ok(query: torch.Tensor, kv: QuantizedKV | None, mask_c: torch.Tensor | None) -> bool:
    """Whether :func:`coded_attention_lse_flash` takes a prefill chunk: CUDA, fp16/bf16 queries, one MSE part
    per stream with the decode kernel's bit widths, and every coded token visible to every row (no padding;
    checked on the device: one host synchronisation per layer and chunk)."""
    if kv is None or kv.length == 0 or not use_triton_attention(query.device):
        return False
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not HAS_TRITON or len(kv.keys) != 1 or len(kv.values) != 1 or kv.key_mean is not None:
        return False
    kp, vp = kv.keys[0], kv.values[0]
    if kp.qjl is not None or kp.channels is not None or vp.channels is not None or kv.head_dim > 256:
        return False
    if any(p.mse_bits not in _BITS or kv.head_dim % _phases(p.mse_bits)[0] for p in (kp, vp)):
        return False
    return mask_c is None or bool(mask_c.all() if mask_c.dtype == torch.bool else (mask_c == 0).all())


def _dequant_block(part, s0: int, e: int, blk: int, cap: int, out: torch.Tensor) -> torch.Tensor:
    """Tokens [s0, e) of a part -> out[:, :e - s0] (BH, blk, d) fp16, phase-major rotated-domain values."""
    bh = part.norms.shape[0] * part.norms.shape[1]
    d = part.dim
    ph, gb = _phases(part.mse_bits)
    mse, nrm = _rows_layout(part.mse, cap), _rows_layout(part.norms, cap)
    bn = 64
    _dequant_kernel[(bh, _cdiv(e - s0, bn))](
        mse, nrm, _centroids16(part.centroids.to(out.device)), out, s0, e, cap, blk, d, mse.shape[-1], d // ph,
        BITS=part.mse_bits, PH=ph, GB=gb, BN=bn, BG=_pow2(d // ph), num_warps=4,
    )
    return out


@follows_device
def coded_attention_lse_flash(query: torch.Tensor, kv: QuantizedKV, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a prefill chunk's rows over every coded token, through flash attention on fp16 blocks.

    The G query heads of a kv head are folded into the row axis (no mask over the history, so rows are
    independent), queries rotated into the keys' phase-major rotated domain; each block of history
    (at most 128 MiB of fp16 keys and as much of values) is dequantized by one Triton launch per stream,
    read by ``aten._scaled_dot_product_flash_attention`` (which returns each row's log-sum-exp), and the
    blocks merged by log-sum-exp; value sums rotated back once. Memory: two blocks + O(rows * d).

    Args: query (B, Hq, L, d) fp16/bf16; kv accepted by :func:`flash_history_ok`; scaling the score scale.
    Returns: out (B, Hq, L, d) float32 normalised over the coded tokens, lse (B, Hq, L) float32.
    """
    from tqindex.kernels.online_attention import merge_lse

    b, hq, L, d = query.shape
    kp, vp = kv.keys[0], kv.values[0]
    h = kp.norms.shape[1]
    g = hq // h
    n = kv.length
    cap = _buffer_cap(kp.norms, n)
    rq16, _ = _phase_rotation(kp.rotation, kp.mse_bits)
    _, rb = _phase_rotation(vp.rotation, vp.mse_bits)
    q = torch.matmul(query.reshape(b, h, g * L, d).to(torch.float16), rq16)  # (B, H, G*L, d) fp16
    blk = max(256, min(n, _FLASH_BLOCK_BYTES // (b * h * d * 2)))
    kbuf = torch.empty(b * h, blk, d, device=query.device, dtype=torch.float16)
    vbuf = torch.empty_like(kbuf)
    parts = []
    for s0 in range(0, n, blk):
        e = min(n, s0 + blk)
        k = _dequant_block(kp, s0, e, blk, cap, kbuf)[:, : e - s0].view(b, h, e - s0, d)
        v = _dequant_block(vp, s0, e, blk, cap, vbuf)[:, : e - s0].view(b, h, e - s0, d)
        # values in the values' phase-major order, keys in the keys': scores need only q and k in the same order
        if q.is_cuda:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=float(scaling))
        else:  # Triton's interpreter (tests): torch's CPU flash kernel, which also returns the log-sum-exp
            res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.float(), k.float(), v.float(), 0.0,
                                                                             False, scale=float(scaling))
        parts.append((res[0].to(torch.float32), res[1].to(torch.float32)))
    out, lse = merge_lse(parts) if len(parts) > 1 else parts[0]
    out = out @ rb  # (B, H, G*L, d): back from the values' phase-major rotated domain
    return out.view(b, hq, L, d), lse.reshape(b, hq, L)

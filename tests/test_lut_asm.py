"""The decode kernel's register lookups (inline PTX) emulated instruction by instruction on the CPU.

Triton's interpreter runs no assembly and the sm_90 compile test only checks that ptxas accepts it;
this runs the exact asm strings of :mod:`tqindex.kernels.decode_attention` through a small model of
the PTX instructions they use (``prmt`` default mode, ``lop3``, shifts, logic, ``sub``, ``mov`` pack/unpack)
and checks every output half against the codebook entry of its index.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from tqindex.codec import TurboQuantMSE  # noqa: E402
from tqindex.kernels import decode_attention as da  # noqa: E402

_M = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte (c's nibble i & 7) of {b, a}, or that byte's
    sign replicated when the nibble's bit 3 is set."""
    src, out = (b << 32) | a, 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> (((a >> k) & 1) * 4 + ((b >> k) & 1) * 2 + ((c >> k) & 1))) & 1) << k for k in range(32))


def _run(asm: str, regs: dict[str, int], n_out: int) -> list[int]:
    regs = dict(regs)

    def val(x: str) -> int:
        x = x.strip()
        return regs[x] if x in regs else int(x, 0)

    for stmt in asm.split(";"):
        stmt = stmt.strip().strip("{}").strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        if op == "mov.b32" and args.lstrip().startswith("{"):  # unpack a b32 into two b16
            dst, src = args.split("}")
            lo, hi = (x.strip() for x in dst.strip("{ ").split(","))
            v = val(src.strip(" ,"))
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        x = [t.strip() for t in args.split(",")]
        ops = {"mov.b32": lambda: val(x[1]), "and.b32": lambda: val(x[1]) & val(x[2]),
               "or.b32": lambda: val(x[1]) | val(x[2]), "shr.b32": lambda: val(x[1]) >> val(x[2]),
               "shl.b32": lambda: (val(x[1]) << val(x[2])) & _M, "sub.u32": lambda: (val(x[1]) - val(x[2])) & _M,
               "prmt.b32": lambda: _prmt(val(x[1]), val(x[2]), val(x[3])),
               "lop3.b32": lambda: _lop3(val(x[1]), val(x[2]), val(x[3]), val(x[4]))}
        assert op in ops, f"instruction {op} not modelled"
        regs[x[0]] = ops[op]()
    return [regs[f"${i}"] for i in range(n_out)]


def _codebook(bits: int) -> tuple[list[int], list[int]]:
    c16 = TurboQuantMSE(128, bits, seed=0).centroids.half()
    raw = [v & 0xFFFF for v in c16.view(torch.int16).tolist()]
    return raw, [w & _M for w in da._lut4_words(c16)]


def test_lut4_asm_gives_both_phases_of_four_code_bytes() -> None:
    raw, words = _codebook(4)
    rng = random.Random(0)
    tables = {f"${5 + 4 * i + r}": words[i] for i in range(8) for r in range(4)}  # pack=4: 4 copies of each word
    for _ in range(400):
        bs = [rng.randrange(256) for _ in range(4)]
        o = _run(da._LUT4_ASM.value, {"$4": sum(b << (8 * i) for i, b in enumerate(bs)), **tables}, 4)
        assert [o[0] & 0xFFFF, o[0] >> 16, o[1] & 0xFFFF, o[1] >> 16] == [raw[b & 15] for b in bs]
        assert [o[2] & 0xFFFF, o[2] >> 16, o[3] & 0xFFFF, o[3] >> 16] == [raw[b >> 4] for b in bs]


def test_lut3_asm_gives_the_eight_phases_of_a_group_word() -> None:
    raw, words = _codebook(3)
    rng = random.Random(1)
    tables = {"$9": words[0], "$10": words[1], "$11": words[2], "$12": words[3]}
    for w in [0, (1 << 24) - 1] + [rng.randrange(1 << 24) for _ in range(400)]:
        assert _run(da._LUT3_ASM.value, {"$8": w, **tables}, 8) == [raw[(w >> (3 * j)) & 7] for j in range(8)]


def test_lut4_symmetric_asm_gives_both_phases_of_four_code_bytes() -> None:
    """The 4-bit lookup over a symmetric codebook: magnitudes c[8..15] in 4 table words, the sign from bit 3."""
    c16 = TurboQuantMSE(128, 4, seed=0).centroids.half()
    assert da._symmetric(c16)  # TurboQuant's Lloyd-Max codebooks are exactly symmetric, also in fp16
    raw = [v & 0xFFFF for v in c16.view(torch.int16).tolist()]
    words = [w & _M for w in da._lut4_words(c16[8:])]
    tables = {f"${5 + 4 * i + r}": words[i] for i in range(4) for r in range(4)}  # pack=4: 4 copies of each word
    rng = random.Random(3)
    for bs in [[0, 0x88, 0x77, 0xFF], [0x0F, 0xF0, 0x78, 0x87]] + [[rng.randrange(256) for _ in range(4)]
                                                                    for _ in range(400)]:
        o = _run(da._LUT4S_ASM.value, {"$4": sum(b << (8 * i) for i, b in enumerate(bs)), **tables}, 4)
        assert [o[0] & 0xFFFF, o[0] >> 16, o[1] & 0xFFFF, o[1] >> 16] == [raw[b & 15] for b in bs]
        assert [o[2] & 0xFFFF, o[2] >> 16, o[3] & 0xFFFF, o[3] >> 16] == [raw[b >> 4] for b in bs]


def test_lut_mode_picks_the_symmetric_table_only_for_a_symmetric_4_bit_codebook() -> None:
    c16 = TurboQuantMSE(128, 4, seed=0).centroids.half()
    assert da._lut_mode(4, c16, symmetric=True) == 2 and da._lut_mode(4, c16, symmetric=False) == 1
    skewed = c16.clone()
    skewed[0] -= 0.01
    assert not da._symmetric(skewed) and da._lut_mode(4, skewed, symmetric=True) == 1
    assert da._lut_mode(3, TurboQuantMSE(128, 3, seed=0).centroids.half(), symmetric=True) == 1
    assert da._lut_mode(2, c16[:4], symmetric=True) == 0


def test_lut_tables_are_built_once_per_codebook() -> None:
    """A plan's table is the cached tensor (no host-to-device copy per plan, none inside a CUDA graph capture)."""
    c16 = TurboQuantMSE(128, 4, seed=0).centroids.half()
    dev = c16.device
    for mode in (1, 2):
        first = da._lut_table(c16, mode, dev)
        assert da._lut_table(c16, mode, dev) is first
    assert da._lut_table(c16, 2, dev).tolist() == [int(w) for w in torch.tensor(da._lut4_words(c16[8:]),
                                                                                   dtype=torch.int32).tolist()]

"""The decode-attention Triton kernels compile for an H100/H200 (sm_90) on a machine with no GPU.

Triton's interpreter (the other CPU tests) runs no inline PTX and accepts programs the compiler rejects
(e.g. a function returning different types from its branches); ``triton.compile`` for a CUDA target
runs the whole pipeline down to ptxas, which checks the register-lookup assembly too.
"""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tqindex.kernels import decode_attention as da  # noqa: E402

_TARGET = GPUTarget("cuda", 90, 32)
_U8 = {"KM", "VM", "MSE", "MSE1"}  # uint8 code pointers; X and NRM are fp16
_I32 = {"KT", "VT"}
_DIV16 = {"cap", "tok_per_split", "d", "k_nb", "v_nb", "kg", "oa_cols", "blk", "nbytes"}


def _compile(fn, constexprs: dict, num_warps: int, fp32_ptrs: set[str] = frozenset()):
    """Compile ``fn`` for sm_90 with the argument types and 16-divisibility the launcher would give it."""
    params = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for p in params:
        if p in constexprs:
            sig[p] = "constexpr"
        elif p in _U8:
            sig[p] = "*u8"
        elif p in _I32:
            sig[p] = "*i32"
        elif p.isupper():
            sig[p] = "*fp32" if p in fp32_ptrs else "*fp16"
        else:
            sig[p] = "fp32" if p == "scale" else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p not in constexprs and (p.isupper() or p in _DIV16)}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=_TARGET,
                          options={"num_warps": num_warps})


def _mode(lut: bool | int, bits: int) -> int:
    """The kernel's LUT constexpr decode_plan gives a stream: 0 gather, 1 register table, 2 symmetric 4-bit."""
    if not lut or bits not in (3, 4):
        return 0
    return 2 if lut == 2 and bits == 4 else 1


@pytest.mark.parametrize("kbits,vbits,lut", [(4, 4, True), (4, 4, False), (4, 2, True), (3, 3, False),
                                             (3, 3, True), (3, 4, True), (8, 4, True), (6, 1, False), (4, 4, 2),
                                             (3, 4, 2)])
def test_split_kernel_compiles_for_sm90(kbits: int, vbits: int, lut: bool | int) -> None:
    """lut: False gather, True register lookups, 2 the same with 4-bit lookups over a symmetric codebook."""
    kph, kgb = da._phases(kbits)
    vph, vgb = da._phases(vbits)
    c = dict(KBITS=kbits, VBITS=vbits, KPH=kph, VPH=vph, KGB=kgb, VGB=vgb, BKG=128 // kph, BVG=128 // vph,
             KLUT=_mode(lut, kbits), VLUT=_mode(lut, vbits), HAS_MU=kbits == 3, HAS_BIAS=vbits == 2,
             BM=16, BN=64 if lut and 3 in (kbits, vbits) else 128, BD=128)
    # the tile and warps decode_plan picks: 3-bit register lookups 64 tokens x 2 warps, 4-bit 128 x 4, gathers 128 x 8
    warps = (2 if 3 in (kbits, vbits) else 4) if lut and kbits in (3, 4) and vbits in (3, 4) else 8
    k = _compile(da._split_kernel, c, num_warps=warps, fp32_ptrs={"QMU", "KBIAS", "OM", "OL", "OA"})
    ptx = k.asm["ptx"]
    # the register lookups are there exactly when asked for (their masks: 4-bit 0x07070707, symmetric 4-bit
    # 0x80808080, 3-bit 0x7000)
    assert ("0x07070707" in ptx) == (bool(lut) and 4 in (kbits, vbits))
    assert ("0x80808080" in ptx) == (lut == 2 and 4 in (kbits, vbits))
    assert ("0x7000;" in ptx) == (bool(lut) and 3 in (kbits, vbits))
    assert k.asm["cubin"]  # ptxas accepted it


@pytest.mark.parametrize("fbias", [False, True])
def test_reduce_and_dequant_kernels_compile_for_sm90(fbias: bool) -> None:
    _compile(da._reduce_kernel, dict(HAS_FBIAS=fbias, BM=16, BD=128, BW=64, FL=64), num_warps=8,
             fp32_ptrs={"OM", "OL", "OA", "RB", "FBIAS"})
    ph, gb = da._phases(3)
    _compile(da._dequant_kernel, dict(BITS=3, PH=ph, GB=gb, BN=64, BG=16), num_warps=4, fp32_ptrs={"NRM"})


def test_lut4_words_hold_the_codebook_bytes() -> None:
    import torch

    c16 = torch.linspace(-1, 1, 16).half()
    words = [w & 0xFFFFFFFF for w in da._lut4_words(c16)]
    raw = [v & 0xFFFF for v in c16.view(torch.int16).tolist()]
    for e in range(16):
        lo = (words[e // 4] >> (8 * (e % 4))) & 0xFF
        hi = (words[4 + e // 4] >> (8 * (e % 4))) & 0xFF
        assert lo | hi << 8 == raw[e]
    c8 = c16[4:12]
    words8 = [w & 0xFFFFFFFF for w in da._lut4_words(c8)]
    raw8 = [v & 0xFFFF for v in c8.view(torch.int16).tolist()]
    for e in range(8):
        assert (words8[e // 4] >> (8 * (e % 4))) & 0xFF | ((words8[2 + e // 4] >> (8 * (e % 4))) & 0xFF) << 8 == raw8[e]
    assert words8[4:] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="8 or 16 centroids"):
        da._lut4_words(c16[:4])


@pytest.mark.parametrize("bits,bits1", [(4, 4), (3, 3), (8, 8), (4, 2)])
def test_encode_append_kernel_compiles_for_sm90(bits: int, bits1: int) -> None:
    from tqindex.kernels import encode_append as ea

    c = dict(D=128, BN=16)
    for suffix, b in (("", bits), ("1", bits1)):
        ph, gb = ea._phases(b)
        nb = (1 << b) - 1
        c.update({f"BITS{suffix}": b, f"PH{suffix}": ph, f"GB{suffix}": gb, f"KP{suffix}": 128 // ph,
                  f"NB{suffix}": nb, f"LINEAR{suffix}": nb <= ea.LINEAR_MAX_BOUNDARIES})
    _compile(ea._encode_append_kernel, c, num_warps=4, fp32_ptrs={"RP", "BND", "RP1", "BND1"})


def test_reduce_kernel_does_not_specialise_on_its_loop_bounds() -> None:
    """The split count and the full-precision window's length change between decode steps (the window every
    step): specialised, a first window length divisible by 16 mid-generation compiled a new kernel (seconds)."""
    params = da._reduce_kernel.params
    assert {p.name for p in params if p.do_not_specialize} == {"nsplit", "m_tok"}

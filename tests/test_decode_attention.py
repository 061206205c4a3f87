"""The two-launch decode kernel (tqindex.kernels.decode_attention) equals the torch reference: interpreter and CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import run_interpreted_cases
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# fp16 operands in the kernel's dots (as SDPA on an fp16 model): errors are relative to the output's scale
SCRIPT = """
    from tqindex.kvcache import TurboQuantLayer
    from tqindex.kernels.attention import quantized_attention, quantized_attention_reference
    from tqindex.kernels.decode_attention import decode_attention_triton, decode_ok

    # key bits, value bits, B, H, G, d, coded N, fp M, padding mask, key centring
    shapes = [(4, 4, 2, 2, 4, 64, 150, 5, False, False), (3, 3, 1, 2, 2, 128, 90, 0, True, True),
              (2, 8, 1, 1, 5, 64, 70, 3, True, False), (4, 2, 2, 1, 1, 128, 33, 1, False, True),
              (1, 6, 1, 1, 3, 128, 20, 2, False, False)]
    for kb, vb, B, H, G, d, N, M, padded, center in shapes:
        layer = TurboQuantLayer(layer_idx=0, key_bits=kb, value_bits=vb, key_codec="mse", residual_length=max(M, 1),
                                outlier_channels=0, outlier_bits=None, key_centering=center, seed=1)
        K, V = torch.randn(B, H, N + max(M, 1), d) + 1, torch.randn(B, H, N + max(M, 1), d)
        layer.update(K[:, :, :N // 3], V[:, :, :N // 3])  # two updates: codes in a grown buffer (cap > N)
        layer.update(K[:, :, N // 3:], V[:, :, N // 3:])
        kv = layer.quantized()
        kf, vf = layer.keys[:, :, :M], layer.values[:, :, :M]
        q = torch.randn(B, H * G, 1, d) * 2
        mask = None
        if padded:
            mask = torch.ones(B, 1, 1, kv.length + M, dtype=torch.bool)
            mask[0, :, :, :5] = False
        if not decode_ok(q, kv, mask):
            failures.append(f"decode_ok refused K{kb} V{vb} d{d}")
            continue
        ref = quantized_attention_reference(q, kv, kf, vf, mask, d ** -0.5)
        runs = [decode_attention_triton(q, kv, kf, vf, mask, d ** -0.5, block_n=bn, num_splits=s) for s, bn in
                ((None, 16), (1, 16), (3, 32))]
        runs.append(quantized_attention(q, kv, kf, vf, mask, d ** -0.5))  # the dispatch picks this kernel
        for out in runs:
            cases += 1
            err = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
            if not err < 3e-3:
                failures.append(f"K{kb} V{vb} {(B, H, G, d, N, M)} padded {padded}: relative error {err:.3g}")
    # prefill chunks: the history through fp16 blocks + flash attention (CPU flash kernel here) vs torch blocks
    from tqindex.kernels.decode_attention import _FLASH_BLOCK_BYTES, coded_attention_lse_flash, flash_history_ok
    from tqindex.kernels.online_attention import coded_attention_lse
    import tqindex.kernels.decode_attention as da
    for kb, vb, B, H, G, L, d, N, block_bytes in [(4, 4, 2, 2, 2, 5, 64, 300, 1 << 27), (3, 2, 1, 2, 3, 7, 128, 700, 1 << 17)]:
        da._FLASH_BLOCK_BYTES = block_bytes  # the second case: several history blocks merged by log-sum-exp
        layer = TurboQuantLayer(layer_idx=0, key_bits=kb, value_bits=vb, key_codec="mse", residual_length=1,
                                outlier_channels=0, outlier_bits=None, key_centering=False, seed=2)
        layer.update(torch.randn(B, H, N // 2, d) + 1, torch.randn(B, H, N // 2, d))
        layer.update(torch.randn(B, H, N - N // 2 + 1, d) + 1, torch.randn(B, H, N - N // 2 + 1, d))
        kv = layer.quantized()
        q = torch.randn(B, H * G, L, d).half()
        full = torch.ones(B, 1, L, kv.length, dtype=torch.bool)
        assert flash_history_ok(q, kv, None) and flash_history_ok(q, kv, full)
        full[0, 0, 0, 3] = False
        assert not flash_history_ok(q, kv, full)  # padding: the masked kernels take it
        out, lse = coded_attention_lse_flash(q, kv, d ** -0.5)
        ref, ref_lse = coded_attention_lse(q.float(), kv, None, d ** -0.5)
        cases += 1
        err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        if not (err < 3e-3 and (lse - ref_lse).abs().max().item() < 1e-2):
            failures.append(f"flash history K{kb} V{vb}: relative error {err:.3g}, lse {(lse - ref_lse).abs().max().item():.3g}")
    da._FLASH_BLOCK_BYTES = _FLASH_BLOCK_BYTES

    # refused: outlier split, PROD keys, several query rows, a per-head mask
    layer = TurboQuantLayer(layer_idx=0, key_bits=3, value_bits=3, key_codec="prod", residual_length=1,
                            outlier_channels=0, outlier_bits=None, key_centering=False, seed=1)
    layer.update(torch.randn(1, 1, 40, 64), torch.randn(1, 1, 40, 64))
    assert not decode_ok(torch.randn(1, 2, 1, 64), layer.quantized(), None)
    layer = TurboQuantLayer(layer_idx=0, key_bits=4, value_bits=4, key_codec="mse", residual_length=1,
                            outlier_channels=0, outlier_bits=None, key_centering=False, seed=1)
    layer.update(torch.randn(1, 1, 40, 64), torch.randn(1, 1, 40, 64))
    kv = layer.quantized()
    assert decode_ok(torch.randn(1, 2, 1, 64), kv, None)
    assert not decode_ok(torch.randn(1, 2, 2, 64), kv, None)
    assert not decode_ok(torch.randn(1, 2, 1, 64), kv, torch.ones(1, 2, 1, 40, dtype=torch.bool))

    # end to end: a tiny Llama (4-bit, no outliers: this kernel) decoding, Triton forced vs the torch path
    from transformers import LlamaConfig, LlamaForCausalLM
    from tqindex.kvcache import TurboQuantCache, cache_kwarg, enable
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=96, vocab_size=61, head_dim=64)
    model = enable(LlamaForCausalLM(cfg).eval())
    ids = torch.randint(0, 61, (2, 24))
    outs = {}
    for force in ("1", "0"):
        os.environ["TQINDEX_FORCE_TRITON"] = force
        cache = TurboQuantCache(config=cfg, key_bits=4, value_bits=4, residual_length=4, encode_batch=3)
        with torch.no_grad():
            logits = [model(ids[:, :12], **{cache_kwarg(model): cache}, use_cache=True).logits]
            logits += [model(ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits
                       for t in range(12, 24)]
        outs[force] = torch.cat(logits, 1)
    cases += 1
    err = (outs["1"] - outs["0"]).abs().max().item()
    if not err < 1e-2 * outs["0"].abs().max().item():
        failures.append(f"tiny llama: max|diff| {err:.3g}")
"""  # run by conftest.run_interpreted_cases (torch, failures, cases defined there)


@pytest.mark.skipif(not (HAS_TRITON and HAS_TRANSFORMERS), reason="needs triton and transformers")
def test_decode_kernel_matches_reference_in_interpreter() -> None:
    assert run_interpreted_cases(SCRIPT, force_triton=True) == 5 * 4 + 2 + 1  # every case ran


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("kbits, vbits, masked", [(4, 4, False), (4, 4, True), (3, 3, True), (2, 4, False)])
def test_decode_kernel_matches_reference_on_cuda(kbits: int, vbits: int, masked: bool) -> None:
    from tqindex.kernels.attention import quantized_attention, quantized_attention_reference
    from tqindex.kernels.decode_attention import decode_ok
    from tqindex.kvcache import TurboQuantLayer

    torch.manual_seed(0)
    dev = torch.device("cuda")
    B, H, G, d, N, M = 3, 8, 4, 128, 9000, 129
    layer = TurboQuantLayer(layer_idx=0, key_bits=kbits, value_bits=vbits, key_codec="mse", residual_length=M,
                            outlier_channels=0, outlier_bits=None, key_centering=False, seed=0)
    K = (torch.randn(B, H, N + M, d, device=dev) + 0.5).half()
    V = torch.randn(B, H, N + M, d, device=dev).half()
    layer.update(K[:, :, :1000], V[:, :, :1000])
    layer.update(K[:, :, 1000:], V[:, :, 1000:])
    q = (torch.randn(B, H * G, 1, d, device=dev) * 3).half()
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, N + M, dtype=torch.bool, device=dev)
        mask[1, :, :, :100] = False
    kv = layer.quantized()
    assert decode_ok(q, kv, mask)
    ref = quantized_attention_reference(q, kv, layer.keys, layer.values, mask, d**-0.5).float()
    out = quantized_attention(q, kv, layer.keys, layer.values, mask, d**-0.5).float()
    torch.cuda.synchronize()
    err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
    assert err < 5e-3, f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("symmetric, block_n, num_warps", [(None, None, None), (False, 128, 4), (True, 64, 2),
                                                          (False, 64, 4)])
def test_decode_plan_variants_match_reference_on_cuda(symmetric: bool | None, block_n: int | None,
                                                     num_warps: int | None) -> None:
    """The default plan (4-bit lookup over the symmetric codebook, lut 2), the full table (lut 1) and the tiles
    the sweep tries, against the reference (None: decode_plan's default)."""
    from tqindex.kernels.attention import quantized_attention_reference
    from tqindex.kernels.decode_attention import decode_plan, decode_run
    from tqindex.kvcache import TurboQuantLayer

    torch.manual_seed(1)
    dev = torch.device("cuda")
    B, H, G, d, N, M = 2, 8, 4, 128, 7000, 128
    layer = TurboQuantLayer(layer_idx=0, key_bits=4, value_bits=4, key_codec="mse", residual_length=M,
                            outlier_channels=0, outlier_bits=None, key_centering=False, seed=0)
    K = (torch.randn(B, H, N + M, d, device=dev) + 0.5).half()
    V = torch.randn(B, H, N + M, d, device=dev).half()
    layer.update(K, V)
    kv = layer.quantized()
    q = (torch.randn(B, H * G, 1, d, device=dev) * 3).half()
    opts = {k: v for k, v in dict(symmetric=symmetric, block_n=block_n, num_warps=num_warps).items() if v is not None}
    plan = decode_plan(kv, H * G, **opts)
    assert (plan.klut, plan.vlut) == ((1, 1) if symmetric is False else (2, 2))
    ref = quantized_attention_reference(q, kv, layer.keys, layer.values, None, d**-0.5).float()
    out = decode_run(plan, q, kv.length, layer.keys, layer.values, None, d**-0.5).float()
    torch.cuda.synchronize()
    err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
    assert err < 5e-3, f"relative error {err:.2e}"


@pytest.mark.parametrize("bh,n,slots,expected", [
    (64, 131072, 396, 6),  # 128k x 8 on an H200 at 3 programs / SM: one full wave (the old rule: 9 -> 576 programs)
    (8, 131072, 396, 49),  # 128k x 1: 392 programs (old: 64 splits, 512 programs, 1.3 waves)
    (8, 4096, 396, 8),  # short: capped by 4 tiles per split
    (256, 4096, 396, 3),  # more pairs than slots: 2 waves of 768 beat 1 split (256 programs, 65% of a wave)
    (1, 100, 396, 1),
])
def test_wave_splits_fill_whole_waves(bh: int, n: int, slots: int, expected: int) -> None:
    from tqindex.kernels.attention import _cdiv, _split_tokens
    from tqindex.kernels.decode_attention import wave_splits

    s = wave_splits(bh, n, 128, slots)
    assert s == expected
    tok, s2 = _split_tokens(n, s, 128)
    assert s2 == s and tok * s >= n  # the splits cover every token, as the kernel will split them
    # no split count of at most 4 waves and >= 4 tiles a split is cheaper (waves x tokens per program)
    cost = _cdiv(bh * s, slots) * tok
    for other in range(1, _cdiv(n, 4 * 128) + 1):
        t2, o2 = _split_tokens(n, other, 128)
        if _cdiv(bh * o2, slots) <= 4:
            assert cost <= _cdiv(bh * o2, slots) * t2


def test_resident_compile_checks_once_per_device_and_constants(monkeypatch) -> None:
    from tqindex.kernels import decode_attention as da

    calls = []

    class Compiled:
        def _init_handles(self) -> None:
            pass

    class Kernel:
        def warmup(self, *args, grid, **consts):
            calls.append((grid, consts))
            return Compiled()

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(da, "_split_kernel", Kernel(), raising=False)
    monkeypatch.setattr(da, "resident_programs", lambda k, warps, index: 7 if warps == 4 else 2)
    monkeypatch.setattr(da, "_RESIDENT", {})
    dev = torch.device("cuda", 0)
    args = (torch.zeros(1),)
    assert da._resident(args, 5, dict(BN=128, num_warps=4), dev) == 7
    assert da._resident(args, 5, dict(BN=128, num_warps=4), dev) == 7  # remembered: a one-off plan compiles nothing
    assert len(calls) == 1 and calls[0][0] == (1, 5)
    assert da._resident(args, 5, dict(BN=64, num_warps=2), dev) == 2  # other constants: checked again
    assert len(calls) == 2
    assert da._resident(args, 5, dict(BN=128, num_warps=4), torch.device("cpu")) == 4  # nothing compiled off CUDA
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert da._resident(args, 5, dict(BN=32, num_warps=4), dev) == 4
    assert len(calls) == 2


@pytest.mark.parametrize("bh,slots,bn", [(8, 396, 128), (64, 396, 128), (64, 528, 64), (256, 396, 128), (1, 4, 16)])
def test_split_choice_depends_on_the_token_count_only_through_its_tiles(bh: int, slots: int, bn: int) -> None:
    """decode_run keeps a step's split choice until n enters a new tile: that must be what it would compute."""
    from tqindex.kernels.attention import _cdiv, _split_tokens
    from tqindex.kernels.decode_attention import wave_splits

    seen: dict[int, tuple[int, int]] = {}
    for n in list(range(1, 3 * bn + 2)) + list(range(40 * bn - 3, 40 * bn + bn + 2)) + [131071, 131072, 131073]:
        choice = _split_tokens(n, wave_splits(bh, n, bn, slots), bn)
        assert choice[0] * choice[1] >= n
        assert seen.setdefault(_cdiv(n, bn), choice) == choice, n


def test_decode_run_reuses_a_steps_splits_and_key_only_for_the_same_call_shape(monkeypatch) -> None:
    """decode_run's step memo (same tile count of the coded length, query layout and constants): the launches it
    makes are the ones a fresh plan makes, for the same n, for a new n and for a query with other strides."""
    from tqindex.kernels import decode_attention as da
    from tqindex.kvcache import TurboQuantLayer

    layer = TurboQuantLayer(layer_idx=0, key_bits=4, value_bits=4, key_codec="mse", residual_length=4,
                            outlier_channels=0, outlier_bits=None, key_centering=False, seed=0)
    g = torch.Generator().manual_seed(0)
    layer.update(torch.randn(1, 2, 300, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g))
    kv = layer.quantized()
    calls: list = []

    def record(fn, grid, *args, cache=None, key=None, **kw):
        if fn is da._split_kernel:
            calls.append((grid, args[15], args[19], key, args[0].stride()))

    monkeypatch.setattr(da, "launch", record)
    q = torch.randn(1, 8, 1, 64, generator=g)
    q_t = torch.randn(1, 8, 1, 65, generator=g)[..., :64]  # head stride 65: another launch key (not 16-divisible)
    plan = da.decode_plan(kv, 8, lut=True)
    for n, query in ((290, q), (290, q), (150, q), (290, q_t), (290, q)):
        fresh = da.decode_plan(kv, 8, lut=True)
        da.decode_run(fresh, query, n, layer.keys, layer.values, None, 0.125)
        expected = calls.pop()
        da.decode_run(plan, query, n, layer.keys, layer.values, None, 0.125)
        assert calls.pop() == expected, (n, query.stride())

"""The Triton decode-attention kernel equals its torch reference: in Triton's CPU interpreter, and on CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import run_interpreted_cases
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# A fresh interpreter: TRITON_INTERPRET must be set before triton is first imported.
INTERPRETER_SCRIPT = """
    from tqindex.kvcache import TurboQuantLayer
    from tqindex.kernels.attention import quantized_attention_reference, quantized_attention_triton

    # (key codec, key bits, value bits, outlier channels, outlier bits, B, H, G, L, d, coded N, fp M, padded)
    shapes = [
        ("mse", 4, 4, 0, None, 2, 2, 2, 1, 32, 100, 1, False),
        ("mse", 3, 2, 8, 5, 1, 2, 4, 1, 32, 70, 3, True),
        ("prod", 3, 3, 0, None, 2, 1, 3, 2, 64, 130, 2, True),
        ("prod", 4, 2, 16, 3, 1, 2, 2, 1, 64, 65, 0, False),
        ("mse", 8, 1, 0, None, 1, 1, 1, 1, 16, 40, 1, False),
        ("mse", 5, 7, 16, 6, 1, 1, 5, 1, 48, 33, 1, False),
    ]
    for kc, kb, vb, oc, ob, B, H, G, L, d, N, M, padded in shapes:
        layer = TurboQuantLayer(layer_idx=0, key_bits=kb, value_bits=vb, key_codec=kc, residual_length=M,
                                outlier_channels=oc, outlier_bits=ob, key_centering=True, seed=1)
        K, V = torch.randn(B, H, N + M, d) + 1, torch.randn(B, H, N + M, d)
        layer.update(K[:, :, : N // 2], V[:, :, : N // 2])
        layer.update(K[:, :, N // 2 :], V[:, :, N // 2 :])
        kv = layer.quantized()
        q = torch.randn(B, H * G, L, d) * 2
        mask = None
        if padded:
            mask = torch.ones(B, 1, L, N + M, dtype=torch.bool).tril(N + M - L)
            mask[0, :, :, :5] = False
        ref = quantized_attention_reference(q, kv, layer.keys, layer.values, mask, d ** -0.5)
        for splits, block in ((None, 64), (1, 16), (3, 16)):
            tri = quantized_attention_triton(q, kv, layer.keys, layer.values, mask, d ** -0.5, block_n=block,
                                             num_splits=splits)
            cases += 1
            if not torch.allclose(tri, ref, atol=1e-4, rtol=1e-4):
                failures.append(f"{kc} K{kb} V{vb} outliers {oc} shape {(B, H, G, L, d, N, M)} splits {splits}: "
                                f"max|diff| {(tri - ref).abs().max().item():.3g}")

    # end to end: a tiny Llama decoding with the cache, Triton forced in the interpreter vs the torch path
    from transformers import LlamaConfig, LlamaForCausalLM
    from tqindex.kvcache import TurboQuantCache, cache_kwarg, enable
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=96, vocab_size=61, head_dim=32)
    model = enable(LlamaForCausalLM(cfg).eval())
    ids = torch.randint(0, 61, (2, 20))
    outs = {}
    for force in ("1", "0"):
        os.environ["TQINDEX_FORCE_TRITON"] = force
        cache = TurboQuantCache(config=cfg, key_bits=3, value_bits=3, residual_length=2, outlier_channels=8,
                                outlier_bits=4, encode_batch=1)
        with torch.no_grad():
            logits = [model(ids[:, :12], **{cache_kwarg(model): cache}, use_cache=True).logits]
            logits += [model(ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits for t in range(12, 20)]
        outs[force] = torch.cat(logits, 1)
    cases += 1
    if not torch.allclose(outs["1"], outs["0"], atol=1e-4, rtol=1e-4):
        failures.append(f"tiny llama: max|diff| {(outs['1'] - outs['0']).abs().max().item():.3g}")
"""  # run by conftest.run_interpreted_cases (torch, failures, cases defined there)


@pytest.mark.skipif(not (HAS_TRITON and HAS_TRANSFORMERS), reason="needs triton and transformers")
def test_attention_kernel_matches_reference_in_interpreter() -> None:
    assert run_interpreted_cases(INTERPRETER_SCRIPT) == 6 * 3 + 1  # every case ran


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and HAS_TRANSFORMERS), reason="needs triton and transformers")
@pytest.mark.parametrize("key_codec, bits, outliers", [("mse", 4, 0), ("mse", 2, 32), ("prod", 3, 0)])
def test_attention_kernel_matches_reference_on_cuda(key_codec: str, bits: int, outliers: int) -> None:
    from tqindex.kernels.attention import quantized_attention_reference, quantized_attention_triton
    from tqindex.kvcache import TurboQuantLayer

    torch.manual_seed(0)
    dev = torch.device("cuda")
    B, H, G, d, N, M = 3, 8, 4, 128, 5000, 7
    layer = TurboQuantLayer(layer_idx=0, key_bits=bits, value_bits=bits, key_codec=key_codec, residual_length=M,
                            outlier_channels=outliers, outlier_bits=bits + 1 if outliers else None,
                            key_centering=True, seed=0)
    K = (torch.randn(B, H, N + M, d, device=dev) + 0.5).half()
    V = torch.randn(B, H, N + M, d, device=dev).half()
    layer.update(K[:, :, :1000], V[:, :, :1000])
    layer.update(K[:, :, 1000:], V[:, :, 1000:])
    q = torch.randn(B, H * G, 1, d, device=dev).half()
    mask = torch.ones(B, 1, 1, N + M, dtype=torch.bool, device=dev)
    mask[1, :, :, :100] = False
    kv = layer.quantized()
    ref = quantized_attention_reference(q, kv, layer.keys, layer.values, mask, d**-0.5).float()
    tri = quantized_attention_triton(q, kv, layer.keys, layer.values, mask, d**-0.5).float()
    torch.cuda.synchronize()
    # tl.dot on fp32 runs in TF32 (10-bit mantissa): compare relative to the output's scale
    err = ((tri - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
    assert err < 1e-2, f"relative error {err:.2e}"

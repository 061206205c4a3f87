"""The Triton score kernel equals its torch reference: in Triton's CPU interpreter, and on CUDA when present."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
from conftest import run_interpreted
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is first imported, and the
# test process may already have imported it (other tests, the index) without the interpreter.
INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import math, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from tqindex.packing import pack_bits
    from tqindex.kernels.score import score_reference, score_triton
    import tqindex

    g = torch.Generator().manual_seed(0)
    failures, cases = [], 0

    def make(nq, n, D, mse_bits, has_qjl, norm_dtype):
        qr = torch.randn(nq, D, generator=g)
        qs = torch.randn(nq, D, generator=g) * math.sqrt(D) if has_qjl else None
        idx = torch.randint(0, 1 << max(mse_bits, 1), (n, D), generator=g)
        mse = pack_bits(idx, mse_bits) if mse_bits > 0 else torch.zeros(n, 0, dtype=torch.uint8)
        qjl = pack_bits(torch.randint(0, 2, (n, D), generator=g), 1) if has_qjl else None
        norms = (torch.rand(n, generator=g) + 0.5).to(norm_dtype)
        gammas = (torch.rand(n, generator=g) * 0.5).to(norm_dtype) if has_qjl else None
        cents = torch.sort(torch.randn(1 << max(mse_bits, 1), generator=g)).values / math.sqrt(D)
        return qr, qs, mse, qjl, norms, gammas, cents

    # nq / n / D deliberately not multiples of the block sizes (BQ 16/32/64, BN 64, BD 32/64)
    shapes = [(5, 70, 50), (19, 130, 37), (70, 65, 100), (1, 1, 2)]
    for mse_bits in range(0, 9):
        for has_qjl in (False, True):
            if mse_bits == 0 and not has_qjl:
                continue
            for si, (nq, n, D) in enumerate(shapes):
                norm_dtype = torch.float16 if si == 1 else torch.float32
                qr, qs, mse, qjl, norms, gammas, cents = make(nq, n, D, mse_bits, has_qjl, norm_dtype)
                kw = dict(mse_bits=mse_bits, padded_dim=D, qjl_scale=math.sqrt(math.pi / 2) / D)
                ref = score_reference(qr, qs, mse, qjl, norms, gammas, cents, **kw)
                tri = score_triton(qr, qs, mse, qjl, norms, gammas, cents, **kw)
                cases += 1
                if tri.shape != ref.shape or not torch.allclose(tri, ref, rtol=1e-4, atol=1e-4):
                    err = (tri - ref).abs().max().item() if tri.shape == ref.shape else float("nan")
                    failures.append(f"mse_bits={mse_bits} qjl={has_qjl} shape={(nq, n, D)} max|diff|={err:.3g}")

    # end to end through the codec's public score, Triton forced in the interpreter vs the torch path
    x = torch.randn(90, 50, generator=g)
    y = torch.randn(7, 50, generator=g)
    for q in (tqindex.TurboQuantMSE(50, 3, seed=1), tqindex.TurboQuantProd(50, 4, seed=1, qjl="orthogonal"),
              tqindex.TurboQuantProd(50, 1, seed=2, rotation="hadamard")):
        codes = q.encode(x)
        os.environ["TQINDEX_FORCE_TRITON"] = "1"
        tri = q.score(y, codes)
        os.environ["TQINDEX_FORCE_TRITON"] = "0"
        ref = q.score(y, codes)
        cases += 1
        if not torch.allclose(tri, ref, rtol=1e-4, atol=1e-4):
            failures.append(f"codec {q!r}: max|diff|={(tri - ref).abs().max().item():.3g}")

    if failures:
        print("MISMATCH\\n" + "\\n".join(failures))
        sys.exit(1)
    print(f"OK {cases} cases")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_interpreter() -> None:
    out = run_interpreted(INTERPRETER_SCRIPT, timeout=600)
    assert out.strip().startswith("OK "), out
    assert int(out.split()[1]) == 8 * 2 * 4 + 4 + 3  # every case ran


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("D", [100, 128, 1536])
def test_triton_kernel_matches_reference_on_cuda(D: int) -> None:
    import math

    from tqindex.kernels.score import score_reference, score_triton
    from tqindex.packing import pack_bits

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(D)
    nq, n = 300, 5003
    for mse_bits in range(0, 9):
        for has_qjl in (False, True):
            if mse_bits == 0 and not has_qjl:
                continue
            qr = torch.randn(nq, D, generator=g)
            qs = torch.randn(nq, D, generator=g) if has_qjl else None
            mse = pack_bits(torch.randint(0, 1 << max(mse_bits, 1), (n, D), generator=g), mse_bits) if mse_bits else \
                torch.zeros(n, 0, dtype=torch.uint8)
            qjl = pack_bits(torch.randint(0, 2, (n, D), generator=g), 1) if has_qjl else None
            norms = torch.rand(n, generator=g) + 0.5
            gammas = torch.rand(n, generator=g) * 0.5 if has_qjl else None
            cents = torch.sort(torch.randn(1 << max(mse_bits, 1), generator=g)).values / math.sqrt(D)
            args = [t.to(dev) if t is not None else None for t in (qr, qs, mse, qjl, norms, gammas, cents)]
            kw = dict(mse_bits=mse_bits, padded_dim=D, qjl_scale=math.sqrt(math.pi / 2) / D)
            ref = score_reference(*args, **kw)
            tri = score_triton(*args, **kw)
            torch.cuda.synchronize()
            # tl.dot on fp32 may run in TF32 (10-bit mantissa): compare against the magnitude of the terms
            scale = qr.norm(dim=1, keepdim=True).to(dev) * norms.to(dev)[None, :] * cents.abs().max().item() * math.sqrt(D)
            if has_qjl:
                scale = scale + qs.norm(dim=1, keepdim=True).to(dev) * (norms * gammas).to(dev)[None, :] * math.sqrt(
                    math.pi / 2) / math.sqrt(D)
            rel = ((tri - ref).abs() / scale).max().item()
            assert rel < 3e-3, f"mse_bits={mse_bits} qjl={has_qjl} D={D}: max error {rel:.2e} of the term scale"

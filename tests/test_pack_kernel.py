"""The fused quantize+pack Triton kernel equals bucketize + pack_bits (interpreter on CPU; CUDA if present)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_interpreted
import torch


def test_quantize_pack_kernel_matches_reference_interpreter() -> None:
    pytest.importorskip("triton")
    assert "OK" in run_interpreted(Path(__file__).parent / "pack_kernel_check.py")


@pytest.mark.gpu
def test_quantize_pack_kernel_matches_reference_cuda() -> None:
    from tqindex.codebook import lloyd_max
    from tqindex.kernels.pack import quantize_pack_reference, quantize_pack_triton

    for bits in (1, 3, 4, 5, 8):
        cb = lloyd_max(1536, bits)
        b = torch.tensor(cb.boundaries, dtype=torch.float32, device="cuda")
        c = torch.tensor(cb.centroids, dtype=torch.float32, device="cuda")
        y = torch.randn(4097, 1536, device="cuda") / 1536**0.5
        ref = quantize_pack_reference(y, b, bits)
        assert torch.equal(quantize_pack_triton(y, b, bits), ref)
        packed, approx = quantize_pack_triton(y, b, bits, c)
        assert torch.equal(packed, ref)
        assert torch.equal(approx, c[torch.bucketize(y, b)])

"""Run under TRITON_INTERPRET=1: the fused quantize+pack kernel must equal bucketize + pack_bits."""

import torch

from tqindex.codebook import lloyd_max
from tqindex.kernels.pack import quantize_pack_reference, quantize_pack_triton

torch.manual_seed(0)
for bits in range(1, 9):
    for n, D in ((5, 13), (33, 64), (3, 8)) if bits <= 5 else ((3, 11),):
        cb = lloyd_max(max(D, 2), bits)
        b = torch.tensor(cb.boundaries, dtype=torch.float32)
        y = torch.randn(n, D) / D**0.5
        y[0, : min(D, 2 ** bits - 1)] = b[: min(D, 2 ** bits - 1)]  # values exactly on boundaries
        ref = quantize_pack_reference(y, b, bits)
        out = quantize_pack_triton(y, b, bits)
        assert out.dtype == torch.uint8 and out.shape == ref.shape, (out.shape, ref.shape)
        assert torch.equal(out, ref), (bits, n, D)
print("OK")

"""Run under TRITON_INTERPRET=1: the fused quantize+pack kernel must equal bucketize + pack_bits, and
its optional centroid output must equal centroids[bucketize] (linear count and binary search paths)."""

import torch

from tqindex.codebook import lloyd_max
from tqindex.kernels.pack import LINEAR_MAX_BOUNDARIES, quantize_pack_reference, quantize_pack_triton

torch.manual_seed(0)
paths = set()
for bits in range(1, 9):
    for n, D in ((5, 13), (33, 64), (3, 8)) if bits <= 5 else ((3, 11), (2, 40)):
        cb = lloyd_max(max(D, 2), bits)
        b = torch.tensor(cb.boundaries, dtype=torch.float32)
        c = torch.tensor(cb.centroids, dtype=torch.float32)
        y = torch.randn(n, D) / D**0.5
        k = min(D, 2 ** bits - 1)
        y[0, :k] = b[:k]  # values exactly on boundaries
        if n > 1:
            y[1, :k] = b[-k:]  # the widest codebooks' last boundaries
            y[1, -1] = 10.0  # above every boundary
        ref = quantize_pack_reference(y, b, bits)
        out = quantize_pack_triton(y, b, bits)
        assert out.dtype == torch.uint8 and out.shape == ref.shape, (out.shape, ref.shape)
        assert torch.equal(out, ref), (bits, n, D)
        out2, approx = quantize_pack_triton(y, b, bits, c)
        assert torch.equal(out2, ref), (bits, n, D)
        assert torch.equal(approx, c[torch.bucketize(y, b)]), (bits, n, D)
        paths.add(2 ** bits - 1 <= LINEAR_MAX_BOUNDARIES)
assert paths == {True, False}
try:
    quantize_pack_triton(torch.zeros(2, 8), torch.zeros(3), 4)
except ValueError as e:
    assert "15 boundaries" in str(e)
else:
    raise AssertionError("wrong boundary count accepted")
print("OK")

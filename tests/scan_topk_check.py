"""Run under TRITON_INTERPRET=1: the fused scan+top-k kernel must equal its torch reference."""

import torch

import tqindex
from tqindex.kernels.scan_topk import scan_topk_gemm, scan_topk_reference, scan_topk_triton
from tqindex.kernels.score import CodeArgs

torch.manual_seed(0)
cases = [
    (tqindex.TurboQuantProd, 3, 20, 70, 3, 10, False, False),  # 2 MSE bits + QJL, n not a multiple of 64
    (tqindex.TurboQuantMSE, 3, 17, 90, 2, 5, True, True),  # 3 bits straddle bytes, l2, filter
    (tqindex.TurboQuantProd, 1, 16, 40, 2, 20, False, False),  # pure QJL, fewer codes than M
] + [(tqindex.TurboQuantMSE, b, 13, 40, 2, 4, False, False) for b in (1, 2, 4, 5, 6, 7, 8)]
for cls, bits, dim, n, nq, m, l2, filt in cases:
    q = cls(dim, bits, seed=1)
    c = q.encode(torch.randn(n, dim))
    qr, qs, _ = q.rotate_queries(torch.randn(nq, dim))
    allowed = (torch.rand(n) > 0.3) if filt else None
    ca = CodeArgs(c.mse, c.qjl, c.norms, c.gammas, q.centroids, q.mse_bits, q.padded_dim, getattr(q, "qjl_scale", 0.0),
                  l2)
    kw = dict(m=m, allowed=allowed, slot_offset=5)
    v1, i1 = scan_topk_triton(qr, qs, ca, fp16=False, block_n=32, **kw)
    v2, i2 = scan_topk_reference(qr, qs, ca, **kw)
    assert v1.shape == v2.shape, (v1.shape, v2.shape)
    fin = torch.isfinite(v2)
    assert torch.equal(fin, torch.isfinite(v1))
    assert torch.allclose(v1[fin], v2[fin], rtol=1e-4, atol=1e-5), (v1 - v2).abs().max()
    assert torch.equal(i1[fin], i2[fin])
    for bn in (16, 32):  # sub-tiles of 16 rows: one per program, or two
        v3, i3 = scan_topk_gemm(qr, qs, ca, block_n=bn, **kw)
        assert v3.shape == v2.shape and torch.equal(torch.isfinite(v3), fin)
        assert torch.allclose(v3[fin], v2[fin], rtol=1e-4, atol=1e-4), (v3 - v2).abs().max()
        assert torch.equal(i3[fin], i2[fin])
print("OK")

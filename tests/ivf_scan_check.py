"""Run under TRITON_INTERPRET=1: the IVF list-scan kernel must equal its torch reference."""

import torch

import tqindex
from tqindex.kernels.ivf_scan import ivf_scan

torch.manual_seed(0)
for codec, bits, dim, metric, filt in [("prod", 3, 20, "ip", False), ("mse", 3, 17, "l2", True),
                                       ("prod", 1, 16, "l2", False), ("mse", 4, 40, "cosine", False),
                                       ("mse", 8, 9, "ip", True), ("prod", 5, 70, "l2", True)]:
    ix = tqindex.IVFIndex(dim, 6, nprobe=3, metric=metric, codec=codec, bits=bits, device="cpu")
    x = torch.randn(300, dim)
    ix.train(x)
    ix.add(x)
    ix.remove_ids(list(range(0, 300, 7)))
    ix._settle()
    allowed = (torch.rand(len(ix)) > 0.3) if filt else None
    lc, pq = ix._bind(ix._normalise(torch.randn(5, dim)), 3, allowed)
    max_list = int(ix._lens_desc[0])
    ref = ivf_scan(lc, pq, max_list=max_list, impl="reference")
    assert bool(torch.isfinite(ref).any())
    got = ivf_scan(lc, pq, max_list=max_list, impl="triton")
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got))
    assert torch.allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-4), (got - ref)[fin].abs().max()
print("OK")

"""Run under TRITON_INTERPRET=1: the two-pass IVF top-k kernels must equal the top k of the torch reference."""

import torch

import tqindex
from tqindex.kernels.ivf_scan import ivf_topk_reference, ivf_topk_triton


def check(lc, pq, m, **kw):
    rv, rs = ivf_topk_reference(lc, pq, m)
    assert bool(torch.isfinite(rv).any())
    v, s = ivf_topk_triton(lc, pq, m, **kw)
    assert v.shape == rv.shape, (kw, v.shape, rv.shape)
    fin = torch.isfinite(rv)
    assert torch.equal(fin, torch.isfinite(v)), kw
    assert torch.allclose(v[fin], rv[fin], rtol=1e-4, atol=1e-4), (kw, (v - rv)[fin].abs().max())
    assert bool((s[~fin] == 0).all())
    for a, b, f in zip(s, rs, fin):  # the same codes (as sets: equal scores may swap places)
        assert set(a[f].tolist()) == set(b[f].tolist()), kw


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
    qn = ix._normalise(torch.randn(21, dim))
    lc, pq = ix._bind(qn[:5], 3, allowed)
    for m, bn in [(1, None), (7, 16), (40, 32), (1000, 64)]:  # 1000: more than the lists hold; bn 32, 64: 2, 4 runs
        check(lc, pq, m, block_n=bn, method="pairs")
    lc, pq = ix._bind(qn, 3, allowed)  # 63 pairs over 6 lists: several groups of 16 per list
    for m in (7, 1000):
        check(lc, pq, m, method="grouped")
print("OK")

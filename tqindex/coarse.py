"""CoarseQuantizer: the nlist centroids of an inverted-file index (seeded k-means) and list assignment."""

from __future__ import annotations

import torch

__all__ = ["CoarseQuantizer", "kmeans"]


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """(n, k) squared distances ||x - c||^2 up to the per-row constant ||x||^2 (argmin-equivalent)."""
    return c2.unsqueeze(0) - 2.0 * (x @ c.T)


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """(n,) int64 index of the nearest centroid of each row of x (chunked: O(chunk * k) memory)."""
    c2 = (c * c).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = _sq_dists(x[s : s + chunk], c, c2).argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on (n, d) float32 rows -> (k, d) float32 centroids, seeded by k distinct rows.

    Initialised as FAISS does (k rows drawn at random, by ``seed``); sums in float64; an empty
    cluster is re-seeded with the row farthest from its centroid. Deterministic for a seed on a given
    device. Needs n >= k.
    """
    n, d = x.shape
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    cent = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        lab = _nearest(x, cent)
        counts = torch.bincount(lab, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, lab, x.double())
        new = (sums / counts.clamp_min(1).unsqueeze(1).double()).float()
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = ((x - new[lab]) ** 2).sum(1).topk(int(empty.numel())).indices
            new[empty] = x[far]
        cent = new
    return cent


class CoarseQuantizer:
    """nlist centroids (k-means on the training sample) and the assignment of vectors and queries.

    Vectors go to their nearest centroid (squared euclidean: the smallest residual). Queries probe
    the ``nprobe`` best lists by the metric's own order: nearest centroids for l2 and cosine, largest
    <q, c> for ip. Knows nothing of codes.
    """

    def __init__(self, dim: int, nlist: int, metric: str, device: torch.device) -> None:
        self.dim, self.nlist, self.metric, self.device = dim, nlist, metric, device
        self.centroids: torch.Tensor | None = None  # (nlist, dim) float32

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    def train(self, x: torch.Tensor, *, seed: int, iters: int = 20) -> None:
        """Learn the centroids from (n, dim) float32 rows on this device (n >= nlist)."""
        self.set_centroids(kmeans(x.to(self.device, torch.float32), self.nlist, iters=iters, seed=seed))

    def set_centroids(self, c: torch.Tensor) -> None:
        self.centroids = c.to(self.device, torch.float32).contiguous()
        self._c2 = (self.centroids * self.centroids).sum(1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n,) int64 list of each row's nearest centroid."""
        if self.centroids is None:
            raise RuntimeError("the coarse quantizer is not trained")
        return _nearest(x, self.centroids)

    def probe(self, q: torch.Tensor, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lists to scan for (nq, dim) queries: (lists (nq, nprobe) int64, bias (nq, nprobe) float32).

        ``bias`` is the list's exact part of each query's similarity: <q, c> for ip/cosine,
        -||q - c||^2 for l2 (the estimate of a vector in the list adds its residual's part to it).
        """
        if self.centroids is None:
            raise RuntimeError("the coarse quantizer is not trained")
        ip = q @ self.centroids.T  # (nq, nlist)
        neg_l2 = 2.0 * ip - self._c2.unsqueeze(0) - (q * q).sum(1, keepdim=True)
        order = ip if self.metric == "ip" else neg_l2
        _, lists = order.topk(min(nprobe, self.nlist), dim=1)
        bias = (neg_l2 if self.metric == "l2" else ip).gather(1, lists)
        return lists, bias

"""CoarseQuantizer: the nlist centroids of an inverted-file index (seeded k-means) and list assignment."""

from __future__ import annotations

import torch

__all__ = ["CoarseQuantizer", "kmeans"]


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """(n, k) squared distances ||x - c||^2 up to the per-row constant ||x||^2 (argmin-equivalent)."""
    return c2.unsqueeze(0) - 2.0 * (x @ c.T)


def _unit(c: torch.Tensor) -> torch.Tensor:
    return c / torch.linalg.vector_norm(c, dim=1, keepdim=True).clamp_min(1e-30)


def _nearest(x: torch.Tensor, c: torch.Tensor, *, spherical: bool = False, chunk: int = 1 << 16) -> torch.Tensor:
    """(n,) int64 index of each row's centroid: the nearest (squared euclidean), or with ``spherical``
    the one of largest cosine <x, c / ||c||> (chunked: O(chunk * k) memory)."""
    if spherical:
        cu = _unit(c)
    else:
        c2 = (c * c).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        out[s : s + chunk] = (xs @ cu.T).argmax(1) if spherical else _sq_dists(xs, c, c2).argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, spherical: bool = False) -> torch.Tensor:
    """Lloyd's k-means on (n, d) float32 rows -> (k, d) float32 centroids, seeded by k distinct rows.

    Initialised as FAISS does (k rows drawn at random, by ``seed``); sums in float64; an empty
    cluster is re-seeded with the row farthest from its centroid. With ``spherical`` (unit rows:
    cosine data) rows join the centroid of largest cosine; centroids stay the means of their rows
    (not normalised: they are what residuals are taken against). Deterministic for a seed on a given
    device. Needs n >= k.
    """
    n, d = x.shape
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    cent = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        lab = _nearest(x, cent, spherical=spherical)
        counts = torch.bincount(lab, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, lab, x.double())
        new = (sums / counts.clamp_min(1).unsqueeze(1).double()).float()
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            if spherical:
                far = (-(x * _unit(new)[lab]).sum(1)).topk(int(empty.numel())).indices
            else:
                far = ((x - new[lab]) ** 2).sum(1).topk(int(empty.numel())).indices
            new[empty] = x[far]
        cent = new
    return cent


class CoarseQuantizer:
    """nlist centroids (k-means on the training sample) and the assignment of vectors and queries.

    For l2 and ip, vectors go to their nearest centroid (squared euclidean: the smallest residual);
    queries probe the ``nprobe`` best lists by the metric's order: nearest centroids for l2, largest
    <q, c> for ip. For cosine (unit vectors) training is spherical and both vectors and queries go
    by the largest cosine to a centroid: euclidean assignment lets centroids of small norm (the means
    of many loose clusters, typical at high dimension) attract every point near no centroid and
    grow into huge lists, which euclidean probing then favours (bench/results/ivf_h200.md measured
    8 / 114 / 7,272 min / median / max list sizes at 1536 dims before this). Knows nothing of codes.
    """

    def __init__(self, dim: int, nlist: int, metric: str, device: torch.device) -> None:
        self.dim, self.nlist, self.metric, self.device = dim, nlist, metric, device
        self.centroids: torch.Tensor | None = None  # (nlist, dim) float32

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def spherical(self) -> bool:
        return self.metric == "cosine"

    def train(self, x: torch.Tensor, *, seed: int, iters: int = 20) -> None:
        """Learn the centroids from (n, dim) float32 rows on this device (n >= nlist)."""
        self.set_centroids(kmeans(x.to(self.device, torch.float32), self.nlist, iters=iters, seed=seed,
                                  spherical=self.spherical))

    def set_centroids(self, c: torch.Tensor) -> None:
        self.centroids = c.to(self.device, torch.float32).contiguous()
        self._c2 = (self.centroids * self.centroids).sum(1)
        self._inv_norm = self._c2.sqrt().clamp_min(1e-30).reciprocal()

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n,) int64 list of each row (nearest centroid; largest cosine for cosine)."""
        if self.centroids is None:
            raise RuntimeError("the coarse quantizer is not trained")
        return _nearest(x, self.centroids, spherical=self.spherical)

    def probe(self, q: torch.Tensor, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lists to scan for (nq, dim) queries: (lists (nq, nprobe) int64, bias (nq, nprobe) float32).

        ``bias`` is the list's exact part of each query's similarity: <q, c> for ip/cosine,
        -||q - c||^2 for l2 (the estimate of a vector in the list adds its residual's part to it).
        """
        if self.centroids is None:
            raise RuntimeError("the coarse quantizer is not trained")
        ip = q @ self.centroids.T  # (nq, nlist)
        if self.metric == "l2":
            order = 2.0 * ip - self._c2.unsqueeze(0) - (q * q).sum(1, keepdim=True)  # -||q - c||^2
        else:
            order = ip if self.metric == "ip" else ip * self._inv_norm.unsqueeze(0)  # cosine: <q, c> / ||c||
        _, lists = order.topk(min(nprobe, self.nlist), dim=1)
        bias = order.gather(1, lists) if self.metric == "l2" else ip.gather(1, lists)
        return lists, bias

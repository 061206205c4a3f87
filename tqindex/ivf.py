"""IVFIndex: inverted lists of TurboQuant residual codes (IVF-TQ), scanned list by list, rescored exactly."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from tqindex.coarse import CoarseQuantizer
from tqindex.codec import as_matrix
from tqindex.index import Index, _check_int, _Growable
from tqindex.kernels.ivf_scan import ListCodes, ProbedQueries, ivf_topk, scratch_bytes

__all__ = ["IVFIndex"]

log = logging.getLogger(__name__)

_MAX_TRAIN_PER_LIST = 256  # FAISS's max_points_per_centroid: the k-means sample is at most 256 * nlist rows
_GRAPH_MAX_NQ = 1024  # searches of at most this many queries replay a captured CUDA graph ...
_GRAPH_MAX_BYTES = 256 << 20  # ... whose scan scratch (kernels.ivf_scan.scratch_bytes) stays under this
_GRAPH_CACHE = 8  # captured graphs kept per index (by nq, k, rerank, nprobe)
_LIST_RULES = ("auto", "euclidean", "spherical")
_SPHERICAL_DIM = 512  # lists="auto": spherical lists for cosine from this dimension (bench/results/ivf_h200*.md)


class IVFIndex(Index):
    """An inverted-file index: k-means lists, each vector coded as its residual to its list's centroid.

    Args:
        dim: vector dimension.
        nlist: number of lists (k-means centroids), learnt by :meth:`train`.
        nprobe: lists scanned per query (a search may override it; clamped to nlist).
        train_iters: k-means iterations.
        lists: how vectors are grouped into lists: "euclidean" (k-means; vectors and cosine queries go
            to the nearest centroid), "spherical" (cosine only: spherical k-means, vectors and queries
            go by the largest cosine to a centroid) or "auto": spherical for cosine at >= 512
            dimensions, else euclidean. Measured on the H200 (bench/results/ivf_h200*.md): at 1536
            dims spherical lists are balanced where euclidean ones are not (76 / 215 / 709 against
            8 / 114 / 7,272 min / median / max), 8x faster at 1,000 queries for higher recall; at 128
            dims they cost recall at equal nprobe (0.943 against 0.961 at nprobe 8 on 10M vectors).
        cuda_graphs: on CUDA, replay a captured CUDA graph for unfiltered searches of at most 1,024
            queries (one launch instead of ~80; recaptured after any add or removal; at most 8 kept,
            each holding its score buffer, at most 256 MiB). Needs originals on the device (or
            rerank 0); falls back to ordinary launches when capture is not possible.
        **kwargs: every option of :class:`tqindex.Index` except ``center`` (residuals are centred by
            their list), ``block_size`` and ``scan`` (the flat scan's).

    The estimate of a vector x in list l for a query q is <q, c_l> + est<q, x - c_l> (ip/cosine) or
    -||q - c_l||^2 + 2 est<q - c_l, x - c_l> - ||x - c_l||^2 (l2, as a similarity); queries are rotated
    once, and the rotated centroids are computed once at training. Codes live contiguous per list
    (reordered lazily after adds and removals); ids, rescoring, filters, persistence and results
    follow :class:`tqindex.Index`.
    """

    FORMAT = "tqindex.IVFIndex"

    def __init__(self, dim: int, nlist: int, *, nprobe: int = 16, train_iters: int = 20, cuda_graphs: bool = True,
                 lists: str = "auto", **kwargs: Any) -> None:
        for bad in ("center", "block_size", "scan"):
            if bad in kwargs:
                raise TypeError(f"IVFIndex does not take {bad!r} (residuals are centred by their list); "
                                "expected the options of Index without it")
        self.nlist = _check_int(nlist, "nlist", 1, 1 << 22)
        self.nprobe = _check_int(nprobe, "nprobe", 1)
        self.train_iters = _check_int(train_iters, "train_iters", 1, 1000)
        self.cuda_graphs = bool(cuda_graphs)
        if lists not in _LIST_RULES:
            raise ValueError(f"lists must be one of {_LIST_RULES}, got {lists!r}")
        self.lists = lists
        self._graphs: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._graphs_failed: set[tuple[int, ...]] = set()  # (nq, k, rerank, nprobe) whose capture failed
        self._version = 0  # bumped whenever a tensor a captured graph reads may have moved
        super().__init__(dim, center=False, **kwargs)
        if lists == "spherical" and self.metric != "cosine":
            raise ValueError(f"lists='spherical' needs metric='cosine'; got metric={self.metric!r}")
        spherical = lists == "spherical" or (lists == "auto" and self.metric == "cosine" and self.dim >= _SPHERICAL_DIM)
        self.quantizer = CoarseQuantizer(self.dim, self.nlist, self.metric, self.device, spherical=spherical)
        self._crot: torch.Tensor | None = None  # (nlist, D) rotated centroids
        self._cqjl: torch.Tensor | None = None  # (nlist, D) S times them (prod)

    # -- storage: the column store in list order --------------------------------------------------------
    def _reset_storage(self) -> None:
        super()._reset_storage()
        self._lists = _Growable(np.empty(0, dtype=np.int64))  # list of each slot
        self._offsets = np.zeros(self.nlist + 1, dtype=np.int64)
        self._offsets_dev = torch.zeros(self.nlist + 1, dtype=torch.int64, device=self.device)
        self._lens_desc = np.zeros(self.nlist, dtype=np.int64)  # list lengths, largest first
        self._ids_dev = torch.zeros(0, dtype=torch.int64, device=self.device)  # ids by slot, on the device
        self._ordered = False

    def _columns(self) -> list[_Growable]:
        return [*super()._columns(), self._lists]

    def _layout_changed(self) -> None:
        self._ordered = False

    def _settle(self) -> None:
        self._ensure_ordered()

    def _ensure_ordered(self) -> None:
        """Make every list contiguous (a stable sort of the slots by list) and refresh the offsets."""
        if self._ordered:
            return
        lists = self._lists.view()
        if lists.size and bool((np.diff(lists) < 0).any()):
            order = np.argsort(lists, kind="stable")
            for g in self._columns():
                g.permute(order)
            self._sorted = None  # slot map of the ids
        counts = np.bincount(self._lists.view(), minlength=self.nlist)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets_dev = torch.from_numpy(self._offsets).to(self.device)
        self._lens_desc = np.sort(counts)[::-1].copy()
        self._ids_dev = torch.from_numpy(self._ids.view().copy()).to(self.device)
        self._version += 1
        self._graphs.clear()
        self._ordered = True

    def list_sizes(self) -> np.ndarray:
        """(nlist,) int64 number of vectors in each list."""
        with self._lock:
            return np.bincount(self._lists.view(), minlength=self.nlist).astype(np.int64)

    # -- training and adding ----------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.quantizer.is_trained

    def train(self, x: Any) -> None:
        """Learn the nlist centroids from (n, dim) vectors (n >= nlist; at most 256 * nlist are used,
        drawn by the index's seed). Must come before the first add."""
        t, _ = as_matrix(x, self.dim, "x", self.device)
        self._check_range(t, "x")
        with self._lock:
            if len(self) > 0:
                raise ValueError(f"train() must come before the first add; the index holds {len(self)} vectors")
            if t.shape[0] < self.nlist:
                raise ValueError(f"train() got {t.shape[0]} vectors for nlist={self.nlist} lists; expected at least "
                                 f"{self.nlist} (one per list; 30-256 per list is usual)")
            t = self._normalise(t)
            cap = _MAX_TRAIN_PER_LIST * self.nlist
            if t.shape[0] > cap:
                g = torch.Generator().manual_seed(self.seed)
                t = t[torch.randperm(t.shape[0], generator=g)[:cap].to(t.device)]
            self.quantizer.train(t, seed=self.seed, iters=self.train_iters)
            self._set_rotated_centroids()

    def _set_rotated_centroids(self) -> None:
        c = self.quantizer.centroids
        if c is None:  # pragma: no cover - callers train first
            raise RuntimeError("the coarse quantizer is not trained")
        qr, qs = self.codec.rotate(c)
        self._crot, self._cqjl = qr.contiguous(), (qs.contiguous() if qs is not None else None)
        self._ordered = False  # recapture graphs

    def _add(self, t: torch.Tensor, ids: np.ndarray) -> None:
        if not self.is_trained:
            raise ValueError(f"IVFIndex needs train() before add(): it learns its {self.nlist} list centroids "
                             "(k-means) from a sample of vectors first")
        if t.shape[0] == 0:
            return
        t = self._normalise(t)
        lists = self.quantizer.assign(t)
        codes = self.codec.encode(t - self.quantizer.centroids[lists])  # all that can fail comes first
        self._append(t, codes, ids)
        self._lists.append(lists.cpu().numpy())
        self._ordered = False

    def _uncentre(self, decoded: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
        lists = torch.from_numpy(self._lists.view()[slots]).to(self.device)
        return decoded + self.quantizer.centroids[lists]

    # -- search -------------------------------------------------------------------------------------------
    def search(self, q: Any, k: int, rerank: int | None = None, *, nprobe: int | None = None,
               filter_ids: Any = None) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """k nearest neighbours of each query, scanning the ``nprobe`` best lists (default: the index's).

        Same arguments and results as :meth:`tqindex.Index.search`; ``nprobe`` above nlist scans every list.
        """
        p = self.nprobe if nprobe is None else _check_int(nprobe, "nprobe", 1)
        return self._run_search(q, k, rerank, filter_ids, nprobe=min(p, self.nlist))

    def _ids_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return self._ids_dev[slots]  # kept beside the codes: no host round trip

    def _search(self, q: torch.Tensor, k: int, rr: int, allowed: torch.Tensor | None, **opts: Any,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        P = min(opts.get("nprobe") or self.nprobe, self.nlist)
        key = (q.shape[0], k, rr, P)
        if (self.cuda_graphs and key not in self._graphs_failed and self.device.type == "cuda" and allowed is None
                and 0 < q.shape[0] <= _GRAPH_MAX_NQ and len(self) > 0 and (rr == 0 or self.originals == "device")
                and scratch_bytes(self._lens_desc, self.codec.padded_dim, q.shape[0], P, k * max(rr, 1))
                <= _GRAPH_MAX_BYTES
                and self._scan_impl() == "triton"):
            try:
                return self._graph_search(q, k, rr, P)
            except Exception:  # a capture the CUDA/torch versions refuse: plain launches for this shape
                log.warning("IVFIndex: CUDA graph capture failed for (nq, k, rerank, nprobe) = %s; searching "
                            "that shape without graphs", key, exc_info=True)
                self._graphs_failed.add(key)
                self._graphs.pop(key, None)
        return super()._search(q, k, rr, allowed, nprobe=P)

    def _graph_search(self, q: torch.Tensor, k: int, rr: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay (capturing first if needed) the whole search of ``q`` (nq <= 1024) as one CUDA graph."""
        key = (q.shape[0], k, rr, P)
        entry = self._graphs.get(key)
        if entry is None or entry[0] != self._version:
            static_q = q.clone()
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compiles the kernels, settles the allocator
                for _ in range(2):
                    Index._search(self, static_q, k, rr, None, nprobe=P)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                D, I = Index._search(self, static_q, k, rr, None, nprobe=P)
            if len(self._graphs) >= _GRAPH_CACHE:
                self._graphs.pop(next(iter(self._graphs)))
            entry = (self._version, graph, static_q, D, I)
            self._graphs[key] = entry
        _, graph, static_q, D, I = entry
        static_q.copy_(q)
        graph.replay()
        return D.clone(), I.clone()

    def _scan_impl(self) -> str:
        from tqindex.kernels.score import use_triton

        if use_triton(self.device):
            return "triton"
        return "cpu" if self.device.type == "cpu" else "reference"

    def _bind(self, qn: torch.Tensor, nprobe: int, allowed: torch.Tensor | None) -> tuple[ListCodes, ProbedQueries]:
        """Probe lists and rotate the (normalised) queries once: the scan's two arguments (lists ordered)."""
        P = min(nprobe, self.nlist)
        lists, bias = self.quantizer.probe(qn, P)
        lens = self._offsets_dev[lists + 1] - self._offsets_dev[lists]  # (nq, P)
        cum = torch.zeros(lists.shape[0], P + 1, dtype=torch.int64, device=self.device)
        cum[:, 1:] = torch.cumsum(lens, dim=1)
        width = int(self._lens_desc[:P].sum())  # the most any query can see: known without a device sync
        qr, qs = self.codec.rotate(qn)
        return self._list_codes(), ProbedQueries(qr, qs, lists, bias.to(torch.float32), cum, width, allowed)

    def _list_codes(self) -> ListCodes:
        return ListCodes(**vars(self._code_args()), offsets=self._offsets_dev, crot=self._crot, cqjl=self._cqjl,
                         lens_desc=self._lens_desc)

    def _candidates(self, qn: torch.Tensor, kc: int, allowed: torch.Tensor | None, *, nprobe: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        lc, pq = self._bind(qn, nprobe, allowed)  # nprobe from _search, which applies the default
        return ivf_topk(lc, pq, kc, impl=self._scan_impl())

    # -- accounting and persistence -----------------------------------------------------------------------
    def _extra_arrays(self) -> dict[str, np.ndarray]:
        if self.quantizer.centroids is None:
            return {}
        return {"lists": self._lists.view().copy(), "centroids": self.quantizer.centroids.cpu().numpy()}

    def _restore_extra(self, get: Any) -> None:
        n = len(self)
        try:
            cent = get("centroids", (self.nlist, self.dim), np.float32)
        except KeyError:
            if n:
                raise ValueError(f"an IVFIndex of {n} vectors was saved without centroids; expected them") from None
            return  # saved before training
        lists = get("lists", (n,), np.int64)
        if n and (int(lists.min()) < 0 or int(lists.max()) >= self.nlist):
            raise ValueError(f"the saved list numbers lie in {int(lists.min())}..{int(lists.max())}; expected 0.."
                             f"{self.nlist - 1}")
        self.quantizer.set_centroids(torch.from_numpy(cent))
        self._set_rotated_centroids()
        self._lists = _Growable(lists.astype(np.int64))
        self._ordered = False

    def memory_usage(self) -> dict[str, int]:
        """Bytes held: codes, originals, ids, list numbers and centroids, total."""
        m = super().memory_usage()
        rotated = self.nlist * self.codec.padded_dim * 4 * (2 if self._cqjl is not None else 1)
        m["lists"] = len(self) * 8 + self.nlist * self.dim * 4 + rotated  # list of each slot, centroids
        m["total"] += m["lists"]
        return m

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("center")
        cfg.update(nlist=self.nlist, nprobe=self.nprobe, train_iters=self.train_iters, lists=self.lists)
        return cfg

    def __repr__(self) -> str:
        return (f"IVFIndex(dim={self.dim}, nlist={self.nlist}, nprobe={self.nprobe}, metric={self.metric!r}, "
                f"codec={self.codec_name!r}, bits={self.bits}, rerank={self.rerank}, n={len(self)}, "
                f"device={self.device})")

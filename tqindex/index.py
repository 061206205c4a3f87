"""Index: a FAISS-shaped vector index over TurboQuant codes with streaming top-k and exact rescoring."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tqindex.codec import Codes, TurboQuantMSE, TurboQuantProd, as_matrix

if TYPE_CHECKING:
    from tqindex.kernels.score import CodeArgs

__all__ = ["Index", "MAX_NORM", "norm_error"]

log = logging.getLogger(__name__)

_METRICS = ("ip", "cosine", "l2")
_CODECS = ("prod", "mse")
_MAX_K = 1 << 20
_MAX_ID = (1 << 63) - 1
# Largest L2 norm of a vector or query for the ip and l2 metrics: squared norms, inner products and
# squared distances of such vectors (<= 4e36) stay finite in float32 (max 3.4e38), so no score can
# overflow. Cosine normalises first and has no such limit.
MAX_NORM = 1e18


def norm_error(what: str, norm: float) -> str:
    """The message for a vector over :data:`MAX_NORM` (shared by the index and the REST service)."""
    return (f"{what} has L2 norm {norm:.3g}, above {MAX_NORM:.0e}, the largest the ip and l2 metrics "
            f"accept (squared norms and scores must stay finite in float32); expected vectors with norm <= "
            f"{MAX_NORM:.0e}, or metric='cosine'")


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _as_ids(ids: Any, n: int | None, *, unique: bool = True) -> np.ndarray:
    """Validate ids -> (n,) int64 numpy: integers, 1-D, non-negative (-1 marks padding), unique if asked."""
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().cpu().numpy()
    elif isinstance(ids, np.ndarray):
        arr = ids
    elif isinstance(ids, (list, tuple, range)):
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise TypeError("ids must be integers (int64)")
        try:
            arr = np.asarray(list(ids), dtype=np.int64)
        except OverflowError as e:
            raise ValueError(f"ids must fit in int64: {e}") from None
        if arr.size == 0:
            arr = arr.reshape(0)
    else:
        raise TypeError(f"ids must be an int64 numpy array, torch tensor or list of ints, got {type(ids).__name__}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must have an integer dtype (int64), got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64")
    arr = arr.astype(np.int64)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} ids for {n} vectors; expected one id per vector")
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks padding in results), got {int(arr.min())}")
    if unique and np.unique(arr).size != arr.size:
        u, c = np.unique(arr, return_counts=True)
        raise ValueError(f"duplicate ids in the batch: {u[c > 1][:10].tolist()}")
    return arr


class _Growable:
    """Row storage with amortised O(1) appends: a tensor (or ndarray) of capacity >= rows used."""

    def __init__(self, data: torch.Tensor | np.ndarray) -> None:
        self.data = data
        self.n = data.shape[0]

    def view(self) -> torch.Tensor | np.ndarray:
        return self.data[: self.n]

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        m = rows.shape[0]
        if self.n + m > self.data.shape[0]:
            cap = max(2 * self.data.shape[0], self.n + m, 1024)
            if isinstance(self.data, np.ndarray):
                new = np.empty((cap, *self.data.shape[1:]), dtype=self.data.dtype)
            else:
                new = torch.empty((cap, *self.data.shape[1:]), dtype=self.data.dtype, device=self.data.device)
            new[: self.n] = self.data[: self.n]
            self.data = new
        self.data[self.n : self.n + m] = rows
        self.n += m

    def permute(self, order: np.ndarray) -> None:
        """Reorder the rows used: row i becomes row ``order[i]`` of before (``order`` a permutation of n)."""
        if isinstance(self.data, np.ndarray):
            self.data = self.data[: self.n][order]
        else:
            self.data = self.data[: self.n][torch.from_numpy(order).to(self.data.device)]

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where ``mask`` (n,) is True, in order."""
        if isinstance(self.data, np.ndarray):
            kept = self.data[: self.n][mask]
        else:
            kept = self.data[: self.n][torch.from_numpy(mask).to(self.data.device)]
        self.data = kept.copy() if isinstance(kept, np.ndarray) else kept.clone()
        self.n = kept.shape[0]


class Index:
    """A vector index storing TurboQuant codes; search scans the codes, then rescores exactly.

    Args:
        dim: vector dimension.
        metric: "ip" (inner product), "cosine" (vectors and queries normalised) or "l2" (squared
            euclidean distance).
        bits: bits per coordinate of the codes (prod: 1..9, mse: 1..8).
        codec: "prod" (unbiased inner products, TurboQuantProd) or "mse" (TurboQuantMSE).
        rerank: rescoring factor: the best ``k * rerank`` candidates by estimate are rescored exactly
            against the original vectors; 0 returns the estimates.
        seed: seed of the codec's rotation and QJL matrix.
        device: where codes live and are scanned; default CUDA when available, else CPU.
        keep_originals: keep the original vectors for rescoring; False forces rerank 0.
        originals: where kept originals live: "host" (CPU memory, or a memory map after
            ``load(mmap=True)``; the default) or "device" (beside the codes: rescoring without a
            host gather, at 4 * dim bytes per vector of device memory).
        center: subtract a mean vector learned by :meth:`train` (or at the first add) before coding.
            Exact for every metric (for ip/cosine the mean's inner product with the query is added
            back); it helps data far from the origin.
        rotation: "haar" (dense) or "hadamard".
        norm_dtype: "float32" or "float16" for the per-vector floats of the codes.
        qjl: the QJL matrix of the prod codec: "orthogonal" (default here: scaled Haar rows, still
            unbiased, 2.8x lower inner-product variance than Gaussian in bench/results/codec.md and
            +0.1 10-recall@10 on GloVe-50 at 4 bits) or "gaussian" (the paper's).
        block_size: codes scored per step of the streaming top-k. Default: 32,768 on the CPU
            (memory O(nq * block_size)); on CUDA as many as keep the GEMM scan's transient fp16
            rows near 1 GiB (at least 262,144).
        scan: the GPU scan: "fused" (one Triton kernel unpacks codes into tensor-core dots and keeps
            tile maxima), "gemm" (a Triton kernel unpacks a block once into scaled fp16 rows, a
            tensor-core kernel keeps each tile's maximum score) or "auto" (fused for padded dims
            <= 64, else gemm: the faster of the two in bench/results/search.md). Both then score
            the best tiles exactly in float32. The CPU always runs the torch reference.

    Results follow FAISS: ``D, I = search(q, k)`` with (nq, k) arrays; D holds similarities
    (larger is better) for ip/cosine and squared distances for l2; missing results are id -1
    with -inf (ip/cosine) or +inf (l2).
    """

    FORMAT = "tqindex.Index"  # the on-disk format name (tqindex.storage's registry)

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "ip",
        bits: int = 4,
        codec: str = "prod",
        rerank: int = 4,
        seed: int = 0,
        device: torch.device | str | None = None,
        keep_originals: bool = True,
        originals: str = "host",
        center: bool = True,
        rotation: str = "haar",
        norm_dtype: str = "float32",
        qjl: str = "orthogonal",
        block_size: int | None = None,
        scan: str = "auto",
    ) -> None:
        self.dim = _check_int(dim, "dim", 2)
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if codec not in _CODECS:
            raise ValueError(f"codec must be one of {_CODECS}, got {codec!r}")
        self.metric = metric
        self.codec_name = codec
        self.rerank = _check_int(rerank, "rerank", 0)
        self.keep_originals = bool(keep_originals)
        if not self.keep_originals and self.rerank > 0:
            raise ValueError(f"rerank={self.rerank} needs the original vectors; with keep_originals=False use rerank=0")
        if originals not in ("host", "device"):
            raise ValueError(f"originals must be 'host' or 'device', got {originals!r}")
        self.originals = originals
        self.center = bool(center)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        if codec == "prod":
            self.codec: TurboQuantMSE | TurboQuantProd = TurboQuantProd(
                self.dim, bits, seed=seed, device=self.device, rotation=rotation, norm_dtype=norm_dtype, qjl=qjl
            )
        else:
            self.codec = TurboQuantMSE(self.dim, bits, seed=seed, device=self.device, rotation=rotation,
                                       norm_dtype=norm_dtype)
        self.bits = self.codec.bits
        self.seed = self.codec.seed
        if block_size is not None:
            self.block_size = _check_int(block_size, "block_size", 1)
        elif self.device.type == "cuda":
            row_bytes = 2 * self.codec.padded_dim * (2 if self.codec.kind == "prod" else 1)
            self.block_size = max(262144, ((1 << 30) // row_bytes) // 128 * 128)
        else:
            self.block_size = 32768
        if scan not in ("auto", "fused", "gemm"):
            raise ValueError(f"scan must be 'auto', 'fused' or 'gemm', got {scan!r}")
        self.scan = scan
        self.mean: torch.Tensor | None = None  # (dim,) float32 on device, set by train()
        self._lock = threading.RLock()
        self._reset_storage()

    # -- storage ---------------------------------------------------------------------------------
    def _reset_storage(self) -> None:
        dev, c = self.device, self.codec
        self._mse = _Growable(torch.empty(0, c.mse_bytes, dtype=torch.uint8, device=dev))
        nd = torch.float16 if c.norm_dtype == "float16" else torch.float32
        self._norms = _Growable(torch.empty(0, dtype=nd, device=dev))
        self._qjl = _Growable(torch.empty(0, c.qjl_bytes, dtype=torch.uint8, device=dev)) if self.codec_name == "prod" else None
        self._gammas = _Growable(torch.empty(0, dtype=nd, device=dev)) if self.codec_name == "prod" else None
        self._ids = _Growable(np.empty(0, dtype=np.int64))
        if not self.keep_originals:
            self._orig: _Growable | None = None
        elif self.originals == "device":
            self._orig = _Growable(torch.empty((0, self.dim), dtype=torch.float32, device=dev))
        else:
            self._orig = _Growable(np.empty((0, self.dim), dtype=np.float32))
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their slots), cached
        self._next_id = 0

    def _columns(self) -> list[_Growable]:
        """Every per-vector column, in one slot order (what removal and reordering must keep aligned)."""
        return [g for g in (self._mse, self._norms, self._qjl, self._gammas, self._ids, self._orig) if g is not None]

    def _layout_changed(self) -> None:
        """Hook: slots were removed or reordered (the inverted-file index recomputes its list offsets)."""

    @property
    def code_size(self) -> int:
        """Bytes of code per vector (packed indices, signs, norms: every byte)."""
        return self.codec.code_size

    @property
    def ntotal(self) -> int:
        return self._ids.n

    def __len__(self) -> int:
        return self._ids.n

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 ids of the stored vectors, in storage order (a copy)."""
        return self._ids.view().copy()

    def _sorted_ids(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted is None:
            ids = self._ids.view()
            order = np.argsort(ids, kind="stable")
            self._sorted = (ids[order], order)
        return self._sorted

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (m,) -> (m,) int64, -1 where absent."""
        s_ids, order = self._sorted_ids()
        if s_ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(s_ids, ids)
        pos_c = np.minimum(pos, s_ids.size - 1)
        found = s_ids[pos_c] == ids
        return np.where(found, order[pos_c], -1)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            return False
        with self._lock:
            return bool(self._slots_of(np.asarray([int(key)], dtype=np.int64))[0] >= 0)

    def _codes_view(self, start: int = 0, stop: int | None = None) -> Codes:
        s = slice(start, stop)
        return Codes(
            self.dim,
            self._mse.view()[s],
            self._norms.view()[s],
            self._qjl.view()[s] if self._qjl is not None else None,
            self._gammas.view()[s] if self._gammas is not None else None,
            codec=self.codec.fingerprint,
        )

    def _code_args(self, start: int = 0, stop: int | None = None) -> CodeArgs:
        """Codes start .. stop with the codec's constants: the scans' one argument."""
        from tqindex.kernels.score import CodeArgs

        c, codec = self._codes_view(start, stop), self.codec
        return CodeArgs(c.mse, c.qjl, c.norms, c.gammas, codec.centroids, codec.mse_bits, codec.padded_dim,
                        float(getattr(codec, "qjl_scale", 0.0)), self.metric == "l2")

    # -- training ----------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return not self.center or self.mean is not None

    def train(self, x: Any) -> None:
        """Learn the centring mean from (n, dim) vectors (after normalisation for cosine).

        Must be called before the first add, or not at all (the first add then trains).
        """
        t, _ = as_matrix(x, self.dim, "x", self.device)
        self._check_range(t, "x")
        with self._lock:
            if len(self) > 0:
                raise ValueError(f"train() must come before the first add; the index holds {len(self)} vectors")
            if t.shape[0] == 0:
                raise ValueError("train() needs at least one vector, got 0")
            if not self.center:
                return
            self.mean = self._normalise(t).double().mean(dim=0).float()

    def _normalise(self, t: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            # Divide by the largest |value| first: the norm of any finite float32 row is then finite.
            t = t / t.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            return t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(1e-30)
        return t

    def _centred(self, t: torch.Tensor) -> torch.Tensor:
        return t - self.mean if self.mean is not None else t

    def _check_range(self, t: torch.Tensor, name: str) -> None:
        """ValueError if a row's norm exceeds :data:`MAX_NORM` (ip and l2 only; one host sync)."""
        if self.metric == "cosine" or t.numel() == 0:
            return
        norms = torch.linalg.vector_norm(t, dim=1)  # float32: overflow shows as inf, which fails too
        bad = ~(norms <= MAX_NORM)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            big = float(torch.linalg.vector_norm(t[row].double()))
            raise ValueError(norm_error(f"{name} row {row}", big))

    # -- mutation ------------------------------------------------------------------------------------
    def add(self, x: Any) -> np.ndarray | torch.Tensor:
        """Add (n, dim) vectors with sequential ids (after the largest id so far); returns the (n,) int64 ids."""
        t, was_numpy = as_matrix(x, self.dim, "x", self.device)
        self._check_range(t, "x")
        with self._lock:
            if self._next_id + t.shape[0] - 1 > _MAX_ID:
                raise ValueError(f"add() numbers vectors from {self._next_id} (after the largest id so far), and "
                                 f"{t.shape[0]} more would pass the largest int64 id {_MAX_ID}; expected "
                                 "add_with_ids() with ids of your own")
            ids = np.arange(self._next_id, self._next_id + t.shape[0], dtype=np.int64)
            self._add(t, ids)
        return ids if was_numpy or not isinstance(x, torch.Tensor) else torch.from_numpy(ids)

    def add_with_ids(self, x: Any, ids: Any) -> None:
        """Add (n, dim) vectors under the given (n,) int64 ids (non-negative, new, unique)."""
        t, _ = as_matrix(x, self.dim, "x", self.device)
        self._check_range(t, "x")
        arr = _as_ids(ids, t.shape[0])
        with self._lock:
            present = self._slots_of(arr) >= 0
            if present.any():
                raise ValueError(f"ids already in the index: {arr[present][:10].tolist()}; remove them first")
            self._add(t, arr)

    def _add(self, t: torch.Tensor, ids: np.ndarray) -> None:
        if t.shape[0] == 0:
            return
        t = self._normalise(t)
        mean = self.mean
        if self.center and mean is None:
            mean = t.double().mean(dim=0).float()  # float64 sum: no overflow, no drift over many rows
        # All work that can fail happens before any state changes (the mean included).
        codes = self.codec.encode(t - mean if mean is not None else t)
        self.mean = mean
        self._append(t, codes, ids)

    def _append(self, t: torch.Tensor, codes: Codes, ids: np.ndarray) -> None:
        """Append encoded rows to every column (nothing here can fail on valid input)."""
        orig = None
        if self._orig is not None:
            orig = t if self.originals == "device" else t.cpu().numpy()
        self._mse.append(codes.mse)
        self._norms.append(codes.norms)
        if self._qjl is not None:
            self._qjl.append(codes.qjl)
            self._gammas.append(codes.gammas)
        if orig is not None:
            self._orig.append(orig)
        self._ids.append(ids)
        self._sorted = None
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove_ids(self, ids: Any) -> int:
        """Remove the vectors with these ids (absent ids are ignored); returns how many were removed."""
        arr = _as_ids(ids, None, unique=False)
        with self._lock:
            if arr.size == 0 or len(self) == 0:
                return 0
            drop = np.isin(self._ids.view(), arr)
            removed = int(drop.sum())
            if removed == 0:
                return 0
            keep = ~drop
            for g in self._columns():
                g.keep(keep)
            self._sorted = None
            self._layout_changed()
            return removed

    def reset(self) -> None:
        """Remove every vector (the trained mean is kept)."""
        with self._lock:
            self._reset_storage()

    def reconstruct_batch(self, ids: Any) -> np.ndarray:
        """(m,) ids -> (m, dim) float32: the stored originals (normalised for cosine), else decoded codes."""
        arr = _as_ids(ids, None, unique=False)
        with self._lock:
            slots = self._slots_of(arr)
            if (slots < 0).any():
                raise KeyError(f"ids not in the index: {arr[slots < 0][:10].tolist()}")
            if self._orig is not None:
                rows = self._orig.view()[slots]
                return rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows.copy()
            codes = self._codes_view()[torch.from_numpy(slots)]
            out = self.codec.decode(codes)
            out = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
            return self._uncentre(out.to(self.device), slots).cpu().numpy()

    def _uncentre(self, decoded: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
        """Decoded codes (m, dim) of ``slots`` -> vectors: add back what was subtracted before coding
        (the mean here; each vector's list centroid in the IVF index)."""
        return decoded + self.mean if self.mean is not None else decoded

    # -- search -----------------------------------------------------------------------------------------
    def search(
        self, q: Any, k: int, rerank: int | None = None, *, filter_ids: Any = None
    ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """k nearest neighbours of each query.

        Args:
            q: (nq, dim) float queries, numpy or torch.
            k: results per query (>= 1).
            rerank: override the index's rescoring factor (0: estimates only).
            filter_ids: optional int64 ids; only these are candidates.
        Returns:
            (D, I), each (nq, k): float32 scores and int64 ids, numpy if q was numpy else torch
            (on q's device). Padded with id -1 and -inf (ip/cosine) / +inf (l2).
        """
        return self._run_search(q, k, rerank, filter_ids)

    def _run_search(self, q: Any, k: int, rerank: int | None, filter_ids: Any, **opts: Any,
                    ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """Validate, search under the lock (``opts`` go to :meth:`_candidates`), return in the type given."""
        was_numpy = isinstance(q, np.ndarray)
        out_device = q.device if isinstance(q, torch.Tensor) else None
        qt, _ = as_matrix(q, self.dim, "queries", self.device)
        self._check_range(qt, "queries")
        k = _check_int(k, "k", 1, _MAX_K)
        rr = self.rerank if rerank is None else _check_int(rerank, "rerank", 0)
        if rr > 0 and self._orig is None:
            raise ValueError(f"rerank={rr} needs the original vectors, but this index has keep_originals=False")
        allowed = None
        if filter_ids is not None:
            allowed_ids = np.unique(_as_ids(filter_ids, None, unique=False))
        with self._lock:
            self._settle()
            if filter_ids is not None:
                allowed = torch.from_numpy(np.isin(self._ids.view(), allowed_ids)).to(self.device)
            D, I = self._search(qt, k, rr, allowed, **opts)
        if was_numpy:
            return D.cpu().numpy(), I.cpu().numpy()
        return D.to(out_device), I.to(out_device)

    def _settle(self) -> None:
        """Bring the slot layout up to date under the lock before slots are read (searches, saves): the
        IVF index makes its lists contiguous here. Nothing to do for the flat index."""

    def _search(self, q: torch.Tensor, k: int, rr: int, allowed: torch.Tensor | None, **opts: Any,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates by estimate (:meth:`_candidates`, the part each index kind has its own), then the
        shared tail: exact rescoring of the best k * rr, top k, slots -> ids, FAISS padding."""
        nq, n = q.shape[0], len(self)
        neg = float("-inf")
        D = torch.full((nq, k), neg, dtype=torch.float32, device=self.device)
        I = torch.full((nq, k), -1, dtype=torch.int64, device=self.device)
        if n == 0 or nq == 0:
            return self._finish(D, I)
        qn = self._normalise(q)
        kc = min(n, k * rr if rr > 0 else k)
        best_s, best_i = self._candidates(qn, kc, allowed, **opts)
        valid = torch.isfinite(best_s)
        sim = self._exact(qn, best_i, valid) if rr > 0 else best_s
        sim = sim.masked_fill(~valid, neg)
        kk = min(k, sim.shape[1])
        v, j = torch.topk(sim, kk, dim=1)
        slots = torch.gather(best_i, 1, j)
        ok = torch.isfinite(v)
        ids = self._ids_of_slots(slots.clamp_min(0))
        D[:, :kk] = v
        I[:, :kk] = torch.where(ok, ids, torch.full_like(slots, -1))
        return self._finish(D, I)

    def _ids_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Ids (on the index's device) of valid ``slots``. The flat index maps them on the host: it moves
        nq * k slots, not the whole id array, to and fro (a device sync)."""
        return torch.from_numpy(self._ids.view()[slots.cpu().numpy()]).to(self.device)

    def _candidates(self, qn: torch.Tensor, kc: int, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``kc`` (estimated similarity, slot) per (normalised) query: ((nq, kc'), (nq, kc') int64).

        Similarity is the estimated <q, x> (ip/cosine) or -||q - x||^2 (l2); missing entries -inf.
        The flat index scans every code in blocks with a running top-kc.
        """
        nq, n = qn.shape[0], len(self)
        neg = float("-inf")
        # l2 is translation invariant: score centred queries; for ip/cosine score the query itself
        # against the centred codes and add back <q, mean>, the same for every vector.
        qc = self._centred(qn) if self.metric == "l2" else qn
        qr, qs = self.codec.rotate(qc)
        best_s = torch.full((nq, 0), neg, device=self.device)
        best_i = torch.zeros((nq, 0), dtype=torch.int64, device=self.device)
        from tqindex.kernels.scan_topk import MAX_M, scan_topk
        from tqindex.kernels.score import use_triton

        kernel = use_triton(self.device) and kc <= MAX_M
        codec = self.codec
        # Measured on an H200 (bench/results/search.md): the fused kernel wins at small dims
        # (GloVe-50: 2.6 ms vs 6 ms), the GEMM scan at 128 and above (1536: 24 ms vs 177 ms).
        method = self.scan if self.scan != "auto" else ("fused" if codec.padded_dim <= 64 else "gemm")
        codes = self._code_args()
        for s in range(0, n, self.block_size):
            e = min(n, s + self.block_size)
            v, i = scan_topk(qr, qs, codes.rows(s, e), m=kc, use_kernel=kernel, method=method,
                             allowed=allowed[s:e] if allowed is not None else None, slot_offset=s)
            best_s = torch.cat([best_s, v], dim=1)
            best_i = torch.cat([best_i, i], dim=1)
            if best_s.shape[1] > kc:
                best_s, j = torch.topk(best_s, kc, dim=1)
                best_i = torch.gather(best_i, 1, j)
        if self.metric == "l2":
            best_s = best_s - (qc * qc).sum(dim=1, keepdim=True)  # = -(estimated squared distance)
        elif self.mean is not None:
            best_s = best_s + (qn @ self.mean).unsqueeze(1)
        return best_s, best_i

    def _exact(self, qn: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Exact similarities (nq, c) of queries against the originals at ``slots`` (nq, c)."""
        store = self._orig.view()
        if isinstance(store, torch.Tensor):
            cand = store.index_select(0, slots.reshape(-1).clamp_min(0))
        else:
            with warnings.catch_warnings():  # a read-only memory map: only read here
                warnings.simplefilter("ignore", UserWarning)
                host = torch.from_numpy(np.asarray(store))  # no copy
            cand = host.index_select(0, slots.reshape(-1).clamp_min(0).cpu()).to(self.device, non_blocking=True)
        cand = cand.reshape(slots.shape[0], slots.shape[1], self.dim)
        if self.metric == "l2":
            return -((cand - qn.unsqueeze(1)) ** 2).sum(dim=2)
        return torch.einsum("qcd,qd->qc", cand, qn)

    def _finish(self, D: torch.Tensor, I: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.metric == "l2":
            D = (-D).clamp_min(0.0)  # similarity -> squared distance; -inf padding -> +inf
        return D, I

    # -- accounting and persistence -------------------------------------------------------------------
    def memory_usage(self) -> dict[str, int]:
        """Bytes held: codes (exactly len * code_size), originals, ids, total."""
        codes = len(self) * self.code_size
        originals = self._orig.n * self.dim * 4 if self._orig is not None else 0
        ids = len(self) * 8
        return {"codes": codes, "originals": originals, "ids": ids, "total": codes + originals + ids}

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild an empty index like this one."""
        return {
            "dim": self.dim,
            "metric": self.metric,
            "bits": self.bits,
            "codec": self.codec_name,
            "rerank": self.rerank,
            "seed": self.seed,
            "keep_originals": self.keep_originals,
            "originals": self.originals,
            "center": self.center,
            "rotation": self.codec.rotation.kind,
            "norm_dtype": self.codec.norm_dtype,
            "qjl": getattr(self.codec, "qjl", "gaussian"),
        }

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        """Arrays a subclass saves beyond the columns, codec and mean (none for the flat index)."""
        return {}

    def _restore_extra(self, get: Any) -> None:
        """Read back what :meth:`_extra_arrays` saved; ``get(name, shape, dtype)`` returns a checked array."""

    def save(self, path: str | Path) -> None:
        """Write the index to directory ``path`` atomically (see :mod:`tqindex.storage`)."""
        from tqindex.storage import save_index

        with self._lock:
            save_index(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None, *, mmap: bool = False) -> "Index":
        """Read an index written by :meth:`save`; ``mmap=True`` memory-maps the originals."""
        from tqindex.storage import load_index

        index = load_index(Path(path), device=device, mmap=mmap)
        if not isinstance(index, cls):
            raise ValueError(f"{path} holds a {type(index).__name__}, not a {cls.__name__}; expected "
                             f"{type(index).__name__}.load (or tqindex.load, which reads either kind)")
        return index

    def __repr__(self) -> str:
        return (
            f"Index(dim={self.dim}, metric={self.metric!r}, codec={self.codec_name!r}, bits={self.bits}, "
            f"rerank={self.rerank}, n={len(self)}, device={self.device})"
        )

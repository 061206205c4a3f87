"""ShardedIndex: one local index per torch.distributed rank, ids placed by a stable hash, exact top-k merge.

Every public method is a collective: each rank of the group calls it at the same point, in the same
order, from one thread (as with any torch.distributed program). Inputs are validated on every rank
before any data moves, and the ranks agree on the outcome (one all_gather of a small header that
carries each rank's error): bad input on one rank raises the same exception type on every rank, so
no rank is left waiting in a collective.

Data movement (``W`` ranks, ``nq`` queries):

- add_with_ids / remove_ids: ids go to their owner ``shard_of(id, W)`` (splitmix64 of the id mod W)
  with one ``all_to_all_single`` of the ids and one of the rows; nothing else travels.
- search: rank 0's queries are broadcast once; each shard searches its local index; one all_gather
  of a fixed (nq, k') block per shard; the merge runs on every rank (each gets the same (D, I)).
  With rescoring (rerank r > 0) k' = k * r and a shard sends its best k' codes by *estimate* with
  their exact scores: the merge keeps the global best k' by estimate, then the best k of those by
  exact score, which is exactly what one index over the union would return (ties aside). Without
  rescoring k' = k.
- train: rank 0 trains its index on its sample; the result (the IVF centroids, or the flat index's
  centring mean) is broadcast, so every shard holds the same codec and the same centroids.

This module reads a few private helpers of :mod:`tqindex.index` / :mod:`tqindex.ivf` (the shared
validators, ``_normalise``, ``_check_range``, ``_slots_of``, ``_set_rotated_centroids``) so that its
validation and rescoring are the local index's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from tqindex.codec import as_matrix
from tqindex.index import _MAX_K, Index, _as_ids, _check_int
from tqindex.storage import write_json_atomic
from tqindex.ivf import IVFIndex

__all__ = ["ShardedIndex", "shard_of"]

log = logging.getLogger(__name__)

FORMAT = "tqindex.ShardedIndex"
VERSION = 1
MANIFEST = "manifest.json"
_MSG_WORDS = 64  # an error message travels as 64 int64 words (512 bytes of UTF-8)
_ERRORS: dict[int, type[Exception]] = {1: TypeError, 2: ValueError, 3: KeyError, 4: RuntimeError}


def shard_of(ids: Any, n_shards: int) -> np.ndarray:
    """Owner shard of each id: splitmix64(id) mod ``n_shards``.

    Args:
        ids: (n,) int64 ids (anything ``numpy.asarray`` turns into integers).
        n_shards: number of shards (>= 1).
    Returns:
        (n,) int64 shard numbers in 0..n_shards-1. The same on every process, machine and Python
        version (unlike ``hash``); consecutive ids spread evenly.
    """
    n_shards = _check_int(n_shards, "n_shards", 1)
    z = np.asarray(ids, dtype=np.int64).reshape(-1).astype(np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps, as the hash wants
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_shards)).astype(np.int64)


def _code_of(e: BaseException) -> int:
    for code, cls in _ERRORS.items():
        if type(e) is cls:
            return code
    return 2 if isinstance(e, ValueError) else 1 if isinstance(e, TypeError) else 4


def _digest(*parts: Any) -> int:
    """A 62-bit digest of strings, bytes and arrays (to compare ranks' states in one int64)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous().numpy()
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(str(p).encode())
        h.update(b"\0")
    return int.from_bytes(h.digest()[:8], "little") >> 2


class _Comm:
    """The collectives of one process group, tensors on the backend's device (CUDA for NCCL, else CPU)."""

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedIndex needs torch.distributed: call torch.distributed.init_process_group() "
                               "first (torchrun sets the rank and world size; 'nccl' on GPUs, 'gloo' on CPUs)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.src = 0 if group is None else dist.get_global_rank(group, 0)  # group rank 0, as a global rank
        backend = str(dist.get_backend(group))
        self.backend = backend
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def agree(self, values: Sequence[int], error: BaseException | None) -> np.ndarray:
        """All-gather each rank's ``values`` and error; if any rank had one, raise it on every rank.

        Args:
            values: m ints (the same m on every rank).
            error: this rank's exception, or None.
        Returns:
            (world, m) int64: row r holds rank r's values.
        Raises:
            the first failing rank's exception type (TypeError, ValueError, KeyError, else
            RuntimeError), with its message prefixed by its rank, on every rank.
        """
        m = len(values)
        buf = np.zeros(1 + m + _MSG_WORDS, dtype=np.int64)
        buf[1 : 1 + m] = np.asarray(values, dtype=np.int64)
        if error is not None:
            buf[0] = _code_of(error)
            text = str(error) if type(error) in _ERRORS.values() else f"{type(error).__name__}: {error}"
            raw = text.encode("utf-8", "replace")[: 8 * _MSG_WORDS]
            buf[1 + m :] = np.frombuffer(raw.ljust(8 * _MSG_WORDS, b"\0"), dtype=np.int64)
        t = torch.from_numpy(buf).to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        rows = torch.stack(out).cpu().numpy()
        bad = np.nonzero(rows[:, 0])[0]
        if bad.size:
            r = int(bad[0])
            msg = rows[r, 1 + m :].tobytes().rstrip(b"\0").decode("utf-8", "replace")
            cls = _ERRORS.get(int(rows[r, 0]), RuntimeError)
            raise cls(f"rank {r} of {self.world}: {msg}") from error
        return rows[:, 1 : 1 + m]

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Group rank 0's ``t`` on every rank (same shape and dtype everywhere) -> a tensor on self.device."""
        t = t.to(self.device).contiguous()
        dist.broadcast(t, self.src, group=self.group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(L...) on each rank -> (world, L...) on self.device."""
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def exchange(self, rows: torch.Tensor, send: np.ndarray, recv: np.ndarray) -> torch.Tensor:
        """all_to_all of rows: ``rows`` (sum(send), ...) sorted by destination, ``send[r]`` of them to rank r;
        returns (sum(recv), ...) with ``recv[r]`` rows from rank r, in rank order."""
        rows = rows.to(self.device).contiguous()
        out = torch.empty((int(recv.sum()), *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        dist.all_to_all_single(out, rows, output_split_sizes=[int(v) for v in recv],
                               input_split_sizes=[int(v) for v in send], group=self.group)
        return out


class ShardedIndex:
    """An index spread over the ranks of a torch.distributed group: one local index per rank.

    Args:
        factory: called once on every rank; returns an empty :class:`tqindex.Index` or
            :class:`tqindex.IVFIndex`, built the same way on every rank (same class, config, seed).
            On GPUs give each rank its own device (``torch.cuda.set_device(local_rank)`` before, or
            ``device=f"cuda:{local_rank}"``).
        group: the process group (default: the world).

    Every method is collective (all ranks call it, in the same order). Set a timeout in
    ``init_process_group(timeout=timedelta(...))`` if a dead peer must not block forever.
    ``len(index)`` is the global count and needs no communication. Results follow
    :meth:`tqindex.Index.search` and equal one index holding the union (same seed and centroids),
    ties aside.
    """

    def __init__(self, factory: Callable[[], Index], group: Any = None) -> None:
        comm = _Comm(group)
        err: BaseException | None = None
        local: Any = None
        try:
            local = factory()
            if not isinstance(local, Index):
                raise TypeError(f"factory must return a tqindex.Index or tqindex.IVFIndex, got {type(local).__name__}")
            if len(local):
                raise ValueError(f"factory returned an index holding {len(local)} vectors; expected an empty one "
                                 "(each vector must live on the shard its id hashes to)")
        except Exception as e:  # the factory is user code: whatever it raises, every rank hears of it
            err = e
        comm.agree([], err)
        self._setup(comm, local, adopt=True)
        self._ntotal = 0
        self._next_id = 0
        self._writes = 0
        self._slot_map: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # -- set-up ----------------------------------------------------------------------------------------
    def _setup(self, comm: _Comm, local: Index, *, adopt: bool) -> None:
        """Check that every rank holds the same kind of index; adopt rank 0's codec and training if asked."""
        self._comm, self.local = comm, local
        cfg = json.dumps({"format": local.FORMAT, **local.config()}, sort_keys=True, default=str)
        sd = local.codec.state_dict()
        keys = sorted(k for k, v in sd.items() if isinstance(v, torch.Tensor))
        rows = comm.agree([_digest(cfg), _digest(*[sd[k] for k in keys]), _digest(*self._training_state())], None)
        if (rows[:, 0] != rows[0, 0]).any():
            r = int(np.nonzero(rows[:, 0] != rows[0, 0])[0][0])
            raise ValueError(f"rank {r} built a different index than rank 0 ({cfg} on this rank); expected the same "
                             "class and config on every rank")
        if (rows[:, 1] != rows[0, 1]).any():
            if not adopt:
                raise ValueError("the shards' codecs differ (rotation or codebook); expected shards saved by one "
                                 "ShardedIndex")
            # Same config, other bits (e.g. another LAPACK's QR): every shard takes rank 0's codec.
            for k in keys:
                sd[k] = comm.broadcast(sd[k]).cpu()
            local.codec = type(local.codec).from_state_dict(sd, device=local.device)
        if (rows[:, 2] != rows[0, 2]).any():
            if not adopt:
                raise ValueError("the shards' trained centroids or means differ; expected shards saved by one "
                                 "ShardedIndex")
            self._share_training()

    def _training_state(self) -> list[Any]:
        local = self.local
        if isinstance(local, IVFIndex):
            c = local.quantizer.centroids
            return ["ivf", c if c is not None else "untrained"]
        return ["flat", local.mean if local.mean is not None else "no mean"]

    def _share_training(self) -> None:
        """Give every shard rank 0's centroids (IVF) or centring mean (flat); both may be absent."""
        local, comm = self.local, self._comm
        if isinstance(local, IVFIndex):
            have = comm.agree([int(local.quantizer.centroids is not None)], None)[0, 0]
            if have:
                c = local.quantizer.centroids if comm.rank == 0 else torch.empty(local.nlist, local.dim)
                c = comm.broadcast(c.float())
                if comm.rank != 0:
                    local.quantizer.set_centroids(c.to(local.device))
                    local._set_rotated_centroids()
        elif local.center:
            have = comm.agree([int(local.mean is not None)], None)[0, 0]
            if have:
                m = local.mean if comm.rank == 0 else torch.empty(local.dim)
                m = comm.broadcast(m.float())
                if comm.rank != 0:
                    local.mean = m.to(local.device)

    # -- properties ------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank in the group (= its shard number)."""
        return self._comm.rank

    @property
    def world_size(self) -> int:
        """Number of ranks = number of shards."""
        return self._comm.world

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def __len__(self) -> int:
        """Vectors held by all shards together (known on every rank without communication)."""
        return self._ntotal

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def metric(self) -> str:
        return self.local.metric

    @property
    def is_trained(self) -> bool:
        return self.local.is_trained

    def memory_usage(self) -> dict[str, int]:
        """Bytes held by this rank's shard (:meth:`tqindex.Index.memory_usage`; not collective)."""
        return self.local.memory_usage()

    # -- training --------------------------------------------------------------------------------------
    def train(self, x: Any = None) -> None:
        """Train on group rank 0's (n, dim) sample; every shard gets its centroids (or mean). Collective.

        Other ranks' ``x`` is ignored (pass None or the same sample). Must come before the first add.
        """
        err: BaseException | None = None
        try:
            if self._ntotal > 0:
                raise ValueError(f"train() must come before the first add; the index holds {self._ntotal} vectors")
            if self._comm.rank == 0:
                self.local.train(x)
        except Exception as e:
            err = e
        self._comm.agree([], err)
        self._share_training()

    # -- writes ----------------------------------------------------------------------------------------
    def add(self, x: Any) -> np.ndarray | torch.Tensor:
        """Add (n, dim) vectors under sequential ids (after the largest so far, rank 0's rows first). Collective.

        Returns this rank's (n,) int64 ids (numpy, or torch if ``x`` was a tensor).
        """
        err: BaseException | None = None
        n = 0
        try:
            n = as_matrix(x, self.dim, "x")[0].shape[0]
        except Exception as e:
            err = e
        counts = self._comm.agree([n], err)[:, 0]
        start = self._next_id + int(counts[: self._comm.rank].sum())
        ids = np.arange(start, start + n, dtype=np.int64)
        self.add_with_ids(x, ids)
        return torch.from_numpy(ids) if isinstance(x, torch.Tensor) else ids

    def add_with_ids(self, x: Any, ids: Any) -> None:
        """Add (n, dim) vectors under (n,) int64 ids; each lands on shard ``shard_of(id)``. Collective.

        Every rank passes its own part (n may be 0 on any rank). The ids must be new and unique over
        all ranks' parts together; otherwise nothing is added anywhere and every rank raises.
        """
        comm, local = self._comm, self.local
        err: BaseException | None = None
        W = comm.world
        send = np.zeros(W, dtype=np.int64)
        t = torch.zeros((0, self.dim))
        arr = np.zeros(0, dtype=np.int64)
        top = -1
        try:
            t, _ = as_matrix(x, self.dim, "x", comm.device)
            local._check_range(t, "x")
            arr = _as_ids(ids, t.shape[0])
            if not local.is_trained and isinstance(local, IVFIndex):
                raise ValueError(f"IVFIndex needs train() before add(): it learns its {local.nlist} list centroids "
                                 "(k-means) from a sample of vectors first")
            owner = shard_of(arr, W)
            order = np.argsort(owner, kind="stable")
            arr, t = arr[order], t[torch.from_numpy(order).to(t.device)]
            send = np.bincount(owner, minlength=W).astype(np.int64)
            top = int(arr.max()) if arr.size else -1
        except Exception as e:  # whatever refuses the input here, every rank hears of it
            err = e
        head = comm.agree([top, *send.tolist()], err)
        sizes = head[:, 1:]  # (W, W): sizes[src, dst]
        if int(sizes.sum()) == 0:
            return
        recv = sizes[:, comm.rank]
        got_ids = comm.exchange(torch.from_numpy(arr), send, recv).cpu().numpy()
        got_x = comm.exchange(t, send, recv)
        try:  # duplicates between ranks meet at their owner; so do ids already stored
            u, c = np.unique(got_ids, return_counts=True)
            if (c > 1).any():
                raise ValueError(f"duplicate ids across the ranks' batches: {u[c > 1][:10].tolist()}")
            with local._lock:
                present = local._slots_of(got_ids) >= 0
            if present.any():
                raise ValueError(f"ids already in the index: {got_ids[present][:10].tolist()}; remove them first")
        except ValueError as e:
            err = e
        comm.agree([], err)
        if local.center and local.mean is None:
            self._global_mean(got_x)
        try:
            local.add_with_ids(got_x.to(local.device), got_ids)
        except Exception as e:  # validated above: a failure here is a bug or a resource limit
            log.error("ShardedIndex rank %d: local add of %d vectors failed", comm.rank, got_ids.size, exc_info=True)
            err = e
        self._after_write(err)
        self._next_id = max(self._next_id, int(head[:, 0].max()) + 1)

    def _global_mean(self, rows: torch.Tensor) -> None:
        """The first add of a centred flat index: the mean over every rank's rows, as one index would take it."""
        local = self.local
        acc = torch.zeros(self.dim + 1, dtype=torch.float64)
        if rows.shape[0]:
            acc[: self.dim] = local._normalise(rows.to(local.device)).double().sum(dim=0).cpu()
            acc[self.dim] = rows.shape[0]
        acc = self._comm.all_reduce_sum(acc).cpu()
        local.mean = (acc[: self.dim] / acc[self.dim]).float().to(local.device)

    def _after_write(self, err: BaseException | None) -> np.ndarray:
        self._writes += 1  # slots may have moved: the id -> slot map is rebuilt at the next search
        rows = self._comm.agree([len(self.local)], err)
        self._ntotal = int(rows[:, 0].sum())
        return rows

    def remove_ids(self, ids: Any) -> int:
        """Remove these ids (absent ones are ignored) wherever they live. Collective.

        Each rank passes its own ids (may be empty; the same id on several ranks is removed once).
        Returns the number removed over all shards (the same on every rank).
        """
        comm = self._comm
        err: BaseException | None = None
        send = np.zeros(comm.world, dtype=np.int64)
        arr = np.zeros(0, dtype=np.int64)
        try:
            arr = _as_ids(ids, None, unique=False)
            owner = shard_of(arr, comm.world)
            arr = arr[np.argsort(owner, kind="stable")]
            send = np.bincount(owner, minlength=comm.world).astype(np.int64)
        except Exception as e:
            err = e
        sizes = comm.agree(send.tolist(), err)
        if int(sizes.sum()) == 0:
            return 0
        got = comm.exchange(torch.from_numpy(arr), send, sizes[:, comm.rank]).cpu().numpy()
        err = None
        try:
            self.local.remove_ids(got)
        except Exception as e:
            err = e
        before = self._ntotal
        self._after_write(err)
        return before - self._ntotal

    # -- search ----------------------------------------------------------------------------------------
    def search(self, q: Any, k: int, rerank: int | None = None, *, nprobe: int | None = None,
               filter_ids: Any = None) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """k nearest neighbours over every shard. Collective.

        Args:
            q: (nq, dim) float queries on group rank 0; other ranks may pass the same queries or None
                (rank 0's are used). ``k``, ``rerank``, ``nprobe`` and whether a filter is given must be
                the same on every rank (a search with other arguments on one rank is refused on all).
            k: results per query (>= 1).
            rerank: override the local indexes' rescoring factor (0: estimates only).
            nprobe: lists scanned per query (IVF shards only).
            filter_ids: optional int64 ids (rank 0's are used, broadcast): only these are candidates.
        Returns:
            (D, I), each (nq, k), the same on every rank: float32 scores and int64 ids as
            :meth:`tqindex.Index.search` gives them (padded with -1 and -inf, or +inf for l2), numpy if
            this rank's ``q`` was numpy (or None and rank 0's was), else torch on ``q``'s device.
        """
        comm, local = self._comm, self.local
        err: BaseException | None = None
        qt = torch.zeros((0, self.dim))
        flt = np.zeros(0, dtype=np.int64)
        kv, rr, kc, p = 0, 0, 0, -1
        try:
            kv = _check_int(k, "k", 1, _MAX_K)
            rr = local.rerank if rerank is None else _check_int(rerank, "rerank", 0)
            if rr > 0 and not local.keep_originals:
                raise ValueError(f"rerank={rr} needs the original vectors, but these shards have keep_originals=False")
            kc = kv * rr if rr > 0 else kv
            if kc > _MAX_K:
                raise ValueError(f"k * rerank = {kc} candidates per shard, above the largest k {_MAX_K}; expected a "
                                 "smaller k or rerank")
            if nprobe is not None:
                if not isinstance(local, IVFIndex):
                    raise TypeError("nprobe applies to IVFIndex shards; these shards are a flat tqindex.Index")
                p = _check_int(nprobe, "nprobe", 1)
            if comm.rank == 0:
                qt, _ = as_matrix(q, self.dim, "queries", comm.device)
                local._check_range(qt, "queries")
                if filter_ids is not None:
                    flt = np.unique(_as_ids(filter_ids, None, unique=False))
        except Exception as e:
            err = e
        kind = 0 if isinstance(q, np.ndarray) else 1 if isinstance(q, torch.Tensor) else 2
        head = comm.agree([kv, rr, p, int(filter_ids is not None), flt.size, qt.shape[0], kind], err)
        if (head[:, :3] != head[0, :3]).any():
            r = int(np.nonzero((head[:, :3] != head[0, :3]).any(axis=1))[0][0])
            raise ValueError(f"search arguments differ between ranks: rank {r} has (k, rerank, nprobe) = "
                             f"{tuple(head[r, :3].tolist())}, rank 0 {tuple(head[0, :3].tolist())} (nprobe -1: "
                             "the index's); expected the same on every rank")
        k = kv
        nq, nf, kind0 = int(head[0, 5]), int(head[0, 4]), int(head[0, 6])
        out_numpy = kind == 0 or (kind == 2 and kind0 == 0)
        out_device = q.device if isinstance(q, torch.Tensor) else local.device
        if nq == 0:
            D, I = self._merge(torch.zeros((comm.world, 0, kc, 2), dtype=torch.int64), k, rr)
        else:
            qb = comm.broadcast(qt if comm.rank == 0 else torch.empty((nq, self.dim)))
            fb = None
            if int(head[0, 3]):
                fb = comm.broadcast(torch.from_numpy(flt) if comm.rank == 0 else torch.empty(nf, dtype=torch.int64))
                fb = fb.cpu().numpy()
            block, status = torch.zeros((nq, kc, 2), dtype=torch.int64), 0
            err = None
            try:
                block = self._local_block(qb.to(local.device), kc, rr, None if p < 0 else p, fb)
            except Exception as e:
                log.error("ShardedIndex rank %d: local search failed", comm.rank, exc_info=True)
                err, status = e, 1
            flat = torch.cat([block.reshape(-1).to(comm.device), torch.tensor([status], device=comm.device)])
            gathered = comm.all_gather(flat)
            failed = np.nonzero(gathered[:, -1].cpu().numpy())[0]
            if failed.size:
                raise RuntimeError(f"rank {int(failed[0])} of {comm.world}: its local search failed (its log has the "
                                   "error)") from err
            D, I = self._merge(gathered[:, :-1].reshape(comm.world, nq, kc, 2), k, rr)
        if out_numpy:
            return D.cpu().numpy(), I.cpu().numpy()
        return D.to(out_device), I.to(out_device)

    def _local_block(self, q: torch.Tensor, kc: int, rr: int, nprobe: int | None,
                     filter_ids: np.ndarray | None) -> torch.Tensor:
        """This shard's best ``kc`` by estimate: (nq, kc, 2) int64 of [id, (estimate, exact) as two float32].

        Scores are similarities (larger is better; -||q - x||^2 for l2); -inf (and id -1) pads.
        """
        local = self.local
        opts = {} if nprobe is None else {"nprobe": nprobe}
        D, I = local.search(q, kc, 0, filter_ids=filter_ids, **opts)
        est = -D if local.metric == "l2" else D
        exact = self._exact(q, I) if rr > 0 else est
        scores = torch.stack([est.float(), exact.float()], dim=2).contiguous().view(torch.int64)  # (nq, kc, 1)
        return torch.cat([I.unsqueeze(2), scores], dim=2)

    def _exact(self, q: torch.Tensor, I: torch.Tensor) -> torch.Tensor:
        """Exact similarities (nq, kc) of queries against this shard's originals of ids ``I`` (-1: -inf)."""
        local = self.local
        valid = I >= 0
        cand = self._originals(I.reshape(-1)).reshape(*I.shape, self.dim)
        qn = local._normalise(q)
        if local.metric == "l2":
            sim = -((cand - qn.unsqueeze(1)) ** 2).sum(dim=2)
        else:
            sim = torch.einsum("qcd,qd->qc", cand, qn)
        return sim.masked_fill(~valid, float("-inf"))

    def _originals(self, ids: torch.Tensor) -> torch.Tensor:
        """(m,) ids held by this shard (-1: padding) -> (m, dim) float32 originals (normalised for cosine; padding
        rows are any row) on the shard's device.

        Originals on the device (``originals="device"``) are gathered there through a device map of
        id -> slot kept until the next write (16 bytes per vector); otherwise (host memory, a memory
        map) through :meth:`tqindex.Index.reconstruct_batch`.
        """
        local = self.local
        if len(local) == 0:
            return torch.zeros((ids.numel(), local.dim), dtype=torch.float32, device=local.device)
        orig = getattr(local, "_orig", None)
        store = orig.view() if orig is not None else None
        if isinstance(store, torch.Tensor) and store.shape == (len(local), local.dim):
            if self._slot_map is None or self._slot_map[0] != self._writes:
                stored = torch.from_numpy(local.ids).to(store.device)  # storage (slot) order, settled by the search
                sorted_ids, order = torch.sort(stored)
                self._slot_map = (self._writes, sorted_ids, order)
            _, sorted_ids, order = self._slot_map
            pos = torch.searchsorted(sorted_ids, ids.to(store.device)).clamp_max(len(local) - 1)
            return store.index_select(0, order[pos]).to(local.device)
        arr = ids.cpu().numpy()
        ok = arr >= 0
        rows = np.zeros((arr.size, local.dim), dtype=np.float32)
        rows[ok] = local.reconstruct_batch(arr[ok])
        return torch.from_numpy(rows).to(local.device)

    def _merge(self, blocks: torch.Tensor, k: int, rr: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, nq, kc, 2) shard blocks -> (D, I) (nq, k): the best kc by estimate, then the best k by exact
        score (or by estimate when rr == 0), FAISS padding and l2 distances as :class:`tqindex.Index`."""
        W, nq, kc = blocks.shape[0], blocks.shape[1], blocks.shape[2]
        ids = blocks[..., 0].permute(1, 0, 2).reshape(nq, W * kc)
        sc = blocks[..., 1:].contiguous().view(torch.float32).reshape(W, nq, kc, 2).permute(1, 0, 2, 3)
        est, exact = sc[..., 0].reshape(nq, W * kc), sc[..., 1].reshape(nq, W * kc)
        neg = float("-inf")
        if rr > 0 and W * kc > 0:
            e, j = torch.topk(est, min(kc, W * kc), dim=1)  # the candidates one index over the union would keep
            sim = exact.gather(1, j).masked_fill(~torch.isfinite(e), neg)
            ids = ids.gather(1, j)
        else:
            sim = est
        D = torch.full((nq, k), neg, dtype=torch.float32, device=blocks.device)
        I = torch.full((nq, k), -1, dtype=torch.int64, device=blocks.device)
        kk = min(k, sim.shape[1])
        if kk:
            v, j = torch.topk(sim, kk, dim=1)
            ok = torch.isfinite(v)
            D[:, :kk] = v
            I[:, :kk] = torch.where(ok, ids.gather(1, j), torch.full_like(j, -1))
        if self.metric == "l2":
            D = (-D).clamp_min(0.0)
        return D, I

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write every shard to ``path``: ``g<G>/shard-<rank>/`` per shard (tqindex's format) and a manifest.

        Collective. Rank 0 writes ``manifest.json`` last (after every shard is written), so a crash
        leaves the previous generation readable. ``path`` may be a shared file system, or local on
        each host (rank 0's holds the manifest, each rank its own shard).
        """
        comm, path = self._comm, Path(path)
        err: BaseException | None = None
        gen = 0
        try:
            if path.exists() and not path.is_dir():
                raise ValueError(f"save path {path} exists and is not a directory; expected a directory or a new path")
            if comm.rank == 0:
                old = _read_manifest(path)
                gen = int(old["generation"]) + 1 if old else 1
        except (TypeError, ValueError, OSError) as e:
            err = e
        gen = int(comm.agree([gen], err)[0, 0])
        err = None
        try:
            self.local.save(path / f"g{gen}" / _shard_dir(comm.rank))
        except (ValueError, OSError) as e:
            err = e
        sizes = comm.agree([len(self.local)], err)[:, 0]
        err = None
        try:
            if comm.rank == 0:
                manifest = {
                    "format": FORMAT, "version": VERSION, "generation": gen, "shards": comm.world,
                    "placement": "splitmix64(id) mod shards", "index": self.local.FORMAT,
                    "config": self.local.config(), "n": int(sizes.sum()), "shard_sizes": sizes.tolist(),
                    "next_id": self._next_id,
                    "shard_dirs": [f"g{gen}/{_shard_dir(r)}" for r in range(comm.world)],
                }
                write_json_atomic(path / MANIFEST, manifest)
        except OSError as e:
            err = e
        comm.agree([], err)
        for old in path.glob(f"g*/{_shard_dir(comm.rank)}"):  # each rank drops its older generations
            if old.parent.name != f"g{gen}":
                shutil.rmtree(old, ignore_errors=True)
        comm.agree([], None)
        if comm.rank == 0:
            for old in path.glob("g*"):
                if old.is_dir() and old.name != f"g{gen}":
                    try:
                        old.rmdir()  # empty once every rank removed its shard
                    except OSError:
                        pass

    @classmethod
    def load(cls, path: str | Path, group: Any = None, *, device: torch.device | str | None = None,
             mmap: bool = False) -> "ShardedIndex":
        """Read a ShardedIndex written by :meth:`save`. Collective; the group must have as many ranks as
        the saved index has shards (ids are placed by hash modulo the shard count).

        ``device``: where this rank's shard lives (default: this rank's GPU under NCCL, else tqindex's
        default). ``mmap``: memory-map the originals (see :meth:`tqindex.Index.load`).
        """
        from tqindex.storage import load_index

        comm, path = _Comm(group), Path(path)
        err: BaseException | None = None
        vals = [0, 0, 0, 0]
        try:
            if comm.rank == 0:
                man = _read_manifest(path)
                if man is None:
                    raise ValueError(f"{path} has no {MANIFEST} of a ShardedIndex; expected a directory written by "
                                     "ShardedIndex.save")
                vals = [int(man["shards"]), int(man["generation"]), int(man["n"]), int(man["next_id"])]
        except (ValueError, KeyError, TypeError, OSError) as e:
            err = e if isinstance(e, ValueError) else ValueError(f"{path / MANIFEST} is not a valid manifest ({e!r})")
        shards, gen, n, next_id = (int(v) for v in comm.agree(vals, err)[0])
        if shards != comm.world:
            raise ValueError(f"{path} holds {shards} shards, but this process group has {comm.world} ranks; expected "
                             f"a group of {shards} ranks (torchrun --nproc-per-node {shards}): each id lives on the "
                             "shard its hash modulo the shard count names")
        if device is None and comm.backend == "nccl":
            device = comm.device
        local: Any = None
        err = None
        try:
            local = load_index(path / f"g{gen}" / _shard_dir(comm.rank), device=device, mmap=mmap)
            wrong = shard_of(local.ids, shards) != comm.rank
            if wrong.any():
                raise ValueError(f"shard {comm.rank} of {path} holds ids of other shards "
                                 f"({local.ids[wrong][:5].tolist()}); expected shard directories in rank order")
        except (ValueError, OSError) as e:
            err = e
        rows = comm.agree([len(local) if local is not None else 0], err)
        self = cls.__new__(cls)
        self._setup(comm, local, adopt=False)
        self._ntotal = int(rows[:, 0].sum())
        if self._ntotal != n:
            raise ValueError(f"{path}: the shards hold {self._ntotal} vectors, the manifest says {n}")
        self._next_id = next_id
        self._writes = 0
        self._slot_map = None
        return self

    def __repr__(self) -> str:
        return (f"ShardedIndex(shards={self.world_size}, rank={self.rank}, n={self._ntotal}, "
                f"local={self.local!r})")


def _shard_dir(rank: int) -> str:
    return f"shard-{rank:05d}"


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The ShardedIndex manifest in ``path``, None when there is none (ValueError when it is another kind)."""
    m = path / MANIFEST
    if not m.is_file():
        return None
    try:
        man = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{m} is not valid JSON ({e}); expected a ShardedIndex manifest") from None
    if man.get("format") != FORMAT:
        raise ValueError(f"{path} holds a {man.get('format')!r}, not a {FORMAT}; expected a directory written by "
                         "ShardedIndex.save (tqindex.load reads a single index)")
    if man.get("version") != VERSION:
        raise ValueError(f"{m}: ShardedIndex format version {man.get('version')!r}; this tqindex reads {VERSION}")
    return man

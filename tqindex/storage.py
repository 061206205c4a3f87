"""On-disk format of an Index: a directory with a JSON manifest and .npy tensors, written atomically.

Format version 2 (``manifest.json``; version 1 is the same without ``sha256`` and was flat only)::

    {"format": "tqindex.Index" | "tqindex.IVFIndex", "version": 2, "generation": G,
     "config": {...index.config()}, "codec": {...}, "n": int, "next_id": int,
     "files": {"mse": "g<G>.mse.npy", ...}, "sha256": {"mse": hex, ...}}

The format name picks the class (a registry); each class adds its own arrays (the IVF index: the
list of every slot and the centroids) through ``_extra_arrays`` / ``_restore_extra``.

Each save writes a new generation of files (``g<G>.<name>.npy``, fsynced), then replaces
``manifest.json`` in one ``os.replace`` (the commit point), fsyncs the directory and deletes the
older generations. A crash at any moment leaves a manifest that names a complete generation.

The manifest also holds ``"sha256": {name: hex digest}`` of every file (older
v1 directories without it still load). Loading checks every digest, then every array's dtype and
shape against the manifest and the codec (n rows, code bytes, dim), ids unique and non-negative,
and floats finite: a damaged or truncated file is a ValueError naming it, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from tqindex.index import Index

__all__ = ["FORMAT", "VERSION", "save_index", "load_index"]

FORMAT = "tqindex.Index"
VERSION = 2
READS = (1, 2)
MANIFEST = "manifest.json"


def _registry() -> dict[str, type]:
    """Format name -> index class."""
    from tqindex.index import Index
    from tqindex.ivf import IVFIndex

    return {Index.FORMAT: Index, IVFIndex.FORMAT: IVFIndex}


def write_json_atomic(target: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``target`` all or nothing: a fsynced temporary file, one os.replace, then
    the directory fsynced (a crash leaves the old file or the new one, never a torn one)."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashing:
    """A binary file wrapper that hashes what is written through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.h = f, hashlib.sha256()

    def write(self, b: Any) -> int:
        self.h.update(b)
        return self.f.write(b)


def _write_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy, fsynced; returns the file's SHA-256 hex digest."""
    with open(path, "wb") as f:
        w = _Hashing(f)
        np.save(w, np.ascontiguousarray(arr), allow_pickle=False)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    return w.h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    m = path / MANIFEST
    if not m.exists():
        return None
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{m} is not valid JSON ({e}); expected a tqindex manifest") from None


def save_index(index: "Index", path: Path) -> None:
    """Write ``index`` to directory ``path`` (created if needed) atomically."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"save path {path} exists and is not a directory; expected a directory (or a new path)")
    path.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(path)
    if old is not None and old.get("format") not in _registry():
        raise ValueError(f"{path} holds something other than a tqindex index (format {old.get('format')!r})")
    gen = int(old["generation"]) + 1 if old else 1
    index._settle()  # the final slot order before any column is read
    arrays: dict[str, np.ndarray] = {
        "ids": index._ids.view(),
        "mse": index._mse.view().cpu().numpy(),
        "norms": index._norms.view().cpu().numpy(),
    }
    if index._qjl is not None:
        arrays["qjl"] = index._qjl.view().cpu().numpy()
        arrays["gammas"] = index._gammas.view().cpu().numpy()
    if index._orig is not None:
        o = index._orig.view()
        arrays["originals"] = o.cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
    if index.mean is not None:
        arrays["mean"] = index.mean.cpu().numpy()
    arrays.update(index._extra_arrays())
    codec_sd = index.codec.state_dict()
    for key, val in codec_sd.items():
        if isinstance(val, torch.Tensor):
            arrays[f"codec_{key}"] = val.numpy()
    files, digests = {}, {}
    for name, arr in arrays.items():
        fname = f"g{gen}.{name}.npy"
        digests[name] = _write_npy(path / fname, arr)
        files[name] = fname
    manifest = {
        "format": type(index).FORMAT,
        "version": VERSION,
        "generation": gen,
        "config": index.config(),
        "codec": codec_sd["config"],
        "n": len(index),
        "next_id": index._next_id,
        "files": files,
        "sha256": digests,
    }
    write_json_atomic(path / MANIFEST, manifest)
    keep = set(files.values()) | {MANIFEST}
    for p in path.iterdir():
        if p.name not in keep and p.name.startswith("g") and p.name.endswith(".npy"):
            p.unlink(missing_ok=True)


def load_index(path: str | Path, device: torch.device | str | None = None, mmap: bool = False) -> "Index":
    """Read an index saved by :func:`save_index` (any supported version and kind) onto ``device``."""
    path = Path(path)
    from tqindex.codec import TurboQuantMSE, TurboQuantProd
    from tqindex.index import _Growable

    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; expected a directory written by Index.save")
    man = _read_manifest(path)
    if man is None:
        raise ValueError(f"{path} has no {MANIFEST}; expected a directory written by Index.save")
    classes = _registry()
    if man.get("format") not in classes:
        raise ValueError(f"{path}: format {man.get('format')!r}, expected one of {sorted(classes)}")
    if man.get("version") not in READS or (man.get("version") == 1 and man["format"] != FORMAT):
        raise ValueError(f"{path}: format version {man.get('version')!r} of {man['format']} is not supported "
                         f"(this tqindex reads versions {READS})")
    files = man["files"]
    digests = man.get("sha256") or {}
    for name, fname in files.items():
        f = path / fname
        if not f.is_file():
            raise ValueError(f"{f} is missing; the manifest {path / MANIFEST} names it for {name!r}")
        if name in digests and _sha256(f) != digests[name]:
            raise ValueError(f"{f} is damaged: its SHA-256 differs from the one in {path / MANIFEST}")

    def arr(name: str, mm: bool = False) -> np.ndarray:
        f = path / files[name]
        try:
            return np.load(f, mmap_mode="r" if mm else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{f} is not a readable .npy array ({e})") from None

    def check(name: str, a: np.ndarray, shape: tuple[int, ...], dtype: Any, finite: bool = False) -> np.ndarray:
        want = np.dtype(dtype)
        if a.shape != shape or a.dtype != want:
            raise ValueError(f"{path / files[name]} holds {a.dtype} {a.shape}; expected {want} {shape} "
                             f"(n={man.get('n')} in the manifest)")
        if finite and a.size and not np.isfinite(a).all():
            raise ValueError(f"{path / files[name]} holds NaN or Inf; expected finite values")
        return a

    cfg = dict(man["config"])
    index = classes[man["format"]](cfg.pop("dim"), device=device, **cfg)
    sd: dict[str, Any] = {"config": man["codec"]}
    for name in files:
        if name.startswith("codec_"):
            sd[name[len("codec_"):]] = torch.from_numpy(arr(name))
    cls = TurboQuantProd if man["codec"]["kind"] == "prod" else TurboQuantMSE
    index.codec = cls.from_state_dict(sd, device=index.device)
    codec = index.codec
    dev = index.device
    n = int(man["n"])
    nd = np.float16 if codec.norm_dtype == "float16" else np.float32
    needed = ["ids", "mse", "norms"] + (["qjl", "gammas"] if index.codec_name == "prod" else []) + \
        (["originals"] if index.keep_originals else [])
    missing = [k for k in needed if k not in files]
    if missing:
        raise ValueError(f"{path / MANIFEST} names no file for {missing}; expected {needed} for this config")
    ids = check("ids", arr("ids"), (n,), np.int64)
    if n and (int(ids.min()) < 0 or np.unique(ids).size != n):
        raise ValueError(f"{path / files['ids']} holds negative or repeated ids; expected {n} distinct ids >= 0")
    next_id = int(man["next_id"])
    if n and next_id <= int(ids.max()):
        raise ValueError(f"{path / MANIFEST}: next_id {next_id} is not above the largest id {int(ids.max())}")
    index._ids = _Growable(ids)
    index._mse = _Growable(torch.from_numpy(check("mse", arr("mse"), (n, codec.mse_bytes), np.uint8)).to(dev))
    index._norms = _Growable(torch.from_numpy(check("norms", arr("norms"), (n,), nd, finite=True)).to(dev))
    if index.codec_name == "prod":
        index._qjl = _Growable(torch.from_numpy(check("qjl", arr("qjl"), (n, codec.qjl_bytes), np.uint8)).to(dev))
        index._gammas = _Growable(torch.from_numpy(check("gammas", arr("gammas"), (n,), nd, finite=True)).to(dev))
    if index.keep_originals:
        orig = check("originals", arr("originals", mm=mmap and index.originals != "device"), (n, index.dim),
                     np.float32, finite=True)
        index._orig = _Growable(torch.from_numpy(orig).to(dev) if index.originals == "device" else orig)
    if "mean" in files:
        index.mean = torch.from_numpy(check("mean", arr("mean"), (index.dim,), np.float32, finite=True)).to(dev)
    index._next_id = next_id
    index._restore_extra(lambda name, shape, dtype: check(name, arr(name), shape, dtype, finite=True))
    index._sorted = None
    return index

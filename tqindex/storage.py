"""On-disk format of an Index: a directory with a JSON manifest and .npy tensors, written atomically.

Format version 1 (``manifest.json``)::

    {"format": "tqindex.Index", "version": 1, "generation": G, "config": {...Index.config()},
     "n": int, "next_id": int, "files": {"mse": "g<G>.mse.npy", ...}}

Each save writes a new generation of files (``g<G>.<name>.npy``, fsynced), then replaces
``manifest.json`` in one ``os.replace`` (the commit point), fsyncs the directory and deletes the
older generations. A crash at any moment leaves a manifest that names a complete generation.
"""

from __future__ import annotations

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
VERSION = 1
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


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
    if old is not None and old.get("format") != FORMAT:
        raise ValueError(f"{path} holds something other than a tqindex index (format {old.get('format')!r})")
    gen = int(old["generation"]) + 1 if old else 1
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
    codec_sd = index.codec.state_dict()
    for key, val in codec_sd.items():
        if isinstance(val, torch.Tensor):
            arrays[f"codec_{key}"] = val.numpy()
    files = {}
    for name, arr in arrays.items():
        fname = f"g{gen}.{name}.npy"
        _write_npy(path / fname, arr)
        files[name] = fname
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "generation": gen,
        "config": index.config(),
        "codec": codec_sd["config"],
        "n": len(index),
        "next_id": index._next_id,
        "files": files,
    }
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)
    keep = set(files.values()) | {MANIFEST}
    for p in path.iterdir():
        if p.name not in keep and p.name.startswith("g") and p.name.endswith(".npy"):
            p.unlink(missing_ok=True)


def load_index(path: Path, device: torch.device | str | None = None, mmap: bool = False) -> "Index":
    """Read an index saved by :func:`save_index` (any supported version) onto ``device``."""
    from tqindex.codec import TurboQuantMSE, TurboQuantProd
    from tqindex.index import Index, _Growable

    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; expected a directory written by Index.save")
    man = _read_manifest(path)
    if man is None:
        raise ValueError(f"{path} has no {MANIFEST}; expected a directory written by Index.save")
    if man.get("format") != FORMAT:
        raise ValueError(f"{path}: format {man.get('format')!r}, expected {FORMAT!r}")
    if man.get("version") != VERSION:
        raise ValueError(f"{path}: format version {man.get('version')!r} is not supported (this tqindex reads {VERSION})")
    files = man["files"]

    def arr(name: str, mm: bool = False) -> np.ndarray:
        return np.load(path / files[name], mmap_mode="r" if mm else None, allow_pickle=False)

    cfg = dict(man["config"])
    index = Index(cfg.pop("dim"), device=device, **cfg)
    sd: dict[str, Any] = {"config": man["codec"]}
    for name in files:
        if name.startswith("codec_"):
            sd[name[len("codec_"):]] = torch.from_numpy(arr(name))
    cls = TurboQuantProd if man["codec"]["kind"] == "prod" else TurboQuantMSE
    index.codec = cls.from_state_dict(sd, device=index.device)
    dev = index.device
    n = int(man["n"])
    ids = arr("ids")
    if ids.shape != (n,):
        raise ValueError(f"{path}: ids hold {ids.shape[0]} entries, the manifest says {n}")
    index._ids = _Growable(ids.astype(np.int64))
    index._mse = _Growable(torch.from_numpy(arr("mse")).to(dev))
    index._norms = _Growable(torch.from_numpy(arr("norms")).to(dev))
    if "qjl" in files:
        index._qjl = _Growable(torch.from_numpy(arr("qjl")).to(dev))
        index._gammas = _Growable(torch.from_numpy(arr("gammas")).to(dev))
    if "originals" in files:
        if index.originals == "device":
            index._orig = _Growable(torch.from_numpy(arr("originals")).to(dev))
        else:
            index._orig = _Growable(arr("originals", mm=mmap))
    if "mean" in files:
        index.mean = torch.from_numpy(arr("mean")).to(dev)
    index._next_id = int(man["next_id"])
    index._sorted = None
    return index

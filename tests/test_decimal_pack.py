"""scripts/decimal_pack.py: lossless round trip of float32 arrays with decimal-text values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "decimal_pack", Path(__file__).resolve().parents[1] / "scripts" / "decimal_pack.py")
dp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dp)


def _decimal_like(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    digits = rng.integers(-99999, 100000, size=(300, 7))
    scale = 10.0 ** rng.integers(-9, -2, size=(300, 7)).astype(np.float64)
    return (digits * scale).astype(np.float32)


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    x = _decimal_like(0)
    x[3, 4] = np.float32(np.pi)  # short form with 9 digits
    x[5, 0] = np.float32(1e-30)  # no form m * 10**e with e >= -12: a raw exception
    z = dp.pack(x)
    assert 1 <= len(z["exc_index"]) <= 2
    assert np.array_equal(dp.unpack(z).view(np.uint32), x.view(np.uint32))
    src, packed, out = tmp_path / "x.npy", tmp_path / "x.npz", tmp_path / "y.npy"
    np.save(src, x)
    assert dp.main(["pack", str(src), str(packed)]) == 0
    assert dp.main(["unpack", str(packed), str(out)]) == 0
    assert np.array_equal(np.load(out).view(np.uint32), x.view(np.uint32))


def test_corruption_is_detected() -> None:
    z = dp.pack(_decimal_like(1))
    z["low"] = z["low"].copy()
    z["low"][0, 0] ^= 1
    with pytest.raises(ValueError, match="SHA-256"):
        dp.unpack(z)


def test_rejects_non_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        dp.pack(np.zeros(4, np.float64))

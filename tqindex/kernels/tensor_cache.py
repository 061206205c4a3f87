"""A function of a constant tensor memoised per tensor: the tables a kernel reads that derive from a
codec's rotation, codebook or boundaries, built once instead of on every call (a decode step's hot path).

The key is the tensor's storage address, in-place version counter, shape and device, and the tensor
object itself (kept alive by the cache, so its address cannot be reused by another while cached), plus
the other arguments. An in-place change of the tensor bumps its version: the table is built again.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["per_tensor"]

R = TypeVar("R")


def per_tensor(fn: Callable[..., R]) -> Callable[..., R]:
    """Decorator: ``fn(t, *args)`` (t a tensor, args hashable) memoised as described above (256 entries)."""

    @functools.lru_cache(maxsize=256)
    def cached(ptr: int, version: int, shape: tuple[int, ...], device: str, t: torch.Tensor, *args: Any) -> R:
        return fn(t, *args)

    @functools.wraps(fn)
    def wrapper(t: torch.Tensor, *args: Any) -> R:
        return cached(t.data_ptr(), t._version, tuple(t.shape), str(t.device), t, *args)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper

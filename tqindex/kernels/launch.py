"""Low-overhead launches of compiled Triton kernels for per-token work (the KV cache's decode step).

``kernel[grid](*args, **kw)`` costs 35-50 us of host time per launch on the H200 machine's CPU
(bench/results/kv_host_h200.md), about what a whole SDPA call costs there: binding and specialising
every argument, the cache key, a check of the kernel's globals. A decode step launches a few kernels
per layer, so that time was a large part of the step. :func:`launch` keeps compiled kernels in a
dict the caller owns (a layer's decode plan), under a key the caller gives, and launches the
compiled kernel directly through its launcher (what ``CompiledKernel[grid](*args)`` does).

The caller's key must determine everything Triton specialises the kernel on apart from the 16-byte
alignment of tensor arguments, which :func:`launch` checks itself on every call: the dtypes of the
tensors, each int argument's :func:`int_spec` (divisible by 16, equal to 1, 32 or 64 bits) unless
the caller knows it fixed for the cache's lifetime, and the values of every keyword argument (the
constexprs and options: a seen key reuses the ones it was first called with). A key it has not
seen, another current device than the one it was compiled for, a tensor that lost the alignment it
was compiled with, Triton's interpreter, or a kernel without the attributes used here take
``kernel[grid]`` (which compiles or finds the kernel).
Not done: Triton's check that a kernel's globals did not change since it was compiled (this
project's kernels read none that change).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Hashable, TypeVar

import torch

__all__ = ["follows_device", "int_spec", "launch", "on_device", "resident_programs"]

_F = TypeVar("_F", bound=Callable[..., Any])

try:  # what Triton's own CUDA driver calls for the current stream (the public call builds a Stream object)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - other torch builds
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def on_device(t: Any) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(t.device)`` when tensor ``t`` is on a CUDA device other than the current one, else a
    no-op. Triton compiles for and launches on the current device; a model split over GPUs (accelerate's
    device_map) or an index placed on ``cuda:1`` runs with another device current."""
    if getattr(t, "is_cuda", False) and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def follows_device(fn: _F) -> _F:
    """Decorator: ``fn`` runs under :func:`on_device` of its first argument (a tensor, or codes whose ``mse``
    tensor says where they are: :class:`tqindex.kernels.score.CodeArgs` and its subclasses)."""

    @functools.wraps(fn)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
        with on_device(first if hasattr(first, "is_cuda") else getattr(first, "mse", None)):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def int_spec(v: int) -> int:
    """What Triton's specialisation can see of an int argument, as one small int (a superset of it):
    divisible by 16, equal to 1, beyond 32 bits, negative."""
    return (v & 15 == 0) | (v == 1) << 1 | (not -0x80000000 <= v <= 0x7FFFFFFF) << 2 | (v < 0) << 3


class _Entry:
    __slots__ = ("kernel", "tail", "aligned", "device")

    def __init__(self, kernel: Any, tail: tuple, aligned: tuple[int, ...], device: int) -> None:
        self.kernel, self.tail, self.aligned, self.device = kernel, tail, aligned, device


def _set(hook: Any) -> Any:
    """``hook``, or None where no hook is set: newer Tritons keep an empty ``HookChain`` (its ``calls`` list)
    instead of None, so passing it on would build launch metadata and call into Python for every launch."""
    if hook is None or getattr(hook, "calls", True) == []:
        return None
    return hook


def _hooks() -> tuple[Any, Any]:
    """Triton's launch enter / exit hooks, each None when none is set."""
    try:
        from triton import knobs

        return _set(knobs.runtime.launch_enter_hook), _set(knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        return None, None


def launch(fn: Any, grid: tuple[int, ...], *args: Any, cache: dict | None = None, key: Hashable = None,
           **kwargs: Any) -> None:
    """``fn[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel; with ``cache`` and ``key``, the host cost of
    one compiled launch (see the module docstring for what ``key`` must determine).

    Args:
        fn: the JIT function (the kernel).
        grid: (programs,) or up to 3 dimensions.
        args: the kernel's leading arguments, positionally; kwargs: the rest by name (the constexprs) and
            launch options (num_warps, ...).
        cache: a dict the caller keeps (and drops with what the key is relative to); None: plain launch.
        key: hashable, with ``cache``.
    """
    entry = cache.get(key) if cache is not None else None
    if entry is not None:
        device = torch.cuda.current_device()  # Triton compiles and launches for the current device
        if device == entry.device and all(args[i].data_ptr() & 15 == 0 for i in entry.aligned):
            tail = entry.tail  # the keyword arguments' values: determined by the key
            k = entry.kernel
            enter, leave = _hooks()
            g0 = grid[0]
            g1 = grid[1] if len(grid) > 1 else 1
            g2 = grid[2] if len(grid) > 2 else 1
            stream = _raw_stream(device)
            meta = k.launch_metadata(grid, stream, *args, *tail) if enter is not None else None
            k.run(g0, g1, g2, stream, k.function, k.packed_metadata, meta, enter, leave, *args, *tail)
            return
        entry = None  # another device, or a tensor lost its alignment: Triton picks the kernel
        cache = None
    kernel = fn[grid](*args, **kwargs)
    if cache is None or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return
    if hasattr(kernel, "result"):
        kernel = kernel.result()
    names = getattr(fn, "arg_names", None)
    if kernel is None or names is None or not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
        return
    tail = tuple(names[len(args):])
    if not all(n in kwargs for n in tail):
        return
    tail = tuple(kwargs[n] for n in tail)
    if hasattr(kernel, "_init_handles"):
        kernel._init_handles()  # loads the module (what CompiledKernel[grid] does first)
    aligned = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.data_ptr() & 15 == 0)
    cache[key] = _Entry(kernel, tail, aligned, torch.cuda.current_device())


def resident_programs(kernel: Any, num_warps: int, device: int) -> int:
    """How many programs of a compiled kernel one multiprocessor of CUDA ``device`` holds at once.

    From the kernel's registers per thread (allocated per warp in units of 256) and shared memory per
    program (plus the 1 KiB the hardware reserves per block), against the device's registers, shared
    memory and threads per multiprocessor; at least 1. ``kernel``: a loaded ``CompiledKernel`` (``n_regs``,
    ``metadata.shared``)."""
    props = torch.cuda.get_device_properties(device)
    regs = max(1, int(getattr(kernel, "n_regs", 0) or 0))
    shared = int(getattr(getattr(kernel, "metadata", None), "shared", 0) or 0)
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * num_warps)
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))

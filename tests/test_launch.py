"""tqindex.kernels.launch: which calls reuse a compiled kernel and which go through Triton's own launch.

A stand-in JIT function and compiled kernel record every call (no GPU here); the GPU tests of the
decode and encode kernels run the real thing through the same launcher.
"""

from __future__ import annotations

import pytest
import torch

from tqindex.kernels import launch as L


class _Compiled:
    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self, log: list) -> None:
        self.log = log

    def _init_handles(self) -> None:
        self.log.append(("init",))

    def launch_metadata(self, grid, stream, *args):
        self.log.append(("metadata",))
        return "launch-meta"

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, leave, *args):
        assert (function, packed) == ("fn-handle", "meta")
        self.log.append(("fast", (g0, g1, g2), args, stream))
        self.hooks = (meta, enter, leave)


class _Jit:
    """Signature (A, n, s, BLOCK: constexpr)."""

    arg_names = ["A", "n", "s", "BLOCK"]

    def __init__(self) -> None:
        self.log: list = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)

        return run


@pytest.fixture
def cuda_stub(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(L, "_raw_stream", lambda index: 1234)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _kinds(fn: _Jit) -> list[str]:
    return [e[0] for e in fn.log if e[0] not in ("init", "metadata")]


def test_a_seen_key_launches_the_compiled_kernel_with_every_argument(cuda_stub) -> None:
    fn, a, cache = _Jit(), torch.zeros(64), {}
    L.launch(fn, (4,), a, 32, 0.5, cache=cache, key=("k", L.int_spec(32)), BLOCK=16, num_warps=4)
    L.launch(fn, (4,), a, 48, 0.25, cache=cache, key=("k", L.int_spec(48)), BLOCK=16, num_warps=4)
    assert _kinds(fn) == ["jit", "fast"]
    _, grid, args, stream = fn.log[-1]
    assert grid == (4, 1, 1) and stream == 1234
    assert args == (a, 48, 0.25, 16)  # signature order, constexprs included (as Triton's launcher takes them)


def test_no_cache_or_a_new_key_goes_through_triton(cuda_stub) -> None:
    fn, a, cache = _Jit(), torch.zeros(64), {}
    L.launch(fn, (1,), a, 16, 1.0, BLOCK=16)
    L.launch(fn, (1,), a, 16, 1.0, BLOCK=16)  # no cache: always Triton's launch
    L.launch(fn, (1,), a, 16, 1.0, cache=cache, key=1, BLOCK=16)
    L.launch(fn, (1,), a, 17, 1.0, cache=cache, key=2, BLOCK=16)
    L.launch(fn, (1,), a, 17, 1.0, cache=cache, key=2, BLOCK=16)
    assert _kinds(fn) == ["jit", "jit", "jit", "jit", "fast"]


def test_a_tensor_that_lost_its_alignment_goes_through_triton(cuda_stub) -> None:
    fn, cache = _Jit(), {}
    buf = torch.zeros(64, dtype=torch.uint8)
    L.launch(fn, (1,), buf, 16, 1.0, cache=cache, key=0, BLOCK=16)
    L.launch(fn, (1,), buf[1:], 16, 1.0, cache=cache, key=0, BLOCK=16)  # 1-byte offset: not 16-byte aligned
    L.launch(fn, (1,), buf[16:], 16, 1.0, cache=cache, key=0, BLOCK=16)
    assert _kinds(fn) == ["jit", "jit", "fast"]


def test_interpreter_keeps_nothing(cuda_stub, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn, cache = _Jit(), {}
    for _ in range(2):
        L.launch(fn, (1,), torch.zeros(4), 16, 1.0, cache=cache, key=0, BLOCK=16)
    assert _kinds(fn) == ["jit", "jit"] and not cache


def test_a_kernel_without_triton_attributes_keeps_nothing(cuda_stub) -> None:
    calls = []

    class Bare:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(grid)

    cache: dict = {}
    for _ in range(3):
        L.launch(Bare(), (1,), torch.zeros(4), 16, cache=cache, key=0)
    assert len(calls) == 3 and not cache


@pytest.mark.parametrize("a,b", [(16, 32), (17, 33), (1, 1), (2**33, 2**34)])
def test_int_spec_equal_where_triton_cannot_tell_them_apart(a: int, b: int) -> None:
    assert L.int_spec(a) == L.int_spec(b)


@pytest.mark.parametrize("a,b", [(16, 17), (1, 2), (16, 2**32), (-16, 16), (2**31 - 16, 2**31)])
def test_int_spec_differs_where_triton_specialises(a: int, b: int) -> None:
    assert L.int_spec(a) != L.int_spec(b)


def test_another_current_device_goes_through_triton(cuda_stub, monkeypatch) -> None:
    fn, a, cache = _Jit(), torch.zeros(64), {}
    L.launch(fn, (1,), a, 16, 1.0, cache=cache, key=0, BLOCK=16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # compiled for device 0
    L.launch(fn, (1,), a, 16, 1.0, cache=cache, key=0, BLOCK=16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    L.launch(fn, (1,), a, 16, 1.0, cache=cache, key=0, BLOCK=16)
    assert _kinds(fn) == ["jit", "jit", "fast"]


class _Props:
    regs_per_multiprocessor = 65536
    shared_memory_per_multiprocessor = 233472  # an H100 / H200 multiprocessor
    max_threads_per_multi_processor = 2048


class _Resources:  # what resident_programs reads of a loaded CompiledKernel
    def __init__(self, n_regs: int, shared: int) -> None:
        self.n_regs = n_regs
        self.metadata = type("M", (), {"shared": shared})()


@pytest.mark.parametrize("regs,shared,warps,expected", [
    (149, 73728, 4, 3),  # the 4-bit decode split kernel's sm_90 build: registers and shared memory both allow 3
    (128, 40000, 4, 4),  # 128 registers x 128 threads: 4 fill the register file
    (96, 16384, 4, 5),  # 96 x 32 = 3072 per warp: 5 programs of 4 warps
    (33, 0, 4, 12),  # 33 registers round up to 40 per thread (1280 per warp): 12 by registers; 16 by threads
    (32, 0, 4, 16),  # threads: 2048 / 128
    (255, 0, 8, 1),
    (40, 120000, 4, 1),  # shared memory: one program (plus its reserved KiB) per multiprocessor
])
def test_resident_programs_from_registers_shared_memory_and_threads(monkeypatch, regs, shared, warps,
                                                                   expected) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    assert L.resident_programs(_Resources(regs, shared), warps, 0) == expected


def test_index_kernels_run_on_their_codes_device(monkeypatch) -> None:
    """The Triton entry points (index scans, attention) switch to their inputs' GPU (Triton launches on the
    current one)."""
    import contextlib
    import inspect

    from tqindex.kernels import attention, decode_attention, ivf_scan, pack, scan_topk, score

    entered = []

    class Switch:
        def __init__(self, device) -> None:
            self.idx = device.index

        def __enter__(self):
            entered.append(self.idx)

        def __exit__(self, *exc):
            entered.append(-1)

    class OnGpu1:
        is_cuda = True
        device = torch.device("cuda", 1)

    class Codes:  # a CodeArgs stand-in: where its mse tensor is
        mse = OnGpu1()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    seen = []
    f = L.follows_device(lambda first, *a, k=0: seen.append((first, a, k, list(entered))) or "out")
    assert f(OnGpu1(), 2, k=3) == "out" and seen[-1][1:] == ((2,), 3, [1])  # entered cuda:1 around the call
    assert entered == [1, -1]
    f(Codes())
    assert entered == [1, -1, 1, -1]
    f(torch.zeros(1))  # on the CPU: nothing entered
    assert entered == [1, -1, 1, -1]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(L.on_device(OnGpu1()), contextlib.nullcontext)
    for fn in (score.score_triton, scan_topk.scan_topk_triton, scan_topk.dequantize_scaled, scan_topk.scan_topk_gemm,
               ivf_scan.ivf_topk_triton, pack.quantize_pack_triton, attention.quantized_attention_triton,
               attention.coded_attention_lse_triton, decode_attention.decode_attention_triton,
               decode_attention.coded_attention_lse_flash):
        assert getattr(fn, "__wrapped__", None) is not None, fn  # decorated with follows_device
        assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)


class _Chain:
    """Stand-in of Triton's HookChain (Triton >= 3.5: an empty chain where older ones had None)."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __call__(self, *args) -> None:
        for c in self.calls:
            c(*args)


@pytest.mark.parametrize("enter, leave, passed", [
    (_Chain([]), _Chain([]), False),  # nothing set: no metadata built, no hooks handed to the launcher
    (None, None, False),
    (_Chain([print]), _Chain([]), True),  # a profiler's hook: metadata and the hook reach the launcher
])
def test_launch_hooks_reach_the_launcher_only_when_set(cuda_stub, monkeypatch, enter, leave, passed) -> None:
    knobs = pytest.importorskip("triton").knobs
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", enter)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", leave)
    fn, a, cache = _Jit(), torch.zeros(64), {}
    for _ in range(2):
        L.launch(fn, (4,), a, 32, 0.5, cache=cache, key="k", BLOCK=16)
    assert _kinds(fn) == ["jit", "fast"]
    assert (("metadata",) in fn.log) == passed
    kernel = cache["k"].kernel
    if passed:
        assert kernel.hooks == ("launch-meta", enter, None)
    else:
        assert kernel.hooks == (None, None, None)

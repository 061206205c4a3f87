"""Shared pytest set-up: the `gpu` marker (skipped without CUDA) and a session cache of codecs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import tqindex


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CodecFactory = Callable[..., Any]


@pytest.fixture(scope="session")
def codec() -> CodecFactory:
    """codec(kind, dim, bits, seed=0, rotation="haar", **kw) -> a codec built once per session.

    Codecs are immutable after construction, so tests share them; building a 1536-d Haar rotation
    (a QR) and solving a Lloyd-Max codebook only happens once. A test that must mutate a codec
    builds its own.
    """
    cache: dict[tuple, Any] = {}

    def make(kind: str, dim: int, bits: int, seed: int = 0, rotation: str = "haar", **kw: Any) -> Any:
        key = (kind, dim, bits, seed, rotation, tuple(sorted(kw.items())))
        if key not in cache:
            cls = {"mse": tqindex.TurboQuantMSE, "prod": tqindex.TurboQuantProd}[kind]
            cache[key] = cls(dim, bits, seed=seed, rotation=rotation, **kw)
        return cache[key]

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one torch thread (small LAPACK/BLAS calls thrash on a busy 2-core box), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_interpreted(script: "str | Path", timeout: int = 900) -> str:
    """Run ``script`` (Python source, or a Path to a file) in a fresh Python under Triton's interpreter
    (TRITON_INTERPRET must be set before triton is first imported, so not in this process), one OpenMP thread,
    the repository on the path and no TQINDEX_{DISABLE,FORCE}_TRITON from outside; returns its stdout and fails
    the test with its output if it exits non-zero."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TQINDEX_DISABLE_TRITON", None)
    env.pop("TQINDEX_FORCE_TRITON", None)
    cmd = [sys.executable, str(script)] if isinstance(script, Path) else [sys.executable, "-c", script]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


_CASES_PREAMBLE = """\
import os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
{force}import torch
torch.set_num_threads(1)
torch.manual_seed(0)
failures, cases = [], 0
"""

_CASES_EPILOGUE = """
if failures:
    print("MISMATCH\\n" + "\\n".join(failures))
    sys.exit(1)
print(f"OK {cases} cases")
"""


def run_interpreted_cases(body: str, *, force_triton: bool = False, timeout: int = 900) -> int:
    """:func:`run_interpreted` of a check that counts ``cases`` and appends to ``failures`` (both defined for it,
    with torch imported, one thread, seed 0; ``force_triton``: TQINDEX_FORCE_TRITON=1, the interpreter counting as
    a Triton device); fails the test with the mismatches, else returns how many cases ran."""
    import textwrap

    force = 'os.environ["TQINDEX_FORCE_TRITON"] = "1"\n' if force_triton else ""
    out = run_interpreted(_CASES_PREAMBLE.format(force=force) + textwrap.dedent(body) + _CASES_EPILOGUE, timeout)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert last.startswith("OK ") and last.endswith(" cases"), out
    return int(last.split()[1])

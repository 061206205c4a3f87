"""The ``tqindex`` command: ``serve`` (the REST service), ``info`` (versions, devices), ``bench`` (benchmarks)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "info"]

BENCHES = ("recall", "codec", "search", "ivf", "ivf_profile", "search_profile", "cpu_search", "kvcache", "kv_speed",
           "crash", "load")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def info() -> dict[str, Any]:
    """Versions of tqindex and its dependencies, and which accelerators torch and Triton can use."""
    import torch

    import tqindex

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "tqindex": tqindex.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
    }
    return out


def _cmd_info(ns: argparse.Namespace) -> int:
    data = info()
    if ns.json:
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
    else:
        width = max(map(len, data))
        for k, v in data.items():
            sys.stdout.write(f"{k:<{width}}  {v}\n")
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    from server.config import settings_from_args

    try:
        settings = settings_from_args(ns)
    except ValueError as e:
        ns.parser.error(str(e))
    try:
        from server.main import serve
    except ImportError as e:  # fastapi / uvicorn missing
        sys.stderr.write(f"tqindex serve needs the server extra ({e}); install it with: pip install 'tqindex[server]'\n")
        return 2
    serve(settings)
    return 0


def _checkout(start: Path | None = None) -> Path | None:
    """The source checkout whose ``bench/`` to run: the current directory or one above it holding
    ``bench/__init__.py``, else the one this tqindex was imported from (an editable install)."""
    here = (start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parent.parent]
    for root in candidates:
        if (root / "bench" / "__init__.py").is_file():
            return root
    return None


def _available(root: Path | None) -> list[str]:
    return [b for b in BENCHES if root is not None and (root / "bench" / f"{b}.py").is_file()]


def _cmd_bench(ns: argparse.Namespace) -> int:
    root = _checkout()
    available = _available(root)
    if ns.name is None:
        where = f" (in {root})" if root else ""
        sys.stdout.write(f"benchmarks available here{where}: " + (", ".join(available) or "none") + "\n"
                         "run one with: tqindex bench NAME [ARGS...] (= python -m bench.NAME ARGS...)\n")
        return 0
    if root is None or ns.name not in available:
        sys.stderr.write(f"benchmark {ns.name!r} is not available here; expected one of {available} "
                         "(run from a source checkout: bench/ is not installed with the package)\n")
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.call([sys.executable, "-m", f"bench.{ns.name}", *ns.args], env=env)


def build_parser() -> argparse.ArgumentParser:
    from server.config import add_arguments  # standard library only: works without the server extra

    p = argparse.ArgumentParser(prog="tqindex", description="TurboQuant vector index: service, info, benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the REST service (Qdrant-shaped API) under uvicorn")
    add_arguments(s)
    s.set_defaults(func=_cmd_serve, parser=s)
    i = sub.add_parser("info", help="versions and torch/Triton/CUDA availability")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_info)
    b = sub.add_parser("bench", help="run a benchmark: python -m bench.NAME [ARGS...]")
    b.add_argument("name", nargs="?", help=f"one of {', '.join(BENCHES)} (where present)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

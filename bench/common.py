"""Shared benchmark plumbing: machine description and writing results as JSON + Markdown."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU count, platform, torch/CUDA versions and the GPU name if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # pragma: no cover
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    return info


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> a GitHub Markdown table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
    out_dir: Path | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md`` with the command, machine and date.

    Returns the two paths.
    """
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps({**meta, **(extra or {}), "rows": list(rows)}, indent=1, default=str) + "\n")
    md = [f"# {name}", "", f"- command: `{meta['command']}`", f"- date: {meta['date']}",
          f"- machine: {json.dumps(meta['machine'])}", ""]
    if notes:
        md += [notes.strip(), ""]
    md.append(markdown_table(rows, columns))
    mpath.write_text("\n".join(md))
    return jpath, mpath

"""Plots of the recall benchmark: 10-recall@10 against bytes/vector, and recall@1@k curves at 2 and 4 bits."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {
    "tqindex mse": dict(color="tab:red", marker="o", lw=2.2),
    "tqindex prod": dict(color="tab:orange", marker="s", lw=2.2),
    "faiss PQ x8": dict(color="tab:blue", marker="^"),
    "faiss PQ x4fs": dict(color="tab:cyan", marker="v"),
    "faiss SQ": dict(color="tab:gray", marker="D"),
    "faiss RaBitQ": dict(color="tab:green", marker="P"),
    "faiss EDEN": dict(color="tab:purple", marker="X"),
    "faiss TurboQuant prod": dict(color="tab:brown", marker="<", ls="--"),
    "faiss TurboQuant mse": dict(color="tab:pink", marker=">", ls="--"),
}


def _style(family: str) -> dict[str, Any]:
    return dict(_STYLE.get(family, dict(color="black", marker=".")))


def plot_recall(rows: Sequence[dict[str, Any]], dataset: str, out_dir: Path, stem: str) -> list[Path]:
    """Write <stem>_bytes.png and <stem>_recall1k.png into ``out_dir``; returns their paths.

    ``rows`` are bench.recall result rows (family, method, bits, rerank, bytes_per_vector,
    recall10_at10, recall_1_at_k).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_bytes_plot(rows, dataset, out_dir / f"{stem}_bytes.png"),
            _recall1k_plot(rows, dataset, out_dir / f"{stem}_recall1k.png")]


def _bytes_plot(rows: Sequence[dict[str, Any]], dataset: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 6))
    fam: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["rerank"] == 0 and r["family"] != "exact":
            fam[r["family"]].append((r["bytes_per_vector"], r["recall10_at10"]))
    for name, pts in sorted(fam.items()):
        pts.sort()
        ax.plot(*zip(*pts), label=name, **_style(name))
    for codec in ("mse", "prod"):  # rescoring: the same codes plus originals in host memory
        pts = sorted((r["bytes_per_vector"], r["recall10_at10"]) for r in rows
                     if r["family"] == f"tqindex {codec}" and r["rerank"] == 4)
        if pts:
            st = _style(f"tqindex {codec}")
            ax.plot(*zip(*pts), color=st["color"], marker=st["marker"], ls=":", alpha=0.7, mfc="none",
                    label=f"tqindex {codec} + rerank 4 (also keeps originals)")
    flat = [r for r in rows if r["family"] == "exact" and r["rerank"] == 0]
    if flat:
        ax.axhline(flat[0]["recall10_at10"], color="black", lw=0.8, ls="--", label=f"exact (Flat, {flat[0]['bytes_per_vector']} B)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per vector (codes, every per-vector byte counted)")
    ax.set_ylabel("10-recall@10 (codes only unless marked)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{dataset}: 10-recall@10 vs memory")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _recall1k_plot(rows: Sequence[dict[str, Any]], dataset: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, b in zip(axes, (2, 4)):
        sel = [r for r in rows if r["rerank"] == 0 and r.get("recall_1_at_k") and r["family"] != "exact"
               and r["bits"] is not None and r["family"] not in ("faiss PQ x8", "faiss PQ x4fs")
               and abs(float(r["bits"]) - b) < 1e-9]
        budget = next((r["bytes_per_vector"] for r in sel if r["family"] == "tqindex mse"), None)
        if budget is not None:  # PQ at the byte budget of tqindex mse b bits (the largest that fits)
            for fam in ("faiss PQ x8", "faiss PQ x4fs"):
                pq = [r for r in rows if r["family"] == fam and r["rerank"] == 0 and r["bytes_per_vector"] <= budget]
                if pq:
                    sel.append(max(pq, key=lambda r: r["bytes_per_vector"]))
        for r in sorted(sel, key=lambda r: r["method"]):
            rk = r["recall_1_at_k"]
            ax.plot(range(1, len(rk) + 1), rk, label=f"{r['method']} ({r['bytes_per_vector']} B)",
                    **{k: v for k, v in _style(r["family"]).items() if k != "marker"})
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title(f"{b} bits per coordinate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("recall@1@k (true nearest neighbour in the top k)")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle(f"{dataset}: recall@1@k from codes only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""End-to-end generate() with TurboQuantCache vs DynamicCache: peak memory, prefill time, time per output token.

Each row runs in its own process so that its peak is its own. On the CPU the peak is the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is built and
warmed up; large allocations are forced onto mmap so freed tensors leave the RSS), minus the RSS at
that point: the memory generate() itself added. On CUDA it is torch.cuda.max_memory_allocated().

``--before REV`` also runs TurboQuantCache with the library as it was at git revision REV (exported
to a temporary folder and put first on the import path): the "before" rows; ``--before-src DIR`` takes
such an exported package from DIR/tqindex instead (where the git history is not at hand).

    python -m bench.kv_generate --contexts 1024,2048,4096 --before 8521ecb      # CPU, tiny Llama shape
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.kv_generate")

# random-weight model shapes: name -> (config class, kwargs)
MODELS: dict[str, dict[str, Any]] = {
    # Llama-shaped, small enough for 2 CPU cores: 8 query / 2 KV heads of 64 (the 4:1 grouping of Llama-3-8B)
    "llama-tiny": dict(arch="llama", hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       num_hidden_layers=4, intermediate_size=1024, vocab_size=1024),
    # the same with Gemma-3's 5:1 interleave cut to 3 sliding : 1 full, window 512
    "gemma3-tiny": dict(arch="gemma3", hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                        num_hidden_layers=4, intermediate_size=1024, vocab_size=1024, sliding_window=512,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    # Llama-3-8B attention and MLP shapes, 8 layers (GPU)
    "llama3-8b-8l": dict(arch="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         num_hidden_layers=8, intermediate_size=14336, vocab_size=128256),
    # the full Llama-3-8B shape, 32 layers (~16 GB of fp16 weights): bench/kv_capacity.py
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      num_hidden_layers=32, intermediate_size=14336, vocab_size=128256),
}


def make_cache_for(model: Any, name: str, cuda: bool, max_cache_len: int | None = None) -> Any:
    """A fresh cache for a row: "dynamic" / "dynamic-nocudnn" (DynamicCache + "sdpa"; nocudnn: cuDNN SDPA off,
    the issue's baseline, as cuDNN re-plans for every new KV length), "static-nocudnn" (StaticCache of
    ``max_cache_len`` tokens + "sdpa", cuDNN off) or "tqK/V" (TurboQuantCache, K/V bits, TurboQuant-MSE,
    residual 128, attention "tqindex"; "tqK/V-reserved": with ``max_cache_len``). Imports tqindex at call time
    (the --before library)."""
    import torch
    from transformers import DynamicCache, StaticCache

    from tqindex.kvcache import TurboQuantCache, enable

    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(not name.endswith("-nocudnn"))
    if name.startswith(("dynamic", "static")):
        model.set_attn_implementation("sdpa")
        if name.startswith("static"):
            if max_cache_len is None:
                raise ValueError(f"cache {name!r} needs max_cache_len, got None")
            return StaticCache(config=model.config, max_cache_len=max_cache_len)
        return DynamicCache(config=model.config)
    enable(model)
    bits, _, reserved = name[2:].partition("-")
    if reserved not in ("", "reserved") or reserved and max_cache_len is None:
        raise ValueError(f"cache {name!r}: expected tqK/V or tqK/V-reserved (with max_cache_len)")
    kb, vb = (int(x) for x in bits.split("/"))
    return TurboQuantCache(config=model.config, key_bits=kb, value_bits=vb, key_codec="mse", residual_length=128,
                           max_cache_len=max_cache_len if reserved else None)


def _build(name: str, context: int, dtype: Any, device: str):
    import torch
    import transformers as tf

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    spec["max_position_embeddings"] = context + 1024
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**spec) if arch == "llama" else tf.Gemma3TextConfig(**spec)
    cls = tf.LlamaForCausalLM if arch == "llama" else tf.Gemma3ForCausalLM
    if str(device).startswith("cuda"):  # random init on the GPU, in the model dtype: seconds, not minutes of CPU
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = cls(cfg)
        finally:
            torch.set_default_dtype(prev)
        return model.eval()
    return cls(cfg).to(device=device, dtype=dtype).eval()


def _rss() -> tuple[int, int]:
    """(current RSS, high-water mark) in bytes, from /proc/self/status."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, kb = line.split()[:2]
            vals[key] = int(kb) * 1024
    return vals["VmRSS:"], vals["VmHWM:"]


def _kv_bytes(cache: Any) -> int:
    """Bytes of what a cache holds: memory_usage().total for ours, keys + values for transformers' layers."""
    if hasattr(cache, "memory_usage"):
        return int(cache.memory_usage().total)
    return int(sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
                   if getattr(layer, "keys", None) is not None))


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One generate() in this process; returns the row."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    import tqindex
    from tqindex.kvcache import cache_kwarg

    logger.info("tqindex from %s", tqindex.__file__)

    torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    model = _build(args.model, args.context, dtype, dev)

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids, scores):  # called once per generated token, after its forward
            if cuda:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            return scores

    def make_cache():
        return make_cache_for(model, args.cache, cuda)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), generator=g).to(dev)
    gen = dict(do_sample=False, pad_token_id=0, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens)
    if args.chunk:
        gen["prefill_chunk_size"] = args.chunk
    with torch.no_grad():  # warm-up on a short prompt (first-call allocations, kernels)
        model.generate(ids[:, :256], **{cache_kwarg(model): make_cache()}, **{**gen, "max_new_tokens": 2,
                                                                               "min_new_tokens": 2})
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss()[0]
    cache = make_cache()
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **{cache_kwarg(model): cache}, logits_processor=LogitsProcessorList([clock]), **gen)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss()[1] - base
    steps = [b - a for a, b in zip(clock.t, clock.t[1:])]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(model=args.model, cache=args.cache, variant=args.variant, context=args.context, batch=args.batch,
                chunk=args.chunk or None, new_tokens=int(out.shape[1] - args.context),
                peak_mb=round(peak / 2**20, 1), kv_mb=round(_kv_bytes(cache) / 2**20, 2),
                weights_mb=round(weights / 2**20, 1), prefill_s=round(clock.t[0] - t0, 3),
                tpot_ms=round(1e3 * statistics.median(steps), 2) if steps else None,
                steps_ms=[round(1e3 * x, 2) for x in steps],
                library=str(Path(tqindex.__file__).parent.parent))


def merge_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, cache, variant, context, batch, chunk): with several runs, the median time per token
    and prefill time, the highest peak, and every run's time per token (``tpot_runs``); failed runs are left out
    of the medians and counted in ``errors`` (a group with no successful run keeps its last error row)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in ("model", "cache", "variant", "context", "batch", "chunk")), []).append(r)
    out = []
    for runs in groups.values():
        ok = [r for r in runs if "error" not in r]
        if len(runs) == 1 or not ok:
            out.append(runs[-1])
            continue
        row = dict(ok[0])
        tpots = [r["tpot_ms"] for r in ok if r.get("tpot_ms") is not None]
        row["tpot_ms"] = round(statistics.median(tpots), 2) if tpots else None
        row["tpot_runs"] = tpots
        row["prefill_s"] = round(statistics.median(r["prefill_s"] for r in ok), 3)
        row["peak_mb"] = max(r["peak_mb"] for r in ok)
        if len(ok) < len(runs):
            row["errors"] = len(runs) - len(ok)
        out.append(row)
    return out


def _jobs(caches: list[str], chunk: int, chunk_all: bool, before: str | None) -> list[tuple[str, str, int]]:
    """The (cache, variant, prefill chunk) rows of one (context, batch): each cache "after"; TurboQuantCache also
    "before (LABEL)" with the ``before`` library and, with ``chunk``, chunked; with ``chunk_all`` every row chunked."""
    jobs = []
    for c in caches:
        tq = not c.startswith("dynamic")
        if chunk_all:
            jobs.append((c, "after", chunk))
            if tq and before:
                jobs.append((c, f"before ({before})", chunk))
            continue
        jobs.append((c, "after", 0))
        if tq and before:
            jobs.append((c, f"before ({before})", 0))
        if tq and chunk:
            jobs.append((c, "after", chunk))
    return jobs


def _export(rev: str) -> str:
    """The tqindex package at git revision ``rev`` in a temporary folder (for the "before" rows)."""
    tmp = tempfile.mkdtemp(prefix=f"tqindex-{rev}-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tqindex"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return tmp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-tiny", choices=sorted(MODELS))
    ap.add_argument("--models", default=None, help="comma list (overrides --model)")
    ap.add_argument("--contexts", default="1024,2048,4096")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--caches", default="dynamic,tq4/4", help="dynamic, tqK/V (bits)")
    ap.add_argument("--chunk", type=int, default=0, help="also run TurboQuantCache with prefill_chunk_size=CHUNK")
    ap.add_argument("--chunk-all", action="store_true", help="every row (DynamicCache too) with prefill_chunk_size=CHUNK, "
                    "no unchunked rows")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="run every (context, batch) group's rows this many times, "
                    "interleaved (A B C A B C ...: host-speed drift hits every cache alike); medians reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", default=None, help="git revision whose tqindex gives the 'before' TurboQuantCache rows")
    ap.add_argument("--before-src", default=None,
                    help="a folder holding the 'before' tqindex package (`git archive REV tqindex | tar -x -C DIR`), "
                         "for machines without the git history (the GPU machine gets the working tree only)")
    ap.add_argument("--name", default="kv_generate_cpu")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="after", help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        if args.src:  # the "before" library, ahead of this checkout (which `python -m` puts first)
            sys.path.insert(0, args.src)
        print("ROW " + json.dumps(run_one(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from bench.common import write_results

    if args.before and args.before_src:
        raise SystemExit(f"give --before (a git revision) or --before-src (an exported package), not both: got "
                         f"{args.before!r} and {args.before_src!r}")
    if args.before_src and not os.path.isdir(os.path.join(args.before_src, "tqindex")):
        raise SystemExit(f"--before-src {args.before_src!r} holds no tqindex package (expected DIR/tqindex)")
    before = _export(args.before) if args.before else args.before_src
    label = args.before or (os.path.basename(os.path.normpath(args.before_src)) if args.before_src else None)
    rows = []
    t_all = time.time()
    for model in (args.models.split(",") if args.models else [args.model]):
        for n in [int(x) for x in args.contexts.split(",")]:
            for b in [int(x) for x in args.batches.split(",")]:
                jobs = _jobs(args.caches.split(","), args.chunk, args.chunk_all, label)
                for c, variant, chunk in jobs * max(1, args.repeats):
                    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
                    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
                    cmd = [sys.executable, "-m", "bench.kv_generate", "--one", "--model", model, "--context", str(n),
                           "--batch", str(b), "--cache", c, "--variant", variant, "--chunk", str(chunk),
                           "--new-tokens", str(args.new_tokens), "--device", args.device,
                           "--threads", str(args.threads)] + (["--src", before] if variant.startswith("before") else [])
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                    line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
                    if proc.returncode or not line:
                        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        row = dict(model=model, cache=c, variant=variant, context=n, batch=b, chunk=chunk or None,
                                   error=err[:200])
                    else:
                        row = json.loads(line[0][4:])
                    logger.info("%s", row)
                    rows.append(row)
    if args.before:  # the exported copy (a --before-src folder is the caller's)
        shutil.rmtree(before, ignore_errors=True)
    rows = merge_repeats(rows)
    dyn = {(r["model"], r["context"], r["batch"]): r.get("peak_mb") for r in rows if r["cache"] == "dynamic"}
    for r in rows:
        base = dyn.get((r["model"], r["context"], r["batch"]))
        r["peak_vs_dynamic"] = round(r["peak_mb"] / base, 2) if base and r.get("peak_mb") is not None else None
    fast = {(r["model"], r["context"], r["batch"]): r.get("tpot_ms") for r in rows if r["cache"] == "dynamic-nocudnn"}
    for r in rows:
        base = fast.get((r["model"], r["context"], r["batch"]))
        r["tpot_vs_nocudnn"] = round(r["tpot_ms"] / base, 2) if base and r.get("tpot_ms") else None
    device = "CPU" if args.device == "cpu" else args.device
    notes = (
        f"generate() of {args.new_tokens} tokens after a random prompt of `context` tokens, greedy, random-weight models "
        f"({', '.join(sorted({r['model'] for r in rows}))}; shapes in bench/kv_generate.py MODELS), {device}, "
        f"{args.threads} threads, fp32 on the CPU. DynamicCache runs attention 'sdpa'; tqK/V is TurboQuantCache "
        "(TurboQuant-MSE keys/values, K/V bits, residual_length 128, encode_batch 64: the defaults) with attention 'tqindex'; dynamic-nocudnn: DynamicCache "
        "with torch.backends.cuda.enable_cudnn_sdp(False) (cuDNN SDPA builds a new plan for every KV length). peak_mb: memory "
        "generate() added on top of the loaded, warmed-up model (CPU: VmHWM - VmRSS, one process per row; CUDA: "
        "max_memory_allocated - allocated). kv_mb: bytes the cache holds at the end. prefill_s: generate() start to "
        "the first token's logits; tpot_ms: median time between the next tokens. 'before (REV)': the library at "
        "git revision REV (the reference attention path for prefill on the CPU). chunk: prefill_chunk_size. "
        f"Repeats: {args.repeats} (interleaved; tpot_runs: each run's tpot_ms, the reported values are medians). "
        f"Total run {time.time() - t_all:.0f} s. The H200 rows of issue 12 (Llama-3-8B shapes, 4k-128k, batch 1/8) are "
        "for a GPU session: `python -m bench.kv_generate --device cuda --models llama3-8b-8l --contexts "
        "4096,32768,131072 --batches 1,8 --caches dynamic,tq4/4,tq3/3 --name kv_generate_h200`."
    )
    cols = ["model", "cache", "variant", "chunk", "context", "batch", "peak_mb", "peak_vs_dynamic", "kv_mb",
            "prefill_s", "tpot_ms", "tpot_vs_nocudnn", "tpot_runs", "error"]
    if not any("tpot_runs" in r for r in rows):
        cols.remove("tpot_runs")
    if not any("error" in r for r in rows):
        cols.remove("error")
    write_results(args.name, rows, columns=cols, notes=notes)


if __name__ == "__main__":
    main()

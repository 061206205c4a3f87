"""Where one decode step's time goes: DynamicCache vs TurboQuantCache on a random-weight Llama-3-8B-shaped model.

For each (context, batch, cache) the prompt is prefilled in chunks (``model(...)`` with
``logits_to_keep=1``), then single-token steps are timed (synchronised, median) and one step is
profiled with torch.profiler: GPU kernels launched, their summed GPU time, the step's wall time,
and which SDPA kernels ran (cuDNN / flash / memory-efficient / math, from the kernel names).

    python -m bench.kv_step --contexts 4096,32768 --batches 1,8 --caches dynamic,dynamic-nocudnn,tq4/4

``dynamic-nocudnn``: DynamicCache with ``torch.backends.cuda.enable_cudnn_sdp(False)`` (the issue's
baseline: cuDNN re-plans for every new KV length). Results: bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import Counter
from typing import Any

import torch

from bench.kv_generate import MODELS, _build, _kv_bytes, make_cache_for

logger = logging.getLogger("bench.kv_step")

_SDPA_TAGS = {"cudnn": "cudnn", "flash": "flash", "fmha": "mem-efficient", "efficient": "mem-efficient",
              "_tq_decode": "tqindex", "bmm": "math?"}


def _step(model: Any, cache: Any, tok: torch.Tensor) -> torch.Tensor:
    from tqindex.kvcache import cache_kwarg

    out = model(tok, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def run_one(model: Any, context: int, batch: int, cache_name: str, chunk: int, steps: int) -> dict[str, Any]:
    from tqindex.kvcache import cache_kwarg

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=g).cuda()
    cache = make_cache_for(model, cache_name, cuda=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, context, chunk):
            out = model(ids[:, s:s + chunk], **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t1 = time.perf_counter()
            tok = _step(model, cache, tok)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t1 = time.perf_counter()
            tok = _step(model, cache, tok)
            torch.cuda.synchronize()
            prof_wall = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() - base
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    by_name: Counter = Counter()
    for e in kernels:
        by_name[e.name[:80]] += e.device_time
    sdpa = sorted({tag for e in kernels for key, tag in _SDPA_TAGS.items() if key in e.name.lower()})
    syncs = sum(1 for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                       "cudaMemcpyAsync") and e.device_type != torch.autograd.DeviceType.CUDA)
    row = dict(context=context, batch=batch, cache=cache_name, chunk=chunk, prefill_s=round(prefill, 2),
               step_ms=round(1e3 * statistics.median(times), 3), step_min_ms=round(1e3 * min(times), 3),
               profiled_step_ms=round(1e3 * prof_wall, 2), kernels=len(kernels), gpu_ms=round(gpu_us / 1e3, 3),
               host_syncs_or_copies=syncs, sdpa_kernels=",".join(sdpa), peak_mb=round(peak / 2**20, 1),
               kv_mb=round(_kv_bytes(cache) / 2**20, 1),
               top_kernels=[(n, round(t / 1e3, 3)) for n, t in by_name.most_common(8)])
    del cache, out
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    from bench.common import write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b-8l", choices=sorted(MODELS))
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--caches", default="dynamic,dynamic-nocudnn,tq4/4")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per forward)")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps")
    ap.add_argument("--name", default="kv_step_h200")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.kv_step needs CUDA")
    ctxs = [int(x) for x in args.contexts.split(",")]
    model = _build(args.model, max(ctxs), torch.float16, "cuda")
    t_all = time.time()
    rows = []
    with torch.no_grad():  # warm-up: kernels and plans of every cache kind
        for c in args.caches.split(","):
            run_one(model, 512, 1, c, 256, 2)
    for n in ctxs:
        for b in [int(x) for x in args.batches.split(",")]:
            for c in args.caches.split(","):
                try:
                    row = run_one(model, n, b, c, args.chunk, args.steps)
                except torch.OutOfMemoryError as exc:
                    row = dict(context=n, batch=b, cache=c, error=str(exc)[:160])
                    torch.cuda.empty_cache()
                logger.info("%s", row)
                rows.append(row)
    torch.backends.cuda.enable_cudnn_sdp(True)
    notes = (f"Random-weight {args.model} (bench/kv_generate.py MODELS), fp16, one H200. Prefill in chunks of "
             f"{args.chunk} tokens through model(...) (logits_to_keep=1), then {args.steps} single-token steps timed "
             "with torch.cuda.synchronize (step_ms: median, step_min_ms: best) and one more under torch.profiler: "
             "kernels = CUDA kernels it launched, gpu_ms = their summed GPU time (the rest of step_ms is host time "
             "the GPU waits for), host_syncs_or_copies = cudaStreamSynchronize/cudaMemcpyAsync calls, "
             "sdpa_kernels = attention kernels by name. dynamic: DynamicCache + sdpa (torch picks the backend); "
             "dynamic-nocudnn: the same with enable_cudnn_sdp(False); tqK/V: TurboQuantCache (MSE, residual 128) "
             f"+ attention 'tqindex'. peak_mb: max_memory_allocated over the row minus what was allocated before. "
             f"Total {time.time() - t_all:.0f} s.")
    cols = ["context", "batch", "cache", "prefill_s", "step_ms", "step_min_ms", "profiled_step_ms", "kernels",
            "gpu_ms", "host_syncs_or_copies", "sdpa_kernels", "peak_mb", "kv_mb", "error"]
    if not any("error" in r for r in rows):
        cols.remove("error")
    write_results(args.name, rows, columns=cols, notes=notes)


if __name__ == "__main__":
    main()

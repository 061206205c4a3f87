"""Where one decode step's time goes: DynamicCache vs TurboQuantCache on a random-weight Llama-3-8B-shaped model.

For each (context, batch, cache) the prompt is prefilled in chunks (``model(...)`` with
``logits_to_keep=1``), then single-token steps are timed (synchronised, median) and one step is
profiled with torch.profiler: GPU kernels launched, their summed GPU time, the step's wall time,
and which SDPA kernels ran (cuDNN / flash / memory-efficient / math, from the kernel names).

    python -m bench.kv_step --contexts 4096,32768 --batches 1,8 --caches dynamic,dynamic-nocudnn,tq4/4

``dynamic-nocudnn``: DynamicCache with ``torch.backends.cuda.enable_cudnn_sdp(False)`` (the issue's
baseline: cuDNN re-plans for every new KV length). Results: bench/results/<name>.{json,md}.

``--ablate``: in one process, DynamicCache (cuDNN off) and TurboQuantCache 4/4 steps interleaved over
``--reps`` rounds, TurboQuantCache also with its decode attention and / or its encode launch replaced
by a no-op (:data:`ABLATIONS`; outputs are garbage there, only the time counts): what each part adds
to a step. ``--cpu N`` pins the process to core N (the H200 machine's step time moves with the core).

    python -m bench.kv_step --ablate --contexts 32768 --batches 1 --cpu 3 --name kv_ablate_h200
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from collections import Counter
from typing import Any, Iterator

import torch

from bench.kv_generate import MODELS, _build, _kv_bytes, make_cache_for

logger = logging.getLogger("bench.kv_step")

_SDPA_TAGS = {"cudnn": "cudnn", "flash": "flash", "fmha": "mem-efficient", "efficient": "mem-efficient",
              "_tq_decode": "tqindex", "bmm": "math?"}


def _step(model: Any, cache: Any, tok: torch.Tensor) -> torch.Tensor:
    from tqindex.kvcache import cache_kwarg

    out = model(tok, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def _prompt(model: Any, context: int, batch: int) -> torch.Tensor:
    """The random prompt every row uses: (batch, context) token ids on the GPU, seed 1."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, model.config.vocab_size, (batch, context), generator=g).cuda()


def _prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ``ids`` through the model into ``cache`` in chunks (logits of the last position only); the next token."""
    from tqindex.kvcache import cache_kwarg

    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s:s + chunk], **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def _timed_steps(model: Any, cache: Any, tok: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``steps`` synchronised single-token steps, and the last token."""
    times = []
    for _ in range(steps):
        t1 = time.perf_counter()
        tok = _step(model, cache, tok)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
    return times, tok


# variant -> (attention replaced, encode launch replaced)
ABLATIONS: dict[str, tuple[bool, bool]] = {"tq": (False, False), "tq-noattn": (True, False),
                                           "tq-noenc": (False, True), "tq-noattn-noenc": (True, True)}


@contextlib.contextmanager
def ablated(no_attention: bool, no_encode: bool) -> Iterator[None]:
    """TurboQuantCache's decode attention (tqindex.kvcache.decode_run) and / or its fused encode launch
    (tqindex.kvcache.encode_append_triton) replaced by no-ops for the block; restored after."""
    import tqindex.kvcache as kvc

    run, enc = kvc.decode_run, kvc.encode_append_triton

    def no_run(plan: Any, query: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return torch.empty_like(query)

    try:
        if no_attention:
            kvc.decode_run = no_run
        if no_encode:
            kvc.encode_append_triton = lambda *a, **k: None
        yield
    finally:
        kvc.decode_run, kvc.encode_append_triton = run, enc


def ablate(model: Any, context: int, batch: int, chunk: int, steps: int, reps: int) -> list[dict[str, Any]]:
    """Median step time of DynamicCache and each :data:`ABLATIONS` variant, interleaved over ``reps`` rounds."""
    from tqindex.kvcache import enable

    ids = _prompt(model, context, batch)
    state = {}
    with torch.no_grad():
        for name in ("dynamic-nocudnn", "tq4/4"):
            cache = make_cache_for(model, name, cuda=True)
            state[name] = [cache, _prefill(model, cache, ids, chunk)]

    def timed(variant: str, n: int) -> float:
        name = "dynamic-nocudnn" if variant == "dynamic-nocudnn" else "tq4/4"
        cache, tok = state[name]
        if variant == "dynamic-nocudnn":
            model.set_attn_implementation("sdpa")
        else:
            enable(model)
        torch.backends.cuda.enable_cudnn_sdp(False)
        with torch.no_grad(), ablated(*ABLATIONS.get(variant, (False, False))):
            ts, state[name][1] = _timed_steps(model, cache, tok, n)
        return 1e3 * statistics.median(ts)

    variants = ["dynamic-nocudnn", *ABLATIONS]
    for v in variants:
        timed(v, 3)
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(reps):
        for v in variants:
            runs[v].append(round(timed(v, steps), 3))
    base = statistics.median(runs["dynamic-nocudnn"])
    return [dict(context=context, batch=batch, variant=v, step_ms=round(statistics.median(r), 3),
                 vs_dynamic=round(statistics.median(r) / base, 2), runs=r) for v, r in runs.items()]


def run_one(model: Any, context: int, batch: int, cache_name: str, chunk: int, steps: int) -> dict[str, Any]:
    ids = _prompt(model, context, batch)
    cache = make_cache_for(model, cache_name, cuda=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        tok = _prefill(model, cache, ids, chunk)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        times, tok = _timed_steps(model, cache, tok, steps)
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
    del cache
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
    ap.add_argument("--ablate", action="store_true", help="interleaved DynamicCache / TQ variants (see above)")
    ap.add_argument("--reps", type=int, default=6, help="--ablate: rounds")
    ap.add_argument("--cpu", type=int, default=None, help="pin the process to this core")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.kv_step needs CUDA")
    ctxs = [int(x) for x in args.contexts.split(",")]
    model = _build(args.model, max(ctxs), torch.float16, "cuda")
    t_all = time.time()
    rows = []
    if args.ablate:
        for n in ctxs:
            for b in [int(x) for x in args.batches.split(",")]:
                got = ablate(model, n, b, args.chunk, args.steps, args.reps)
                for r in got:
                    logger.info("%s", r)
                rows += got
        notes = (f"Random-weight {args.model}, fp16, one H200, one process (pinned to core {args.cpu}). Prefill in "
                 f"chunks of {args.chunk}; then {args.reps} rounds, each timing {args.steps} single-token steps "
                 "(synchronised, median) of every variant in turn: dynamic-nocudnn = DynamicCache + sdpa (cuDNN off); "
                 "tq = TurboQuantCache 4/4 (MSE, residual 128, default encode_batch) + attention 'tqindex'; noattn: "
                 "its decode attention replaced by an empty tensor; noenc: its fused encode launch replaced by a "
                 "no-op (outputs meaningless there: only time). step_ms: median of the rounds' medians; runs: each "
                 f"round's. Total {time.time() - t_all:.0f} s.")
        write_results(args.name, rows, columns=["context", "batch", "variant", "step_ms", "vs_dynamic", "runs"],
                      notes=notes)
        return
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

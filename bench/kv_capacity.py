"""What one GPU holds: the largest batch at a context, and the longest context at batch 1, that a model runs
through generate() with DynamicCache and with TurboQuantCache (issue 12: a full 32-layer Llama-3-8B in fp16).

A trial fits when the whole generate() runs without running out of device memory. Filling a 32-layer cache
of ~120 GB through a real prefill takes minutes a trial, so every trial fills the history synthetically:
random keys and values of the model's shapes appended through the cache's own ``update`` in chunks of
``ceil(history / 16)`` tokens (both caches grow as a chunked prefill grows them: DynamicCache by
concatenation, TurboQuantCache encoding each chunk into its code buffers, which grow by an eighth, or are
allocated once with ``max_cache_len``: the "-reserved" caches), up to
``context - chunk`` tokens. Then generate() runs on the full prompt: its last ``--chunk`` tokens of every
sequence go through one real forward over that history (the last prefill chunk), then ``--new-tokens``
decode steps. Peak: torch.cuda.max_memory_allocated() of the trial (fill + generate), weights included.

The search starts from a prediction (free memory after the model is loaded, over the bytes a token takes
in a probe fill), steps away from it by 1, 2, 4, ... until the outcome flips, then bisects (:func:`search`);
each trial's outcome is a row. One process per cache.

    python -m bench.kv_capacity --device cuda --model llama3-8b --contexts 131072,32768 --name kv_capacity_h200
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.kv_generate import MODELS, _build, _kv_bytes, make_cache_for

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.kv_capacity")


def fill_history(cache: Any, config: Any, batch: int, tokens: int, *, dtype: Any, device: Any,
                 seed: int = 0) -> None:
    """Append ``tokens`` random (batch, kv_heads, ., head_dim) keys/values to every layer of ``cache``
    through ``cache.update``, in chunks of ``ceil(tokens / 16)`` tokens (one random chunk, reused)."""
    import torch

    if tokens <= 0:
        return
    h = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    step = math.ceil(tokens / 16)
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(batch, h, step, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, h, step, d, generator=g, device=device, dtype=dtype)
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            done = 0
            while done < tokens:
                n = min(step, tokens - done)
                pos = torch.arange(done, done + n, device=device)  # StaticCache writes at cache_position
                cache.update(k[:, :, :n], v[:, :, :n], layer, cache_kwargs={"cache_position": pos})
                done += n
    del k, v


def run_trial(model: Any, cache_name: str, context: int, batch: int, *, chunk: int, new_tokens: int,
              device: str) -> dict[str, Any]:
    """One trial: fill ``context - chunk`` tokens of history, then generate() over the ``context``-token prompt.
    Returns the row (``fits`` False with the error where the device ran out of memory)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from tqindex.kvcache import cache_kwarg

    cuda = device.startswith("cuda")
    if chunk < 1 or chunk > context:
        raise ValueError(f"chunk must be in [1, context={context}], got {chunk}")
    row: dict[str, Any] = dict(cache=cache_name, context=context, batch=batch, chunk=chunk)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):  # once per generated token, after its forward
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            return scores

    def attempt() -> None:
        cache = make_cache_for(model, cache_name, cuda, max_cache_len=context + new_tokens)
        t0 = time.perf_counter()
        fill_history(cache, model.config, batch, context - chunk, dtype=model.dtype, device=model.device)
        if cuda:
            torch.cuda.synchronize()
        row["fill_s"] = round(time.perf_counter() - t0, 2)
        row["kv_gb_filled"] = round(_kv_bytes(cache) / 1e9, 2)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=g).to(model.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **{cache_kwarg(model): cache},
                                 logits_processor=LogitsProcessorList([Clock()]), do_sample=False, pad_token_id=0,
                                 min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                                 disable_compile=True)  # a StaticCache would make generate() torch.compile
        if int(out.shape[1]) != context + new_tokens or cache.get_seq_length() != context + new_tokens - 1:
            raise RuntimeError(f"generate() returned {tuple(out.shape)} with {cache.get_seq_length()} cached tokens; "
                               f"expected {context + new_tokens} and {context + new_tokens - 1}")
        row["last_chunk_s"] = round(times[0] - t1, 2)
        steps = [b - a for a, b in zip(times, times[1:])]
        row["tpot_ms"] = round(1e3 * statistics.median(steps), 2) if steps else None
        row["tokens_per_s"] = round(batch * 1e3 / row["tpot_ms"], 1) if row["tpot_ms"] else None
        row["kv_gb"] = round(_kv_bytes(cache) / 1e9, 2)
        if hasattr(cache, "memory_usage"):
            row["kv_gb_allocated"] = round(cache.memory_usage().allocated / 1e9, 2)

    try:
        attempt()
        row["fits"] = True
    except (torch.OutOfMemoryError, RuntimeError) as e:  # attempt()'s frames (and tensors) go with the exception
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise
        row["fits"] = False
        row["error"] = str(e).splitlines()[0][:160]
    if cuda:
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        gc.collect()
        torch.cuda.empty_cache()
    return row


def search(fits: Callable[[int], dict[str, Any]], start: int, *, step: int = 1, lo: int = 1,
           hi: int | None = None, max_trials: int = 8) -> tuple[int | None, list[dict[str, Any]]]:
    """The largest x = lo + j * step (<= ``hi``) that ``fits(x)["fits"]``: a trial at ``start``, then steps of
    1, 2, 4, ... grid points away from it until the outcome flips, then bisection (monotone fit assumed).
    Returns (x or None, every trial's row); each row gets ``bound``: the smallest x found not to fit (None: the
    search ran out of trials or reached ``hi`` without one, so x is a lower bound)."""
    top = None if hi is None else (hi - lo) // step  # grid indices 0 .. top
    i = max(0, (start - lo) // step)
    i = i if top is None else min(i, top)
    ok = bad = None  # largest index that fitted, smallest that did not
    jump = 1
    rows: list[dict[str, Any]] = []
    while len(rows) < max_trials:
        r = fits(lo + i * step)
        rows.append(r)
        if r["fits"]:
            ok = i
        else:
            bad = i
        if bad is not None and ok is not None:
            if bad - ok <= 1:
                break
            i = (ok + bad) // 2
        elif ok is not None:  # only fits so far: further up
            if top is not None and ok >= top:
                break
            i = ok + jump if top is None else min(ok + jump, top)
            jump *= 2
        else:  # only failures so far: further down
            if bad == 0:
                break
            i = max(0, bad - jump)
            jump *= 2
    for r in rows:
        r["bound"] = None if bad is None else lo + bad * step
    return (None if ok is None else lo + ok * step), rows


def run_cache(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Every search of one cache in this process (the model loaded once): each trial's row, a search at a time."""
    import torch

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    if cuda and args.memory_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    contexts = [int(x) for x in args.contexts.split(",") if x]
    longest = max(contexts + [args.max_context])
    model = _build(args.model, longest, dtype, args.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # warm-up (kernels, first allocations) and a probe of the bytes one token of one sequence takes
    probe = run_trial(model, args.cache, args.probe_tokens, 1, chunk=min(args.chunk, args.probe_tokens),
                      new_tokens=2, device=args.device)
    if not probe["fits"]:
        raise RuntimeError(f"the probe trial ({args.probe_tokens} tokens, batch 1) does not fit: {probe}")
    per_token = 1e9 * probe.get("kv_gb_allocated", probe["kv_gb"]) / (args.probe_tokens + 1)
    if cuda:
        free, total = torch.cuda.mem_get_info()
        room = min(free, total * args.memory_fraction - torch.cuda.memory_reserved()) - args.margin_gb * 1e9
    else:
        room = args.cpu_room_gb * 1e9
    common = dict(model=args.model, weights_gb=round(weights / 1e9, 2), per_token_kb=round(per_token / 1e3, 2))

    def trial(context: int, batch: int) -> dict[str, Any]:
        r = run_trial(model, args.cache, context, batch, chunk=args.chunk, new_tokens=args.new_tokens,
                      device=args.device)
        logger.info("trial %s", r)
        return r

    for ctx in contexts:
        start = max(1, int(room // (per_token * ctx)))
        best, trials = search(lambda b, c=ctx: trial(c, b), start, max_trials=args.max_trials)
        logger.info("%s: context %d, largest batch %s", args.cache, ctx, best)
        yield from (dict(common, search=f"batch at {ctx}", largest=best, **t) for t in trials)
    if args.max_context:
        step = args.context_step
        start = max(step, int(room // per_token) // step * step)
        best, trials = search(lambda c: trial(c, 1), start, step=step, lo=step, hi=args.max_context,
                              max_trials=args.max_trials)
        logger.info("%s: batch 1, longest context %s", args.cache, best)
        yield from (dict(common, search="context at batch 1", largest=best, **t) for t in trials)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    ap.add_argument("--contexts", default="32768,131072", help="contexts at which to find the largest batch")
    ap.add_argument("--max-context", type=int, default=4_194_304,
                    help="also find the longest context at batch 1, up to this many tokens (0: skip)")
    ap.add_argument("--context-step", type=int, default=32768, help="resolution of the longest-context search")
    ap.add_argument("--caches", default="dynamic-nocudnn,tq4/4,tq4/4-reserved",
                    help="as bench.kv_generate.make_cache_for: dynamic[-nocudnn], static-nocudnn, tqK/V[-reserved]")
    ap.add_argument("--chunk", type=int, default=512, help="tokens of every sequence in the last prefill forward")
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--probe-tokens", type=int, default=16384)
    ap.add_argument("--margin-gb", type=float, default=2.0, help="left out of the prediction (activations)")
    ap.add_argument("--memory-fraction", type=float, default=1.0,
                    help="cap the device memory a process may take (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--cpu-room-gb", type=float, default=0.05, help="CPU runs: the memory the prediction assumes")
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="kv_capacity")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one cache, print JSON rows
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.chunk < 1 or args.context_step < 1 or not 0 < args.memory_fraction <= 1:
        raise SystemExit(f"--chunk and --context-step must be >= 1 and --memory-fraction in (0, 1]; got "
                         f"{args.chunk}, {args.context_step}, {args.memory_fraction}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.one:
        for r in run_cache(args):
            print("ROW " + json.dumps(r), flush=True)
        return
    from bench.common import write_results

    t_all = time.time()
    rows: list[dict[str, Any]] = []
    for c in args.caches.split(","):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "bench.kv_capacity", "--one", "--cache", c, "--model", args.model,
               "--contexts", args.contexts, "--max-context", str(args.max_context), "--context-step",
               str(args.context_step), "--chunk", str(args.chunk), "--new-tokens", str(args.new_tokens),
               "--probe-tokens", str(args.probe_tokens), "--margin-gb", str(args.margin_gb), "--memory-fraction",
               str(args.memory_fraction), "--cpu-room-gb", str(args.cpu_room_gb), "--max-trials",
               str(args.max_trials), "--device", args.device]
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # rows as they come (a run cut short keeps them in the log)
                if line.startswith("ROW "):
                    rows.append(json.loads(line[4:]))
                    logger.info("%s", rows[-1])
        if proc.returncode:  # its traceback went to this process's stderr
            rows.append(dict(model=args.model, cache=c, search="(process)", error=f"exit code {proc.returncode}"))
    notes = (
        f"Random-weight {args.model} (bench/kv_generate.py MODELS), {args.device}, one process per cache. Each row "
        f"is one trial: the history (context - {args.chunk} tokens of every sequence) filled synthetically through "
        "the cache's own update() in 16 chunks (random keys/values of the model's shapes: a full prefill of these "
        f"sizes takes minutes a trial), then generate() over the whole prompt: the last {args.chunk} tokens of every "
        f"sequence in one real forward over that history, then {args.new_tokens} decode steps. fits: the whole trial "
        "ran without running out of device memory; largest: the search's answer (batch, or context at batch 1; "
        f"context resolution {args.context_step}); bound: the smallest tried that did not fit (none: a lower bound). peak_gb: max_memory_allocated of the trial, weights included. "
        "kv_gb: bytes the cache holds at the end (TurboQuantCache: memory_usage().total; kv_gb_allocated: with the "
        "code buffers' spare room); per_token_kb: the probe's held bytes per token of one sequence, all layers. "
        "tpot_ms: median decode step at that size; tokens_per_s: batch / tpot. dynamic-nocudnn: DynamicCache + sdpa "
        "with cuDNN SDPA off; static-nocudnn: StaticCache(max_cache_len=context + new tokens) + sdpa, cuDNN off, eager "
        "(generate(disable_compile=True); no growth: fp16's best case); tqK/V: TurboQuantCache (MSE, residual 128, encode_batch 64) + attention "
        "'tqindex', its code buffers growing by an eighth; tqK/V-reserved: the same with max_cache_len=context + new "
        "tokens (buffers allocated once). "
        f"Total {time.time() - t_all:.0f} s.")
    cols = ["cache", "search", "largest", "bound", "context", "batch", "fits", "peak_gb", "kv_gb", "kv_gb_allocated",
            "weights_gb", "per_token_kb", "fill_s", "last_chunk_s", "tpot_ms", "tokens_per_s", "error"]
    write_results(args.name, rows, columns=cols, notes=notes)


if __name__ == "__main__":
    main()

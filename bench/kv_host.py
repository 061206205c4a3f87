"""Host time of one attention layer's decode step: TurboQuantCache + attention "tqindex" vs DynamicCache + SDPA.

A decode step at batch 1-8 is bound by the CPU that launches its kernels (bench/results/kv_step_h200.md:
2.7 ms of GPU work in a 14.6 ms DynamicCache step), so what a layer costs the host decides the time
per token. For one layer with Llama-3-8B shapes (32 query / 8 KV heads of 128, fp16) after a prefill
of ``--context`` tokens, each piece is called ``--reps`` times back to back: ``host_us`` is the time
per call before the final ``torch.cuda.synchronize()``, ``wall_us`` after it. Pieces:

- ``layer step``: ``cache.update(k, v, 0)`` then the registered attention function, as a decoder layer
  calls them (TurboQuantCache + ``tq_attention_forward``; DynamicCache + transformers'
  ``sdpa_attention_forward`` with cuDNN SDPA off, the issue's baseline);
- ``update`` / ``attention`` alone; the decode kernels launched through ``tqindex.kernels.launch``
  and through Triton's ``kernel[grid](...)`` with the same arguments.

    python -m bench.kv_host --context 32768 --batches 1,8 --name kv_host_h200
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch


def _time(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return 1e6 * host / reps, 1e6 * wall / reps


def _config(layers: int = 1) -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      num_hidden_layers=layers, intermediate_size=64, vocab_size=128)
    cfg._attn_implementation = "sdpa"
    return cfg


class _Module(torch.nn.Module):  # what attention functions read from the calling layer
    def __init__(self) -> None:
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = 4
        self.training = False


def run_batch(batch: int, context: int, reps: int) -> list[dict[str, Any]]:
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import tqindex.kernels.decode_attention as da
    from tqindex.kvcache import ATTN_NAME, TurboQuantCache, tq_attention_forward

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    h, hq, d = 8, 32, 128
    prompt_k = torch.randn(batch, h, context, d, device=dev, dtype=torch.float16, generator=g)
    prompt_v = torch.randn(batch, h, context, d, device=dev, dtype=torch.float16, generator=g)
    kn = torch.randn(batch, h, 1, d, device=dev, dtype=torch.float16, generator=g)
    vn = torch.randn(batch, h, 1, d, device=dev, dtype=torch.float16, generator=g)
    q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.float16, generator=g)
    module = _Module()
    scale = d ** -0.5
    rows = []

    def add(cache: str, piece: str, fn: Callable[[], Any]) -> None:
        host, wall = _time(fn, reps)
        rows.append(dict(batch=batch, context=context, cache=cache, piece=piece, host_us=round(host, 1),
                         wall_us=round(wall, 1)))

    # DynamicCache + SDPA (cuDNN off: it re-plans for every new length)
    torch.backends.cuda.enable_cudnn_sdp(False)
    dyn = DynamicCache(config=_config())
    dyn.update(prompt_k, prompt_v, 0)

    def dyn_step() -> Any:
        k, v = dyn.update(kn, vn, 0)
        return sdpa_attention_forward(module, q, k, v, None, scaling=scale)

    add("DynamicCache + sdpa", "layer step", dyn_step)
    kd, vd = dyn.layers[0].keys, dyn.layers[0].values
    add("DynamicCache + sdpa", "attention", lambda: sdpa_attention_forward(module, q, kd, vd, None, scaling=scale))

    cfg = _config()
    cfg._attn_implementation = ATTN_NAME
    tq = TurboQuantCache(config=cfg, key_bits=4, value_bits=4, key_codec="mse", residual_length=128)
    tq.update(prompt_k, prompt_v, 0)

    def tq_step() -> Any:
        k, v = tq.update(kn, vn, 0)
        return tq_attention_forward(module, q, k, v, None, scaling=scale)

    add("TurboQuantCache 4/4", "layer step", tq_step)
    add("TurboQuantCache 4/4", "update", lambda: tq.update(kn, vn, 0))
    k, v = tq.update(kn, vn, 0)
    add("TurboQuantCache 4/4", "attention", lambda: tq_attention_forward(module, q, k, v, None, scaling=scale))

    launches: list = []
    real = da.launch
    da.launch = lambda fn, grid, *a, **kw: (launches.append((fn, grid, a, kw)), real(fn, grid, *a, **kw))[1]
    try:
        tq_attention_forward(module, q, k, v, None, scaling=scale)
    finally:
        da.launch = real
    for fn, grid, a, kw in launches:
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
        add("TurboQuantCache 4/4", f"{name}: tqindex launch()", lambda: real(fn, grid, *a, **kw))
        plain = {k: v for k, v in kw.items() if k not in ("cache", "key")}
        add("TurboQuantCache 4/4", f"{name}: Triton kernel[grid]()", lambda: fn[grid](*a, **plain))
    return rows


def main(argv: list[str] | None = None) -> None:
    from bench.common import write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--name", default="kv_host_h200")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kv_host needs CUDA")
    rows = []
    with torch.no_grad():
        for b in (int(x) for x in args.batches.split(",")):
            rows += run_batch(b, args.context, args.reps)
            torch.cuda.empty_cache()
    for r in rows:
        print(f"{r['batch']:>2} {r['cache']:22s} {r['piece']:45s} host {r['host_us']:8.1f} us  wall {r['wall_us']:8.1f} us")
    notes = ("One attention layer, Llama-3-8B shapes, fp16, after a prefill of the context; each piece called "
             f"{args.reps} times in a row (after 20 warm-up calls): host_us = time per call before the closing "
             "torch.cuda.synchronize(), wall_us = after it. A layer step = cache.update + the attention function "
             "as transformers' decoder layer calls them; DynamicCache runs transformers' sdpa_attention_forward "
             "with cuDNN SDPA disabled (flash). TurboQuantCache: key/value 4 bits, MSE, residual 128.")
    write_results(args.name, rows, columns=["batch", "context", "cache", "piece", "host_us", "wall_us"], notes=notes)


if __name__ == "__main__":
    main()

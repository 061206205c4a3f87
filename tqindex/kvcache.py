"""TurboQuantCache: a transformers KV cache whose keys/values are TurboQuant codes, read by a registered attention.

Usage::

    from tqindex.kvcache import TurboQuantCache, enable
    enable(model)                       # registers attention "tqindex" and selects it on the model
    cache = TurboQuantCache(config=model.config, key_bits=4, value_bits=4)
    out = model.generate(input_ids, **{cache_kwarg(model): cache}, max_new_tokens=64)
    cache.memory_usage()

(``cache_kwarg`` is ``"cache"`` on transformers releases that renamed ``past_key_values`` (5.24 has
the new name, 5.17 not), else ``"past_key_values"``; write the name your version takes if you prefer.)

Each layer keeps at least the newest ``residual_length`` tokens in full precision. A prefill or chunk
encodes every token beyond them; single-token decode steps let ``encode_batch`` of them gather first
(the window then holds ``residual_length`` .. ``residual_length + encode_batch - 1`` tokens and one
step in ``encode_batch`` launches the encoder: its host time, about that of a whole SDPA call on the
H200 machine, is paid once a batch instead of every step). Each token is encoded exactly once (per
head, with TurboQuant-MSE or -PROD for keys and -MSE for values) and never decoded and re-encoded.
``outlier_channels`` channels per head, chosen by magnitude on the first tokens encoded (the
prefill), get ``outlier_bits`` bits, the rest the base bits: 32 channels at 3 bits + 32 at 2 bits
is 2.5 bits per channel at head_dim 64. Optionally
(``key_centering=True``) keys are centred by the per-head mean of those first tokens before coding
(the attention adds q . mean back exactly); on SmolLM2 this measured worse than plain coding
(bench/results/kvcache.md), so it is off by default.

Only full-attention layers are coded: sliding-window and chunked-attention layers of hybrid models
(Gemma 2/3, Mistral, Qwen ``layer_types``) keep transformers' bounded full-precision window
(:class:`SlidingWindowLayer`) and run plain SDPA.

With attention "tqindex" selected, each layer's ``update`` returns only the full-precision tokens
(tagged with a reference to the layer) and :func:`tq_attention_forward` reads the codes through
:mod:`tqindex.kernels.attention` (prefill and chunks in O(tokens) memory:
:mod:`tqindex.kernels.online_attention`). With any other attention implementation the cache still
works but returns dequantized keys/values (logged once): correct, but without the memory or speed benefit.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from tqindex.codec import Codes, TurboQuantMSE, TurboQuantProd
from tqindex.kernels.attention import CodePart, QuantizedKV, quantized_attention, use_triton_attention
from tqindex.kernels.decode_attention import DecodePlan, decode_call_ok, decode_parts_ok, decode_plan, decode_run
from tqindex.kernels.encode_append import encode_append_ok, encode_append_triton
from tqindex.kernels.launch import on_device

try:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicSlidingWindowLayer
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("tqindex.kvcache needs transformers>=5.0: pip install 'tqindex[kv]'") from exc

__all__ = ["ATTN_NAME", "KVMemory", "SlidingWindowLayer", "TurboQuantCache", "TurboQuantLayer", "cache_kwarg", "enable",
           "layer_types", "register", "tq_attention_forward"]

logger = logging.getLogger(__name__)

ATTN_NAME = "tqindex"


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model.forward`` / ``model.generate`` take a cache on the installed
    transformers: ``"cache"`` where ``past_key_values`` was renamed (it then warns that the old name is
    deprecated), else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

_TAG = "_tqindex_ref"  # attribute set on the key tensor returned by update(): (layer, coded tokens visible)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer in {rng}, got {value!r}")
    return int(value)


def _part_seed(seed: int, layer: int, stream: int, part: int) -> int:
    """Seed of one codec: distinct per layer, stream (0 keys, 1 values) and part (0 base, 1 outliers)."""
    return (int(seed) * 1_000_003 + layer * 4 + stream * 2 + part) % (2**62)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when it is a view holding on to a storage more than twice its size
    (the window sliced out of a long prefill's keys would otherwise keep the whole prefill alive)."""
    if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size():
        return t.clone()
    return t


def _held_bytes(t: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``t`` (what keeping ``t`` costs), 0 for None."""
    return 0 if t is None else t.untyped_storage().nbytes()


class _Buffer:
    """A tensor growing along its token axis (dim 2) with amortised O(1) appends; ``reserve``: tokens its first
    allocation makes room for (the cache's ``max_cache_len``), so that it need not grow."""

    def __init__(self, reserve: int = 0) -> None:
        self.data: torch.Tensor | None = None
        self.n = 0
        self.first = reserve

    def reserve(self, shape: tuple[int, ...], add: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Room for ``add`` more tokens of (shape[0], shape[1], *, *shape[2:]): the (possibly regrown) storage,
        whose rows [n, n + add) the caller writes before :meth:`commit`."""
        if self.data is None:
            self.data = torch.empty(*shape[:2], max(16, add, self.first), *shape[2:], dtype=dtype, device=device)
        elif self.n + add > self.data.shape[2]:
            # grow by an eighth (at least 256 tokens): still amortised O(1), and a prefill of L tokens followed
            # by one decode token holds 1.125 L, not 2 L (a quarter left 16% of a 32-layer cache's buffers empty
            # at 128k x 22 on the H200: bench/results/kv_capacity_h200.md)
            cap = max(self.n + add, self.data.shape[2] + max(256, self.data.shape[2] // 8))
            new = torch.empty(*self.data.shape[:2], cap, *self.data.shape[3:], dtype=dtype, device=device)
            new[:, :, : self.n] = self.data[:, :, : self.n]
            self.data = new
        return self.data

    def commit(self, add: int) -> None:
        self.n += add

    def append(self, t: torch.Tensor) -> None:
        add = t.shape[2]
        self.reserve((*t.shape[:2], *t.shape[3:]), add, t.dtype, t.device)[:, :, self.n : self.n + add] = t
        self.commit(add)

    def view(self) -> torch.Tensor:
        return self.data[:, :, : self.n]

    def batch_apply(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.data)

    @property
    def nbytes_used(self) -> int:
        if self.data is None:
            return 0
        return self.view().numel() * self.data.element_size()

    @property
    def nbytes_allocated(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class _StreamCodes:
    """The coded tokens of one stream (keys or values) of one layer: codecs per channel group + buffers."""

    def __init__(self, *, kind: str, bits: int, outlier_channels: int, outlier_bits: int | None, center: bool,
                 seed: int, layer: int, stream: int, reserve: int = 0) -> None:
        self.kind = kind
        self.reserve = reserve  # tokens each buffer's first allocation holds
        self.bits = bits
        self.outlier_channels = outlier_channels
        self.outlier_bits = outlier_bits
        self.center = center
        self.seed = seed
        self.layer = layer
        self.stream = stream
        self.codecs: list[TurboQuantMSE | TurboQuantProd] = []
        self.channels: list[torch.Tensor | None] = []
        self.mean: torch.Tensor | None = None  # (B, H, d) float32
        self.buffers: list[dict[str, _Buffer]] = []
        self.fused = False  # encode through tqindex.kernels.encode_append (set by setup)
        self.kernels: dict = {}  # that kernel's tables and compiled launches (tqindex.kernels.launch)

    @property
    def ready(self) -> bool:
        return bool(self.codecs)

    def _make(self, dim: int, bits: int, part: int, device: torch.device) -> TurboQuantMSE | TurboQuantProd:
        cls = TurboQuantProd if self.kind == "prod" else TurboQuantMSE
        return cls(dim, bits, seed=_part_seed(self.seed, self.layer, self.stream, part), device=device,
                   rotation="haar", norm_dtype="float16")

    def setup(self, x: torch.Tensor) -> None:
        """Fix the mean and the channel split from the first tokens to encode, x (B, H, n, d)."""
        b, h, n, d = x.shape
        xf = x.to(torch.float32)
        if self.center:
            self.mean = xf.mean(dim=2)
            xf = xf - self.mean.unsqueeze(2)
        dev = x.device
        if self.outlier_channels:
            energy = xf.pow(2).mean(dim=(0, 2))  # (H, d)
            top = energy.topk(self.outlier_channels, dim=-1).indices.sort(dim=-1).values
            rest = torch.ones(h, d, dtype=torch.bool, device=dev)
            rest.scatter_(1, top, False)
            base = torch.arange(d, device=dev).expand(h, d)[rest].view(h, d - self.outlier_channels)
            self.channels = [base, top]
            self.codecs = [self._make(d - self.outlier_channels, self.bits, 0, dev),
                           self._make(self.outlier_channels, self.outlier_bits, 1, dev)]
        else:
            self.channels = [None]
            self.codecs = [self._make(d, self.bits, 0, dev)]
        self.buffers = [dict() for _ in self.codecs]
        c = self.codecs[0]
        self.fused = (self.kind == "mse" and self.mean is None and len(self.codecs) == 1
                      and use_triton_attention(dev) and encode_append_ok(d, c.mse_bits))

    def _reserve(self, x: torch.Tensor) -> tuple:
        """A fused stream's ``encode_append_triton`` arguments for tokens x (B, H, n, d), room reserved."""
        b, h, n, _ = x.shape
        codec, bufs = self.codecs[0], self.buffers[0]
        mse, nrm = bufs.setdefault("mse", _Buffer(self.reserve)), bufs.setdefault("norms", _Buffer(self.reserve))
        return (x, codec, mse.reserve((b, h, codec.mse_bytes), n, torch.uint8, x.device),
                nrm.reserve((b, h), n, torch.float16, x.device), mse.n)

    def _commit(self, n: int) -> None:
        for buf in self.buffers[0].values():
            buf.commit(n)

    def encode(self, x: torch.Tensor, paired: tuple[_StreamCodes, torch.Tensor] | None = None) -> None:
        """Encode and append tokens x (B, H, n, d) (any float dtype); ``paired``: another stream and its tokens
        of the same shape (the layer's values), coded in the same launch when both streams are fused."""
        if not self.ready:
            self.setup(x)
        n = x.shape[2]
        other, y = paired if paired is not None else (None, None)
        if other is not None and not other.ready:
            other.setup(y)
        if self.fused and other is not None and other.fused and y.shape == x.shape:  # both streams, one launch
            encode_append_triton(*self._reserve(x), second=other._reserve(y), cache=self.kernels)
            self._commit(n)
            other._commit(n)
            return
        if self.fused:  # one Triton launch: codes straight into the buffers (CUDA / Triton's interpreter)
            encode_append_triton(*self._reserve(x), cache=self.kernels)
            self._commit(n)
        else:
            self._encode_torch(x)
        if other is not None:
            other.encode(y)

    def _encode_torch(self, x: torch.Tensor) -> None:
        """The codec's encode of tokens x (B, H, n, d), appended to the buffers (outlier splits, centring, PROD)."""
        b, h, n, d = x.shape
        xf = x.to(torch.float32)
        if self.mean is not None:
            xf = xf - self.mean.unsqueeze(2)
        for codec, chans, bufs in zip(self.codecs, self.channels, self.buffers):
            xp = xf if chans is None else torch.gather(xf, -1, chans.view(1, h, 1, -1).expand(b, h, n, -1))
            codes = codec.encode_tensor(xp.reshape(b * h * n, xp.shape[-1]))  # unchecked: no sync per layer and step
            fields = {"mse": codes.mse, "norms": codes.norms, "qjl": codes.qjl, "gammas": codes.gammas}
            for name, t in fields.items():
                if t is not None:
                    bufs.setdefault(name, _Buffer(self.reserve)).append(t.view(b, h, n, *t.shape[1:]))

    def parts(self) -> list[CodePart]:
        out = []
        for codec, chans, bufs in zip(self.codecs, self.channels, self.buffers):
            def get(name: str) -> torch.Tensor | None:
                return bufs[name].view() if name in bufs else None

            out.append(CodePart(
                mse=get("mse"), norms=get("norms"), qjl=get("qjl"), gammas=get("gammas"), channels=chans,
                rotation=codec.rotation.matrix, centroids=codec.centroids, mse_bits=codec.mse_bits,
                qjl_matrix=getattr(codec, "qjl_matrix", None), qjl_scale=float(getattr(codec, "qjl_scale", 0.0)),
            ))
        return out

    def decode(self, n: int, d: int) -> torch.Tensor:
        """The first n coded tokens dequantized: (B, H, n, d) float32."""
        out = None
        for codec, chans, bufs in zip(self.codecs, self.channels, self.buffers):
            mse, norms = bufs["mse"].view()[:, :, :n], bufs["norms"].view()[:, :, :n]
            b, h = norms.shape[:2]
            flat = lambda t: None if t is None else t.reshape(b * h * n, *t.shape[3:])  # noqa: E731
            qjl = bufs["qjl"].view()[:, :, :n] if "qjl" in bufs else None
            gam = bufs["gammas"].view()[:, :, :n] if "gammas" in bufs else None
            codes = Codes(codec.dim, flat(mse).contiguous(), flat(norms), None if qjl is None else flat(qjl).contiguous(),
                          flat(gam))
            xp = codec.decode(codes).view(b, h, n, codec.dim)
            if out is None:
                out = torch.zeros(b, h, n, d, device=xp.device)
            out = out + xp if chans is None else out.scatter_add(-1, chans.view(1, h, 1, -1).expand(b, h, n, -1), xp)
        if self.mean is not None:
            out = out + self.mean.unsqueeze(2)
        return out

    def batch_apply(self, fn) -> None:
        if self.mean is not None:
            self.mean = fn(self.mean)
        for bufs in self.buffers:
            for buf in bufs.values():
                buf.batch_apply(fn)

    def nbytes(self) -> tuple[int, int, int]:
        """(packed code bytes, per-token float bytes (norms, gammas), side bytes (mean, channel lists))."""
        codes = sum(b[k].nbytes_used for b in self.buffers for k in ("mse", "qjl") if k in b)
        floats = sum(b[k].nbytes_used for b in self.buffers for k in ("norms", "gammas") if k in b)
        side = 0 if self.mean is None else self.mean.numel() * 4
        side += sum(0 if c is None else c.numel() * 2 for c in self.channels)  # int16 would do; report compactly
        return codes, floats, side

    def nbytes_allocated(self) -> int:
        return sum(buf.nbytes_allocated for b in self.buffers for buf in b.values())


class TurboQuantLayer(CacheLayerMixin):
    """One attention layer's cache: TurboQuant codes of old tokens + a full-precision window of new ones.

    Keys/values arrive as (B, H, n, d) tensors. Positions [0, n_codes) are coded; the rest are kept
    in ``self.keys`` / ``self.values`` (the window, model dtype).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, *, layer_idx: int, key_bits: int, value_bits: int, key_codec: str, residual_length: int,
                 outlier_channels: int, outlier_bits: int | None, key_centering: bool, seed: int,
                 encode_batch: int = 1, max_cache_len: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_length = residual_length
        # code buffers allocated for this many tokens less the window at once (private: in transformers 5.17
        # Cache.max_cache_len is a read-only property)
        self._max_cache_len = max_cache_len
        # tokens beyond the window that make a decode step encode (all of them then); TurboQuantCache passes its
        # own (default 64), a layer built alone encodes each token as it leaves
        self.encode_batch = encode_batch
        self.cumulative_length = 0
        self.n_codes = 0
        self._plan: tuple | None = None  # (query heads, buffer tensors, DecodePlan or None): see decode_plan
        self._kwargs = dict(key_bits=key_bits, value_bits=value_bits, key_codec=key_codec,
                            outlier_channels=outlier_channels, outlier_bits=outlier_bits,
                            key_centering=key_centering, seed=seed)
        self._new_streams()

    def _new_streams(self) -> None:
        k = self._kwargs
        reserve = max(0, (self._max_cache_len or 0) - self.residual_length)
        self.key_codes = _StreamCodes(kind=k["key_codec"], bits=k["key_bits"], outlier_channels=k["outlier_channels"],
                                      outlier_bits=k["outlier_bits"], center=k["key_centering"], seed=k["seed"],
                                      layer=self.layer_idx, stream=0, reserve=reserve)
        self.value_codes = _StreamCodes(kind="mse", bits=k["value_bits"], outlier_channels=k["outlier_channels"],
                                        outlier_bits=k["outlier_bits"], center=False, seed=k["seed"],
                                        layer=self.layer_idx, stream=1, reserve=reserve)

    # -- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.head_dim = key_states.shape[-1]
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, return_codes: bool = True,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, n, d) keys/values and encode the tokens beyond the newest ``residual_length``: at
        once for a call of several tokens (prefill, chunks), and for single-token decode steps once
        ``encode_batch`` of them have gathered (the window is exactly ``residual_length`` long after an encode).

        Returns:
            With ``return_codes`` (attention "tqindex"): the full-precision tokens of positions
            [n_codes_before, total) — the window plus the tokens encoded during this call, which this
            call still attends to in full precision — tagged for :func:`tq_attention_forward`.
            Otherwise: every position's keys/values, the coded ones dequantized.
        """
        ks = key_states.shape
        if len(ks) != 4 or ks != value_states.shape:
            raise ValueError(f"keys and values must both be (batch, heads, tokens, head_dim), got "
                             f"{tuple(ks)} and {tuple(value_states.shape)}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            cs = self.keys.shape
            if ks[0] != cs[0] or ks[1] != cs[1] or ks[3] != self.head_dim:
                raise ValueError(f"keys of shape {tuple(ks)} do not match this cache's (batch, heads, head_dim) = "
                                 f"({cs[0]}, {cs[1]}, {self.head_dim})")
        n_before = self.n_codes
        if ks[2] != 1:  # not a decode step: the kept plan could hold buffers a regrowth replaces
            self._plan = None
        self.cumulative_length += ks[2]
        dt = self.dtype
        keys = torch.cat([self.keys, key_states if key_states.dtype == dt else key_states.to(dt)], dim=2)
        values = torch.cat([self.values, value_states if value_states.dtype == dt else value_states.to(dt)], dim=2)
        leave = keys.shape[2] - self.residual_length
        if leave >= self.encode_batch or leave > 0 and ks[2] != 1:
            with on_device(keys):
                self.key_codes.encode(keys[:, :, :leave], paired=(self.value_codes, values[:, :, :leave]))
            self.n_codes += leave
            self.keys, self.values = keys[:, :, leave:], values[:, :, leave:]
            if leave > self.residual_length:  # the window, a view of less than half the fresh cat: copy it out
                self.keys, self.values = self.keys.clone(), self.values.clone()
        else:
            self.keys, self.values = keys, values
        if return_codes:
            # a separate tensor object, so the layer never references its tag (not the cat itself either: the window
            # the layer keeps is a view whose base is the cat, and a tensor with attributes outlives its Python
            # wrapper through its views: a cycle holding the layer until the garbage collector runs)
            tagged = keys.view(keys.shape)
            setattr(tagged, _TAG, (self, n_before))
            return tagged, values
        if n_before == 0:
            return keys, values
        k_old = self.key_codes.decode(n_before, self.head_dim).to(self.dtype)
        v_old = self.value_codes.decode(n_before, self.head_dim).to(self.dtype)
        return torch.cat([k_old, keys], dim=2), torch.cat([v_old, values], dim=2)

    def quantized(self, n: int | None = None) -> QuantizedKV | None:
        """The first ``n`` coded tokens (default: all) as a :class:`QuantizedKV` view, or None if n == 0."""
        n = self.n_codes if n is None else n
        if n == 0:
            return None
        return QuantizedKV(keys=[p.slice(n) for p in self.key_codes.parts()],
                           values=[p.slice(n) for p in self.value_codes.parts()],
                           key_mean=self.key_codes.mean, length=n, head_dim=self.head_dim)

    def decode_plan(self, n_query_heads: int) -> DecodePlan | None:
        """The decode kernels' :class:`~tqindex.kernels.decode_attention.DecodePlan` over this layer's codes for
        queries of ``n_query_heads`` heads, or None where those kernels do not take them (CPU, outlier split,
        PROD keys, ...). Kept from step to step while the code buffers stay (rebuilt when they grow)."""
        datas = tuple(buf.data for s in (self.key_codes, self.value_codes) for bufs in s.buffers for buf in bufs.values())
        c = self._plan
        if c is not None and c[0] == n_query_heads and len(c[1]) == len(datas) and all(a is b for a, b in zip(c[1], datas)):
            return c[2]
        kv = self.quantized()
        plan = decode_plan(kv, n_query_heads) if decode_parts_ok(kv, n_query_heads) else None
        self._plan = (n_query_heads, datas, plan)
        return plan

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.2x passed cache_position
            query_length = query_length.shape[0]
        return self.cumulative_length + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # older transformers name
        return -1

    def offload(self) -> None:  # offloading is not supported: codes stay where they are
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.n_codes = 0
        self._plan = None
        self._new_streams()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("TurboQuantCache cannot be cropped: coded tokens are never decoded and re-encoded")

    def _batch_apply(self, fn) -> None:
        self._plan = None
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.key_codes.batch_apply(fn)
            self.value_codes.batch_apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """A sliding-window (or chunked-attention) layer: transformers' own bounded full-precision window.

    Kept in full precision (docs/kvcache.md gives the argument, from byte counts): it holds at most
    ``sliding_window - 1`` tokens, whatever the context. The one change to transformers' layer:
    the kept tokens are copied out of the call's tensors when they are a small view of them, so a
    long prefill's keys/values are released after the call instead of staying alive behind the window.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, n, d) keys/values in -> the window plus these tokens, as transformers' layer returns them."""
        k, v = super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = _compact(self.keys), _compact(self.values)
        return k, v


def layer_types(config: Any) -> list[str]:
    """Attention type of each decoder layer: ``config.layer_types`` where the config has it, else
    "sliding_attention" for every layer of a model with ``sliding_window`` set (Mistral;
    ``use_sliding_window=False`` turns it off), "chunked_attention" for ``attention_chunk_size``,
    else "full_attention"."""
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is not None:
        types = list(types)
        if len(types) != n:
            raise ValueError(f"config.layer_types has {len(types)} entries but the model has {n} layers")
        return types
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


@dataclass
class KVMemory:
    """Bytes held by a TurboQuantCache (all layers, keys and values).

    Attributes:
        tokens: cached positions per sequence (layer 0).
        codes: packed indices and QJL sign bits.
        norms: per-token floats (norms, PROD residual norms), float16.
        window: the full-precision window of the coded (full-attention) layers, model dtype.
        side: per-head mean keys and channel lists.
        sliding: the full-precision tokens of the sliding-window / chunked (and any other uncoded) layers.
        total: codes + norms + window + sliding + side: the bytes of what is cached.
        fp16: what the same tokens take as fp16 keys and values (a sliding layer: the tokens it keeps).
        allocated: the bytes actually held: code buffers with their spare capacity, and the storage
            behind every window (>= total).
        bits_per_value: (codes + norms) * 8 / coded key+value coordinates (overhead included).
    """

    tokens: int
    codes: int
    norms: int
    window: int
    side: int
    total: int
    fp16: int
    allocated: int
    bits_per_value: float
    sliding: int = 0

    @property
    def compression(self) -> float:
        """fp16 bytes / bytes held."""
        return self.fp16 / self.total if self.total else 1.0


class TurboQuantCache(Cache):
    """A transformers Cache: a :class:`TurboQuantLayer` per full-attention decoder layer, a
    :class:`SlidingWindowLayer` per sliding-window / chunked one.

    Args:
        config: the model's config (``model.config``). Full-attention layers are coded; sliding-window
            and chunked-attention layers (Gemma 2/3, Mistral, Qwen ``layer_types``) keep transformers'
            bounded full-precision window (:class:`SlidingWindowLayer`); any other layer type gets the
            layer transformers' ``DynamicCache`` would give it.
        key_bits: bits per key channel, 1..8 (PROD: one of them is the QJL sign bit).
        value_bits: bits per value channel, 1..8 (values always use TurboQuant-MSE).
        key_codec: "mse" (biased, low variance: recommended) or "prod" (unbiased inner products).
        residual_length: newest tokens always kept in full precision (>= 0).
        encode_batch: single-token decode steps encode the tokens beyond the window once this many have
            gathered (>= 1; 1: each step encodes the token leaving the window). The default 64 keeps up
            to 63 more tokens in full precision (fp16 keys and values: 31.5 KiB per layer and KV head at
            head_dim 128) and runs the encoder in one decode step of 64. Calls of several tokens
            (prefill, chunks) encode down to ``residual_length`` whatever this is.
        max_cache_len: tokens per sequence the cache will hold (prompt + new tokens), as transformers'
            ``StaticCache(max_cache_len=...)``; None (default): unknown. Given, every coded layer allocates its
            code buffers for that many tokens (less the window) at its first encode, so they never grow: no
            spare room (growing buffers keep up to an eighth of their size spare) and no copy of a layer's
            codes while old and new buffers are both held. Longer sequences still work: the buffers grow then.
        outlier_channels: channels per head coded with ``outlier_bits`` (0 .. head_dim - 1).
        outlier_bits: bits for the outlier channels, 1..8; required when outlier_channels > 0.
        seed: seed of every rotation / QJL matrix (same seed, same codes).
        key_centering: subtract each head's mean key (of the first tokens coded) before coding
            (off by default: it measured worse on SmolLM2).
    Raises:
        ValueError: an argument out of range (message names given and expected values).
    """

    def __init__(self, config: Any = None, *, key_bits: int = 4, value_bits: int = 4, key_codec: str = "mse",
                 residual_length: int = 128, outlier_channels: int = 0, outlier_bits: int | None = None,
                 seed: int = 0, key_centering: bool = False, encode_batch: int = 64,
                 max_cache_len: int | None = None) -> None:
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise ValueError(f"config must be the model's transformers config (model.config), got {type(config).__name__}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        _check_int("config.num_hidden_layers", text.num_hidden_layers, 1)
        n_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        types = layer_types(text)
        key_bits = _check_int("key_bits", key_bits, 1, 8)
        value_bits = _check_int("value_bits", value_bits, 1, 8)
        if key_codec not in ("mse", "prod"):
            raise ValueError(f"key_codec must be 'mse' or 'prod', got {key_codec!r}")
        residual_length = _check_int("residual_length", residual_length, 0)
        encode_batch = _check_int("encode_batch", encode_batch, 1)
        if max_cache_len is not None:
            max_cache_len = _check_int("max_cache_len", max_cache_len, 1)
        outlier_channels = _check_int("outlier_channels", outlier_channels, 0, head_dim - 1)
        if outlier_channels and outlier_channels < 2 or head_dim - outlier_channels < 2 and outlier_channels:
            raise ValueError(f"outlier_channels must leave >= 2 channels in each group (head_dim {head_dim}), "
                             f"got {outlier_channels}")
        if outlier_channels:
            if outlier_bits is None:
                raise ValueError(f"outlier_bits is required with outlier_channels={outlier_channels}, got None")
            outlier_bits = _check_int("outlier_bits", outlier_bits, 1, 8)
        elif outlier_bits is not None:
            raise ValueError(f"outlier_bits={outlier_bits!r} given but outlier_channels=0; expected None")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.config = config
        self.head_dim = head_dim
        self.key_bits, self.value_bits, self.key_codec = key_bits, value_bits, key_codec
        self.residual_length = residual_length
        self.encode_batch = encode_batch
        self._max_cache_len = max_cache_len  # see TurboQuantLayer
        self.outlier_channels, self.outlier_bits = outlier_channels, outlier_bits
        self.seed = seed
        self.key_centering = bool(key_centering)
        self.layer_types = types
        layers: list[CacheLayerMixin] = []
        fallback = None
        for i, kind in enumerate(types):
            if kind == "full_attention":
                layers.append(TurboQuantLayer(layer_idx=i, key_bits=key_bits, value_bits=value_bits,
                                              key_codec=key_codec, residual_length=residual_length,
                                              outlier_channels=outlier_channels, outlier_bits=outlier_bits,
                                              key_centering=self.key_centering, seed=seed,
                                              encode_batch=encode_batch, max_cache_len=max_cache_len))
            elif kind in ("sliding_attention", "chunked_attention"):
                size = getattr(text, "sliding_window" if kind == "sliding_attention" else "attention_chunk_size")
                layers.append(SlidingWindowLayer(sliding_window=_check_int(f"config window of layer {i}", size, 1)))
            else:  # not a layer we code (e.g. linear attention): transformers' own choice
                fallback = fallback or DynamicCache(config=config)
                layers.append(fallback.layers[i])
                logger.info("TurboQuantCache: layer %d has type %r; kept as transformers' %s", i, kind,
                            type(fallback.layers[i]).__name__)
        super().__init__(layers=layers)
        register()
        self._warned = False
        self._codes: bool | None = None  # _codes_attention() as of this forward's first layer

    @property
    def bits(self) -> tuple[float, float]:
        """Nominal (key, value) bits per channel, outlier split included (norms excluded)."""
        o, d = self.outlier_channels, self.head_dim

        def avg(b: int) -> float:
            return (o * (self.outlier_bits or 0) + (d - o) * b) / d

        return avg(self.key_bits), avg(self.value_bits)

    def _codes_attention(self) -> bool:
        impl = getattr(self.config, "_attn_implementation", None)
        if impl == ATTN_NAME:
            return True
        if not self._warned:
            logger.warning("TurboQuantCache: attention implementation is %r, not %r; returning dequantized "
                           "keys/values (correct but no savings). Call tqindex.kvcache.enable(model).", impl, ATTN_NAME)
            self._warned = True
        return False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers")
        layer = self.layers[layer_idx]
        if layer_idx == 0:  # read once a forward (whatever kind layer 0 is): the config lookup costs a few us
            self._codes = None
        if isinstance(layer, TurboQuantLayer):
            if self._codes is None:
                self._codes = self._codes_attention()
            return layer.update(key_states, value_states, return_codes=self._codes)
        return layer.update(key_states, value_states, *args, **kwargs)

    def memory_usage(self) -> KVMemory:
        """Bytes held now (codes + norms + full-precision window + side info) and the fp16 equivalent."""
        codes = norms = window = side = alloc = coords = sliding = 0
        fp16 = 0
        for layer in self.layers:
            if not getattr(layer, "is_initialized", False) or getattr(layer, "keys", None) is None:
                continue
            keep = (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            alloc += _held_bytes(layer.keys) + _held_bytes(layer.values)
            if not isinstance(layer, TurboQuantLayer):  # a sliding window (or another uncoded layer)
                sliding += keep
                fp16 += (layer.keys.numel() + layer.values.numel()) * 2
                continue
            for s in (layer.key_codes, layer.value_codes):
                c, f, sd = s.nbytes()
                codes, norms, side, alloc = codes + c, norms + f, side + sd, alloc + s.nbytes_allocated() + sd
            window += keep
            b, h, _, d = layer.keys.shape
            coords += 2 * b * h * layer.n_codes * d
            fp16 += 2 * b * h * layer.cumulative_length * d * 2
        total = codes + norms + window + sliding + side
        bpv = 8.0 * (codes + norms) / coords if coords else 0.0
        return KVMemory(tokens=self.get_seq_length(), codes=codes, norms=norms, window=window, side=side, total=total,
                        fp16=fp16, allocated=alloc, bits_per_value=bpv, sliding=sliding)

    def __repr__(self) -> str:
        return (f"TurboQuantCache(layers={len(self.layers)}, key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"key_codec={self.key_codec!r}, residual_length={self.residual_length}, "
                f"encode_batch={self.encode_batch}, max_cache_len={self._max_cache_len}, "
                f"outlier_channels={self.outlier_channels}, outlier_bits={self.outlier_bits}, seed={self.seed})")


# ---------------------------------------------------------------------------------------------
# attention registered with transformers
# ---------------------------------------------------------------------------------------------
def tq_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, L, d) -> output (B, L, Hq, d).

    When ``key`` comes from a :class:`TurboQuantLayer` it holds only the full-precision tokens and
    the coded ones are read from the layer; otherwise this is plain SDPA.
    """
    ref = getattr(key, _TAG, None)
    if ref is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer, n_codes = ref
    if kwargs.get("softcap") is not None:
        raise ValueError("attention 'tqindex' does not apply logit soft-capping (as transformers' 'sdpa'); got "
                         f"softcap={kwargs['softcap']!r}, expected None (e.g. attn_logit_softcapping=None)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with on_device(query):
        if n_codes and query.dim() == 4 and query.shape[2] == 1:  # a decode step: the kept plan, two launches
            plan = layer.decode_plan(query.shape[1])
            if plan is not None and decode_call_ok(query, query.shape[1], attention_mask):
                out = decode_run(plan, query, n_codes, key, value, attention_mask, scale)
                return out.transpose(1, 2).contiguous(), None
        out = quantized_attention(query, layer.quantized(n_codes), key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`tq_attention_forward` (and SDPA-style masks) under the name ``"tqindex"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, tq_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable(model: Any) -> Any:
    """Register the attention and select it on ``model`` (a transformers PreTrainedModel); returns the model."""
    register()
    model.set_attn_implementation(ATTN_NAME)
    return model

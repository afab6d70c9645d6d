"""Graph-captured decode: one decode step of the whole model, replayed as a CUDA graph over static buffers.

The eager engine launches ~15 kernels per layer from Python per token; for an 8B model at batch 1 that host work
(~30 ms per token on the H200) is eight times the ~3.9 ms it takes to read the weights. Here one step -- embed,
every layer (fused RMSNorm + residual, q/k/v projection, RoPE fused with the K/V cache write, attention over the
cache, o-projection, SiLU-gate MLP), the final norm, the LM head and the argmax -- runs on static buffers. At one
row every weight matmul is the one-shot Triton GEMV (kernels/gemv.py: 99% of the copy bandwidth over a step's
weights on the H200, against 87% for cuBLAS); at more rows, cuBLAS.

    token [B] long       the token fed this step (the graph writes the argmax of the step's logits back into it)
    pos   [B] long       its position = the sequence's length before the step (incremented by the graph)
    logits [B, V] fp32   the step's logits (for samplers, which pick outside the graph)
    K/V  [B, Hkv, cap, D] per layer: the dense cache's own pre-allocated buffers, cap = the run's maximum context

Nothing in the step depends on a host value (the attention reads each sequence's length from `pos` on the device,
ollm_triton/kernels/attention_decode_varlen.py), so one capture per batch size ("bucket") serves every step and
every later generation that fits its capacity. On the CPU (or with `capture=False`) the same step runs eagerly:
the "static" mode, which tests compare token for token with the engine's ordinary decode loop.

Which plugin combinations are capturable (`capture_blocker`): the step does dense causal attention over the dense
cache's buffers itself, so the attention backend must be one whose decode is exactly that (sdpa, flash, or a
backend declaring `capturable = True`, which promises that), the codec must be `dense` (pre-allocated, in the model
dtype), and the prefetch policy must keep every weight resident (`resident`, or `capturable = True`).

The piecewise step serves every other codec and backend (int4, eviction, sliding window, sparse, ...): the same
compute cut at each layer's attention into L + 1 segments, each captured as its own graph, with the attention --
the codec's append and the backend's decode, data-dependent shapes and all -- run eagerly between them through
static q/k/v/out buffers (`segment`, `attend`). It keeps the codec's own cache and all of its behaviour, and costs
one graph launch and one eager attention call a layer. `fast_decode=auto` takes it on a GPU when the whole step is
not capturable and the weights are resident; anything else decodes eagerly, and `engine.fast_path` says why in one
line (recorded in metrics.json; printed once when a GPU run falls back).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.cache.base import CacheLayer, KVCache, LayerSpec
from ollm_triton.cache.dense import DenseLayer
from ollm_triton.decoding.base import Generation, emit_step
from ollm_triton.engine.model import add_rmsnorm, attention_step, rope_cos_sin
from ollm_triton.kernels.attention_decode_varlen import decode_varlen
from ollm_triton.kernels.gemv import decode_linear
from ollm_triton.kernels.rope import rope_qk, rope_write_kv
from ollm_triton.timing import Timer

FAST_DECODE_MODES = ("auto", "graph", "static", "piecewise", "off")
DENSE_CAUSAL_ATTENTION = ("sdpa", "flash")  # backends whose decode is plain causal attention over every held key
CAPACITY_STEP = 1024  # bucket capacities are rounded up to this, so nearby lengths share a captured graph
MAX_BUCKETS = 2  # captured graphs (each with its KV buffers) kept alive at once


# ---- which runs can use it ----------------------------------------------------------------------------------------


def capture_blocker(engine) -> str | None:
    """Why this engine's plugins cannot run the static decode step (one line), or None when they can."""
    attn = engine.attention
    name = getattr(attn, "plugin_name", type(attn).__name__)
    declared = getattr(attn, "capturable", None)
    if declared is False:
        return f"attention '{name}' declares its decode not capturable"
    dense_causal = name in DENSE_CAUSAL_ATTENTION and not getattr(attn, "window", 0) \
        and getattr(attn, "pattern", None) is None
    if declared is None and not dense_causal:
        return (f"attention '{name}' has no capturable decode (data-dependent shapes); capturable: "
                f"{', '.join(DENSE_CAUSAL_ATTENTION)}")
    codec = getattr(engine.codec, "plugin_name", type(engine.codec).__name__)
    if codec != "dense":  # decided by name: building a probe layer of another codec could touch its storage tier
        return f"cache '{codec}' has no static-buffer decode; capturable: dense"
    cfg = engine.config
    probe = engine.codec.new_layer(LayerSpec(batch=1, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                             dtype=engine.dtype, device=engine.device, max_len=1))
    if not isinstance(probe, DenseLayer) or type(probe).observe is not CacheLayer.observe:
        return f"cache '{codec}' has no static-buffer decode; capturable: dense"
    if probe.dtype != engine.dtype:
        return f"cache '{codec}' stores {str(probe.dtype).replace('torch.', '')}, not the model dtype"
    if probe.k.shape[2] < 1:
        return f"cache '{codec}' is not pre-allocated (preallocate=false grows its buffers)"
    prefetch = getattr(engine.prefetch, "plugin_name", type(engine.prefetch).__name__)
    if prefetch != "resident" and not getattr(engine.prefetch, "capturable", False):
        return f"prefetch '{prefetch}' moves weights between steps; capturable: resident"
    return None


_notified: set[str] = set()


def piecewise_blocker(engine) -> str | None:
    """Why this engine cannot run the piecewise step either (one line), or None when it can. Piecewise: the step's
    dense compute is captured in segments and each layer's attention (the codec's append and the backend's decode)
    runs eagerly between them, so any codec and attention backend works; only the weights must stay put."""
    prefetch = getattr(engine.prefetch, "plugin_name", type(engine.prefetch).__name__)
    if prefetch != "resident" and not getattr(engine.prefetch, "capturable", False):
        return f"prefetch '{prefetch}' moves weights between steps; capturable: resident"
    return None


def plan_fast_path(engine, mode: str) -> str:
    """'graph', 'static', 'piecewise graph (<why not whole>)', 'piecewise static' or 'eager (<reason>)' for `mode`
    in FAST_DECODE_MODES. auto takes the whole captured step when every plugin allows it, else the piecewise one
    on a GPU. A GPU run that asked for the fast path and cannot have it gets a one-line notice on stderr (once per
    reason)."""
    if mode == "off":
        return "eager (fast_decode=off)"
    cuda = engine.device.type == "cuda"
    if mode == "piecewise":
        reason = piecewise_blocker(engine)
        if reason is None:
            return "piecewise graph" if cuda else "piecewise static"
    elif mode in ("auto", "graph") and not cuda:
        reason = "cpu: CUDA graphs need a CUDA device; fast_decode=static replays the same step without capture"
    else:
        reason = capture_blocker(engine)
        if reason is None:
            return "static" if mode == "static" else "graph"
        if mode == "auto" and piecewise_blocker(engine) is None:
            return f"piecewise graph ({reason}: its attention runs eagerly between captured segments)"
    if (cuda or mode != "auto") and reason not in _notified:
        _notified.add(reason)
        print(f"fast decode: eager ({reason})", file=sys.stderr)
    return f"eager ({reason})"


# ---- weight fusion ------------------------------------------------------------------------------------------------


def fuse_projections(model) -> None:
    """Concatenate each layer's q/k/v weights into one [(Hq + 2 Hkv) D, hidden] matrix and gate/up into one
    [2 M, hidden] matrix; the original parameters become views of them (no extra memory after the swap; one
    layer's worth while it happens). The model's forward then runs one matmul where it ran three (two)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_weight is None:
            attn.qkv_weight, attn.qkv_bias = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        if mlp.gate_up_weight is None:
            mlp.gate_up_weight, mlp.gate_up_bias = _fuse(mlp.gate_proj, mlp.up_proj)


def _fuse(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


# ---- static buffers of one batch size ------------------------------------------------------------------------------


@dataclass
class Bucket:
    """The static state of one batch size: a dense KVCache of `capacity` tokens and the step's I/O buffers."""

    batch: int
    capacity: int
    cache: KVCache
    token: torch.Tensor  # [B] long
    pos: torch.Tensor  # [B] long
    logits: torch.Tensor  # [B, V] float32
    cos: torch.Tensor  # [capacity, D] RoPE table in the model dtype
    sin: torch.Tensor
    graph: object | None = None  # torch.cuda.CUDAGraph once captured (piecewise: a list, one a segment)
    # piecewise buckets: the codec's own cache, and the buffers that cross from a captured segment to the eager
    # attention and back (q, k, v, out, residual)
    io: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        for layer in self.cache.layers:
            layer.truncate(0)
        self.cache.position = 0

    def row_cache(self, b: int) -> KVCache:
        """A batch-1 KVCache whose layers write into row b of this bucket's buffers (ragged prefill)."""
        layers = []
        for big in self.cache.layers:
            spec = LayerSpec(batch=1, kv_heads=big.spec.kv_heads, head_dim=big.spec.head_dim, dtype=big.spec.dtype,
                             device=big.spec.device, max_len=self.capacity)
            row = DenseLayer(spec, big.dtype, preallocate=False)
            row.k, row.v = big.k[b : b + 1], big.v[b : b + 1]
            layers.append(row)
        return KVCache(layers)

    def set_length(self, lengths: list[int]) -> None:
        """Make the cache layers' host-side lengths agree with what the device steps wrote (the longest row). A
        piecewise bucket's cache counted its own appends."""
        if self.io is not None:
            return
        n = max(lengths)
        for layer in self.cache.layers:
            layer._len = n  # DenseLayer keeps its fill level here; the steps wrote the buffers behind its back
            layer.appended = n
        self.cache.position = n


class FastDecoder:
    """Static-buffer decode steps for one Engine, captured as CUDA graphs (`capture=True`) or run eagerly.

    use_kernels: None = the fused Triton kernels on CUDA and the PyTorch references elsewhere (True on the CPU runs
    them through the interpreter). fuse_weights (default: with capture) concatenates q/k/v and gate/up weights.
    """

    def __init__(self, engine, *, capture: bool, use_kernels: bool | None = None, fuse_weights: bool | None = None,
                 piecewise: bool = False):
        if capture and engine.device.type != "cuda":
            raise ValueError("FastDecoder(capture=True) needs a CUDA engine; use capture=False (static) on the CPU")
        self.engine = engine
        self.capture = capture
        self.piecewise = piecewise  # segments captured, each layer's attention eager between them
        self.kernels = engine.device.type == "cuda" if use_kernels is None else use_kernels
        self.buckets: OrderedDict[int, Bucket] = OrderedDict()
        self.steps = 0  # decode steps run through the static step (replayed or eager)
        self.captures = 0
        self.capture_s = 0.0
        if capture if fuse_weights is None else fuse_weights:
            fuse_projections(engine.model)

    @property
    def mode(self) -> str:
        return ("piecewise " if self.piecewise else "") + ("graph" if self.capture else "static")

    # ---- buckets ---------------------------------------------------------------------------------------------
    def bucket(self, batch: int, max_len: int) -> Bucket:
        """The bucket for `batch` sequences of up to `max_len` tokens (created, or grown and re-captured)."""
        bk = self.buckets.get(batch)
        if bk is not None and bk.capacity >= max_len:
            self.buckets.move_to_end(batch)
            return bk
        if bk is not None:
            del self.buckets[batch]
        while len(self.buckets) >= MAX_BUCKETS:
            self.buckets.popitem(last=False)
        e = self.engine
        cap = -(-max_len // CAPACITY_STEP) * CAPACITY_STEP
        cache = e.new_cache(batch=batch, max_len=cap)
        io = None
        if self.piecewise:  # the codec's own cache; the buffers a captured segment hands to the eager attention
            c, new = e.config, lambda *shape: torch.zeros(*shape, dtype=e.dtype, device=e.device)  # noqa: E731
            io = {"q": new(batch, c.num_heads, 1, c.head_dim), "k": new(batch, c.num_kv_heads, 1, c.head_dim),
                  "v": new(batch, c.num_kv_heads, 1, c.head_dim), "out": new(batch, c.num_heads, 1, c.head_dim),
                  "residual": new(batch, 1, c.hidden_size)}
        else:
            for layer in cache.layers:  # finite values everywhere: the masked reference attention multiplies by 0
                layer.k.zero_()
                layer.v.zero_()
        cos, sin = rope_cos_sin(e.inv_freq, torch.arange(cap, device=e.device), e.dtype)
        bk = Bucket(batch=batch, capacity=cap, cache=cache,
                    token=torch.zeros(batch, dtype=torch.long, device=e.device),
                    pos=torch.zeros(batch, dtype=torch.long, device=e.device),
                    logits=torch.zeros(batch, e.config.vocab_size, dtype=torch.float32, device=e.device),
                    cos=cos, sin=sin, io=io)
        self.buckets[batch] = bk
        return bk

    # ---- the step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, bk: Bucket) -> None:
        """One decode step for every row: feed bk.token at bk.pos, write K/V, write logits, argmax -> bk.token,
        pos += 1. Static shapes only, no host synchronisation (capturable). Piecewise: the segments and the eager
        attention in turn."""
        if bk.io is not None:
            layers = len(self.engine.model.model.layers)
            for i in range(layers + 1):
                self.segment(bk, i)
                if i < layers:
                    self.attend(bk, i)
            return
        model, kern = self.engine.model, self.kernels
        # the weight matmuls: at one row, the one-shot GEMV (faster than cuBLAS on cold weights, kernels/gemv.py)
        lin = decode_linear if kern else F.linear
        b = bk.batch
        x = model.model.embed_tokens(bk.token[:, None])  # [B, 1, hidden]
        cos = bk.cos.index_select(0, bk.pos)[:, None]  # [B, 1, D]: each row at its own position
        sin = bk.sin.index_select(0, bk.pos)[:, None]
        lengths = bk.pos + 1
        residual, delta = x, None
        for i, layer in enumerate(model.model.layers):
            attn, kv = layer.self_attn, bk.cache.layers[i]
            normed, residual = _add_norm(delta, residual, layer.input_layernorm, kern)
            q, k, v = attn.project(normed, fused=kern, linear=lin)  # [B, 1, H, D] token-major
            q_rot = rope_write_kv(q, k, v, cos, sin, kv.k, kv.v, bk.pos, use_kernel=kern)  # [B, Hq, 1, D]
            out = decode_varlen(q_rot[:, :, 0], kv.k, kv.v, lengths, use_kernel=kern)  # [B, Hq, D]
            delta = lin(out.reshape(b, 1, attn.num_heads * attn.head_dim), attn.o_proj.weight, attn.o_proj.bias)
            normed, residual = _add_norm(delta, residual, layer.post_attention_layernorm, kern)
            delta = layer.mlp(normed, fused=kern, linear=lin)
        self._finish(bk, delta, residual, lin)

    def _finish(self, bk: Bucket, delta, residual, lin) -> None:
        """The end of a step: final norm, LM head -> bk.logits, argmax -> bk.token, pos += 1."""
        model = self.engine.model
        normed, _ = _add_norm(delta, residual, model.model.norm, self.kernels)
        logits = lin(normed, model.lm_head.weight, model.lm_head.bias)[:, 0]  # [B, V]
        bk.logits.copy_(logits)
        bk.token.copy_(argmax_rows(logits))  # argmax of the model-dtype logits = argmax of their float32 copy
        bk.pos.add_(1)

    @torch.inference_mode()
    def segment(self, bk: Bucket, i: int) -> None:
        """Piecewise segment i of a step (static shapes, capturable): the end of layer i-1 after its attention
        (o-projection, norm, MLP), then the start of layer i up to its attention (norm, q/k/v, RoPE) into bk.io;
        segment 0 starts at the embedding, the last one ends with the LM head, the argmax and pos += 1."""
        model, kern, io = self.engine.model, self.kernels, bk.io
        lin = decode_linear if kern else F.linear
        layers = model.model.layers
        b = bk.batch
        if i == 0:
            normed, residual = _add_norm(None, model.model.embed_tokens(bk.token[:, None]),
                                         layers[0].input_layernorm, kern)
        else:
            prev = layers[i - 1]
            attn = prev.self_attn
            out = io["out"].transpose(1, 2).reshape(b, 1, attn.num_heads * attn.head_dim)
            delta = lin(out, attn.o_proj.weight, attn.o_proj.bias)
            normed, residual = _add_norm(delta, io["residual"], prev.post_attention_layernorm, kern)
            delta = prev.mlp(normed, fused=kern, linear=lin)
            if i == len(layers):
                self._finish(bk, delta, residual, lin)
                return
            normed, residual = _add_norm(delta, residual, layers[i].input_layernorm, kern)
        io["residual"].copy_(residual)
        q, k, v = layers[i].self_attn.project(normed, fused=kern, linear=lin)  # [B, 1, H, D] token-major
        cos = bk.cos.index_select(0, bk.pos)[:, None]  # [B, 1, D]
        sin = bk.sin.index_select(0, bk.pos)[:, None]
        q_rot, k_rot = rope_qk(q, k, cos, sin, use_kernel=kern)  # [B, H, 1, D]
        io["q"].copy_(q_rot)
        io["k"].copy_(k_rot)
        io["v"].copy_(v.transpose(1, 2))

    @torch.inference_mode()
    def attend(self, bk: Bucket, i: int) -> None:
        """Piecewise: layer i's attention, eagerly (the codec appends the step's K/V, the backend decodes)."""
        e = self.engine
        io = bk.io
        out = attention_step(io["q"], io["k"], io["v"], bk.cache.layers[i], e.attention,
                             decode_max_tokens=e.decode_max_tokens)
        io["out"].copy_(out)

    def _capture(self, bk: Bucket) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks kernels), restore the inputs, capture."""
        t0 = time.perf_counter()
        saved = bk.token.clone(), bk.pos.clone()
        stream = torch.cuda.Stream(device=self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        segments = range(len(self.engine.model.model.layers) + 1) if bk.io is not None else ()
        with torch.cuda.stream(stream):
            for _ in range(2):  # writes K/V at slots the first real steps overwrite before anything reads them
                if bk.io is None:
                    self.step(bk)
                for i in segments:  # piecewise: the segments only; the codec's cache is not touched
                    self.segment(bk, i)
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        bk.token.copy_(saved[0])
        bk.pos.copy_(saved[1])
        if bk.io is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(bk)
        else:
            graph = []
            for i in segments:
                graph.append(torch.cuda.CUDAGraph())
                with torch.cuda.graph(graph[-1]):
                    self.segment(bk, i)
        bk.graph = graph
        torch.cuda.synchronize(self.engine.device)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0

    def ensure_graph(self, bk: Bucket, lengths: list[int]) -> None:
        """Capture the bucket's graph now (when capturing and not yet done), with the rows at `lengths`: the
        warm-up steps write K/V at slots the first real steps overwrite before anything reads them."""
        if self.capture and bk.graph is None:
            bk.pos.copy_(torch.as_tensor(lengths, dtype=torch.long).to(self.engine.device))
            self._capture(bk)

    def replay(self, bk: Bucket) -> None:
        """Run one step: the captured graph (capturing it on first use) or the eager step."""
        if not self.capture:
            self.step(bk)
        else:
            if bk.graph is None:
                self._capture(bk)
            if bk.io is None:
                bk.graph.replay()
            else:  # piecewise: segment graphs, each layer's attention eager between them
                for i, graph in enumerate(bk.graph):
                    graph.replay()
                    if i < len(bk.graph) - 1:
                        self.attend(bk, i)
        self.steps += 1

    # ---- decode loops ----------------------------------------------------------------------------------------
    def decode(self, bk: Bucket, first_logits: torch.Tensor, lengths: list[int], max_new_tokens: int, pick,
               eos_id: int | None, greedy: bool) -> tuple[torch.Tensor, int]:
        """Decode after a prefill that left row b holding lengths[b] tokens. first_logits: [B, V] of each row's
        last prompt token. pick: logits [B, V] -> tokens [B] (greedy: the step's own argmax is used instead).
        Returns (tokens [B, n], n), the same tokens and stopping rule as greedy.decode_loop."""
        dev = self.engine.device
        b = bk.batch
        out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        bk.pos.copy_(torch.as_tensor(lengths, dtype=torch.long).to(dev))
        token = pick(first_logits)
        n = 0
        for n in range(1, max_new_tokens + 1):
            token, finished = emit_step(out, n, token, done, eos_id)
            if n == max_new_tokens or finished:
                break
            if token is not bk.token:
                bk.token.copy_(token)
            self.replay(bk)
            token = bk.token if greedy else pick(bk.logits)
        bk.set_length([length + n - 1 for length in lengths])
        return out[:, :n], n

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, pick, eos_id: int | None = None, *,
                 greedy: bool = False) -> Generation:
        """greedy.decode_loop on the fast path: eager (optionally chunked) prefill into the bucket's cache, then
        static decode steps. prompt_ids: [B, T]."""
        e = self.engine
        ids = prompt_ids.to(e.device)
        batch, prompt_len = ids.shape
        bk = self.bucket(batch, prompt_len + max_new_tokens)
        if bk.io is None:
            bk.reset()
        elif any(layer.length for layer in bk.cache.layers):  # a fresh cache of the codec (not every codec can
            bk.cache = e.new_cache(batch=batch, max_len=bk.capacity)  # truncate to 0); the segments do not hold it
        with Timer(e.device) as prefill:
            first = e.prefill(ids, bk.cache)
        capture_before = self.capture_s
        if max_new_tokens > 1:
            self.ensure_graph(bk, [prompt_len] * batch)  # once per bucket, outside the decode timer
        with Timer(e.device) as decode:
            tokens, n = self.decode(bk, first, [prompt_len] * batch, max_new_tokens, pick, eos_id, greedy)
        counters = {"generated_tokens": float(n * batch), "target_forwards": float(n), "prefill_s": prefill.seconds,
                    "decode_s": decode.seconds, "graph_capture_s": self.capture_s - capture_before,
                    "fast_path_graph": float(self.capture)}
        return Generation(tokens, counters)

    def close(self) -> None:
        self.buckets.clear()


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [B, V] tensor in two passes: the maximum of each of ~sqrt(V) chunks, then the best chunk.
    torch reduces one row of 128k logits in one thread block (28 us of a 4.8 ms step on the H200); the chunk
    pass spreads it over many. Same index, ties included: both passes keep the first maximum."""
    b, v = x.shape
    chunk = _divisor_near_sqrt(v)
    if chunk == 1:
        return x.argmax(-1)
    vals, idx = x.view(b, v // chunk, chunk).max(-1)
    best = vals.argmax(-1, keepdim=True)  # [B, 1]
    return (best * chunk + idx.gather(1, best))[:, 0]


def _divisor_near_sqrt(n: int) -> int:
    """The divisor of n closest to sqrt(n) from above (1 when n is prime or small)."""
    for d in range(max(2, int(n**0.5)), min(n, 4 * int(n**0.5) + 2)):
        if n % d == 0 and n // d > 1:
            return d
    return 1


def _add_norm(delta, residual, norm, kernels: bool):
    if kernels:
        return add_rmsnorm(delta, residual, norm)
    if delta is None:
        return norm(residual), residual
    residual = residual + delta
    return norm(residual), residual


__all__ = ["FAST_DECODE_MODES", "Bucket", "FastDecoder", "capture_blocker", "fuse_projections", "plan_fast_path"]

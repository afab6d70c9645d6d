"""Graph-captured decode: the model step for one token per row, replayed as a CUDA graph over static buffers.

The eager engine launches ~15 kernels per layer from Python per token; for an 8B model at batch 1 that host work
is several times the time it takes to read the weights (experiments/engine/README.md). Here the one model step
(engine/model.py) runs on static buffers with the static-decode mixer: fused RMSNorm + residual, one q/k/v matmul,
RoPE fused with the K/V cache write, varlen attention over the cache, o-projection, SiLU-gate MLP, the final norm,
the LM head and the argmax. At one row every weight matmul is the one-shot Triton GEMV (kernels/gemv.py); at more
rows, cuBLAS. At one row on a GPU (`fold_norm`) the norms before q/k/v, gate/up and the LM head are folded into
those GEMVs' prologue with the residual add (kernels/gemv.py `add_rmsnorm_gemv`): 65 fewer kernels a llama3_8b
step; `FastDecoder(fold_norm=False)` keeps them apart (the benchmark's baseline). `fold_silu=True` (off by default
until timed on a GPU) also computes the SwiGLU gate in the down GEMV's prologue (`silu_mul_gemv`).

    token [B] long       the token fed this step (the graph writes the argmax of the step's logits back into it)
    pos   [B] long       its position = the sequence's length before the step (incremented by the graph)
    logits [B, V] fp32   the step's logits (for samplers, which pick outside the graph)
    K/V  per layer: the codec's own pre-allocated storage (`CacheCodec.static_decode`): dense [B, Hkv, cap, D]
         buffers, or a quantized codec's codes and residual window, written and attended in place

Nothing in the step depends on a host value (the attention reads each row's length from `pos` on the device), so
one capture per batch size ("bucket") serves every step and every later generation that fits its capacity. On the
CPU (or with `capture=False`) the same step runs uncaptured: the "static" mode, which tests compare token for
token with the engine's ordinary decode loop.

Which path a run takes (`plan_fast_path` -> `FastPath`, recorded in metrics.json with its reason) is read from
what the plugins declare, never from their names:
- whole step captured ("graph"): the attention backend is `dense_causal` (the step's own varlen kernel computes
  exactly its decode), the codec has a `static_decode` step, the prefetch policy keeps `resident_weights`; a
  model with per-layer sliding windows or sink logits (gpt-oss) also needs the codec's step to take them
  (`static_window_sinks`: the varlen kernels' device-side window start and the merge's sink term; dense and the
  quantized codecs declare it);
- piecewise ("piecewise"): any codec and backend, resident weights. The same step is cut at each layer's
  attention into L + 1 captured segments (graphs.SegmentRecorder), and the attention -- the codec's append and
  the backend's decode, data-dependent shapes and all -- runs eagerly between them through static q/k/v/out
  buffers. It keeps the codec's own cache and all of its behaviour, and costs one graph launch and one eager
  attention call a layer;
- otherwise eager, with the reason.

A codec whose layers may change format during a run (the adapter's wrapper, adapt/codec.py) declares no static step
of its own but names the codec it wraps (`CacheCodec.static_form`): the plan reads that codec's declarations, and
before each generation the whole-step decoder asks `static_blocker` whether the wrapper can stay put for it. When it
cannot (a strategy may act), that generation runs through a piecewise decoder, whose eager appends the wrapper sees;
the two decoders never hold a bucket of the same batch size at once (a memory-sized run would pay twice its KV).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.cache.base import KVCache
from ollm_triton.engine.generation import Generation, argmax_pick, emit_step
from ollm_triton.engine.graphs import SegmentRecorder, notify_once, round_capacity, warm_up
from ollm_triton.engine.mixers import SegmentMixer, StaticDecodeMixer, attention_step
from ollm_triton.engine.model import rope_cos_sin
from ollm_triton.kernels.gemv import decode_add_norm_linear, decode_linear, decode_silu_linear
from ollm_triton.timing import Timer

FAST_DECODE_MODES = ("auto", "graph", "static", "piecewise", "off")
MAX_BUCKETS = 2  # captured graphs (each with its KV buffers) kept alive at once


# ---- which runs can use it ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPath:
    """How decode steps run. mode: "graph" (the whole step, static buffers), "piecewise" (segments around eager
    plugin attention) or "eager" (the engine's forward per step); captured: replayed as CUDA graphs (False: the
    same static step run uncaptured, e.g. on the CPU); reason: why a faster path was not taken (None when the
    fastest asked for was)."""

    mode: str
    captured: bool = False
    reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "eager"

    @property
    def piecewise(self) -> bool:
        return self.mode == "piecewise"

    def __str__(self) -> str:
        if self.mode == "eager":
            return f"eager ({self.reason})"
        name = {"graph": "graph" if self.captured else "static"}.get(self.mode) or \
            f"piecewise {'graph' if self.captured else 'static'}"
        return f"{name} ({self.reason})" if self.reason else name

    def describe(self) -> dict:
        return {"fast_path": str(self), "fast_path_mode": self.mode, "fast_path_captured": self.captured,
                "fast_path_reason": self.reason}


def _name(plugin) -> str:
    return getattr(plugin, "plugin_name", type(plugin).__name__)


def capture_blocker(engine) -> str | None:
    """Why this engine's plugins cannot run the whole static decode step (one line), or None when they can."""
    if not engine.attention.dense_causal:
        return (f"attention '{_name(engine.attention)}' is not dense causal: the static step cannot stand in for "
                "its decode")
    codec = engine.codec.static_form  # a wrapper's generations that no strategy acts in run its codec's step
    if not codec.static_decode:
        return f"cache '{_name(engine.codec)}' declares no static decode step"
    needs = engine.config.attention_requirements()
    if needs and not codec.static_window_sinks:  # the piecewise step can: its attention runs through the
        # backend, with the layer's own rule
        return (f"model {engine.config.model_type}'s {' and '.join(needs.values())}: cache '{_name(engine.codec)}' "
                "declares no static step with windows and sinks (static_window_sinks)")
    return piecewise_blocker(engine)


def piecewise_blocker(engine) -> str | None:
    """Why this engine cannot run the piecewise step either (one line), or None when it can: only the weights
    must stay put, and the model must be one the static step computes (no recurrent state, full RoPE)."""
    model = engine.config.static_step_blocker()
    if model is not None:
        return model
    if not engine.prefetch.resident_weights:
        return f"prefetch '{_name(engine.prefetch)}' moves weights between steps (declares no resident weights)"
    return None


def plan_fast_path(engine, mode: str) -> FastPath:
    """The FastPath for `mode` in FAST_DECODE_MODES. auto takes the whole captured step when every plugin allows
    it, else the piecewise one on a GPU. A GPU run that asked for the fast path and cannot have it gets a one-line
    notice on stderr (once per reason)."""
    if mode == "off":
        return FastPath("eager", reason="fast_decode=off")
    cuda = engine.device.type == "cuda"
    whole = capture_blocker(engine)
    model = engine.config.static_step_blocker()
    if model is not None:  # no static step for this model on any device: say so rather than "cpu"
        reason = model
    elif mode == "piecewise":
        reason = piecewise_blocker(engine)
        if reason is None:
            return FastPath("piecewise", captured=cuda)
    elif mode in ("auto", "graph") and not cuda:
        reason = "cpu: CUDA graphs need a CUDA device; fast_decode=static replays the same step without capture"
    else:
        reason = whole
        if reason is None:
            return FastPath("graph", captured=mode != "static")
        if mode == "auto" and piecewise_blocker(engine) is None:
            return FastPath("piecewise", captured=True, reason=f"{reason}: its attention runs eagerly between "
                                                                "captured segments")
    if cuda or mode != "auto":
        notify_once(f"fast decode: eager ({reason})")
    return FastPath("eager", reason=reason)


# ---- weight fusion ------------------------------------------------------------------------------------------------


def fuse_projections(model) -> None:
    """Concatenate each layer's q/k/v weights into one [(Hq + 2 Hkv) D, hidden] matrix and gate/up into one
    [2 M, hidden] matrix; the original parameters become views of them (no extra memory after the swap; one
    layer's worth while it happens). The model step then runs one matmul where it ran three (two)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_weight is None:
            attn.qkv_weight, attn.qkv_bias = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        mlp = getattr(mlp, "shared_expert", mlp)  # a MoE: its dense shared expert, if any (experts are stacked)
        if mlp is not None and mlp.gate_up_weight is None:
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
    """The static state of one batch size: a KVCache of `capacity` tokens and the step's I/O buffers."""

    batch: int
    capacity: int
    cache: KVCache
    token: torch.Tensor  # [B] long
    pos: torch.Tensor  # [B] long
    logits: torch.Tensor  # [B, V] float32
    cos: torch.Tensor  # [capacity, D] RoPE table in the model dtype
    sin: torch.Tensor
    graphs: list | None = None  # the captured step: one graph, or L + 1 segments (piecewise)
    # piecewise buckets: the buffers that cross from a captured segment to the eager attention and back
    io: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        for layer in self.cache.layers:
            layer.truncate(0)
        self.cache.position = 0

    def row_cache(self, b: int) -> KVCache:
        """A batch-1 KVCache whose layers write into row b of this bucket's storage (ragged prefill, slots)."""
        return KVCache([big.row_view(b, b + 1) for big in self.cache.layers])

    def rows(self, n: int) -> Bucket:
        """A bucket over this one's first n rows, sharing its storage (K/V, token, pos, logits): the static step of
        batch n then reads and writes rows 0..n-1 in place (continuous batching's slots, engine/slots.py)."""
        return Bucket(batch=n, capacity=self.capacity, cache=KVCache([big.row_view(0, n) for big in self.cache.layers]),
                      token=self.token[:n], pos=self.pos[:n], logits=self.logits[:n], cos=self.cos, sin=self.sin)

    def set_length(self, lengths: list[int]) -> None:
        """Tell the cache layers what the device steps wrote (the longest row). A piecewise bucket's cache counted
        its own appends."""
        if self.io is not None:
            return
        n = max(lengths)
        for layer in self.cache.layers:
            layer.set_length(n)
        self.cache.position = n


class FastDecoder:
    """Static-buffer decode steps for one Engine, captured as CUDA graphs (`capture=True`) or run uncaptured.

    use_kernels: None = the fused Triton kernels on CUDA and the PyTorch references elsewhere (True on the CPU runs
    them through the interpreter). fuse_weights (default: with capture) concatenates q/k/v and gate/up weights.
    fold_norm: None = with the kernels on CUDA; folds each norm into the fused matmul after it at one row
    (kernels/gemv.py `decode_add_norm_linear`; needs fused weights to act on q/k/v and gate/up). fold_silu: the
    SwiGLU gate computed in the down GEMV's prologue at one row (`decode_silu_linear`; needs fused gate/up).
    """

    def __init__(self, engine, *, capture: bool, use_kernels: bool | None = None, fuse_weights: bool | None = None,
                 piecewise: bool = False, fold_norm: bool | None = None, fold_silu: bool = False):
        if capture and engine.device.type != "cuda":
            raise ValueError("FastDecoder(capture=True) needs a CUDA engine; use capture=False (static) on the CPU")
        self.engine = engine
        self.capture = capture
        self.piecewise = piecewise
        # each layer's own attention rule (gpt-oss: window, sinks), for the piecewise step's eager attention
        self.layer_rules = [layer.self_attn.mixer_kwargs() if hasattr(layer, "self_attn") else {}
                            for layer in engine.model.model.layers]
        self.kernels = engine.device.type == "cuda" if use_kernels is None else use_kernels
        self.linear = decode_linear if self.kernels else F.linear
        self.fold_norm = self.kernels and engine.device.type == "cuda" if fold_norm is None else fold_norm
        self.fold_silu = fold_silu
        self.buckets: OrderedDict[int, Bucket] = OrderedDict()
        self.segments: FastDecoder | None = None  # the piecewise decoder of generations the codec blocks
        self.blocker: str | None = None  # why the last generation did not run the whole step (static_blocker)
        self.steps = 0  # decode steps run through the static step (replayed or not)
        self.captures = 0
        self.capture_s = 0.0
        if capture if fuse_weights is None else fuse_weights:
            fuse_projections(engine.model)

    @property
    def mode(self) -> str:
        return ("piecewise " if self.piecewise else "") + ("graph" if self.capture else "static")

    @property
    def attention_path(self) -> str:
        """What decode attention ran through this decoder: the step's own kernel, or the plugins between segments."""
        if self.piecewise or self.blocker is not None:
            return f"plugins between captured segments: {self.engine.attention.last_path}"
        layers = next((bk.cache.layers for bk in self.buckets.values()), None)
        kernel = layers[0].static_kernel if layers else "no step run"
        return f"triton.{kernel} (static step)" if self.kernels else f"torch.{kernel}_reference (static step)"

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
        bk = self.new_bucket(batch, max_len)
        self.buckets[batch] = bk
        return bk

    def new_bucket(self, batch: int, max_len: int) -> Bucket:
        """Fresh static buffers for `batch` rows of up to `max_len` tokens (not kept in `buckets`)."""
        e = self.engine
        cap = round_capacity(max_len)
        cache = e.new_cache(batch=batch, max_len=cap)
        io = None
        if self.piecewise:  # the codec's own cache; the buffers a captured segment hands to the eager attention
            c, new = e.config, lambda *shape: torch.zeros(*shape, dtype=e.dtype, device=e.device)  # noqa: E731
            io = {"q": new(batch, c.num_heads, 1, c.head_dim), "k": new(batch, c.num_kv_heads, 1, c.head_dim),
                  "v": new(batch, c.num_kv_heads, 1, c.head_dim), "out": new(batch, c.num_heads, 1, c.head_dim)}
        else:
            for layer in cache.layers:  # finite values everywhere: the masked reference attention multiplies by 0
                layer.zero_storage()
        cos, sin = rope_cos_sin(e.inv_freq, torch.arange(cap, device=e.device), e.dtype)
        bk = Bucket(batch=batch, capacity=cap, cache=cache,
                    token=torch.zeros(batch, dtype=torch.long, device=e.device),
                    pos=torch.zeros(batch, dtype=torch.long, device=e.device),
                    logits=torch.zeros(batch, e.config.vocab_size, dtype=torch.float32, device=e.device),
                    cos=cos, sin=sin, io=io)
        return bk

    # ---- the step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, bk: Bucket, cut=None) -> None:
        """One decode step for every row: feed bk.token at bk.pos, write K/V, write logits, argmax -> bk.token,
        pos += 1. Static shapes only, no host synchronisation (capturable). Piecewise: `cut(i)` at each layer's
        attention (default: run it now, eagerly)."""
        cos = bk.cos.index_select(0, bk.pos)[:, None]  # [B, 1, D]: each row at its own position
        sin = bk.sin.index_select(0, bk.pos)[:, None]
        if bk.io is None:
            mixer = StaticDecodeMixer(bk.cache.layers, cos, sin, bk.pos, kernels=self.kernels)
        else:
            mixer = SegmentMixer(bk.io, cos, sin, cut or (lambda i: self.attend(bk, i)), kernels=self.kernels)
        logits = self.engine.model.step(bk.token[:, None], mixer, kernels=self.kernels, linear=self.linear,
                                        norm_linear=decode_add_norm_linear if self.fold_norm else None,
                                        silu_linear=decode_silu_linear if self.fold_silu else None)[:, 0]
        bk.logits.copy_(logits)
        bk.token.copy_(argmax_rows(logits))  # argmax of the model-dtype logits = argmax of their float32 copy
        bk.pos.add_(1)

    @torch.inference_mode()
    def attend(self, bk: Bucket, i: int) -> None:
        """Piecewise: layer i's attention, eagerly through the plugins (the codec appends, the backend decodes)."""
        e, io = self.engine, bk.io
        io["out"].copy_(attention_step(io["q"], io["k"], io["v"], bk.cache.layers[i], e.attention,
                                       decode_max_tokens=e.decode_max_tokens, **self.layer_rules[i]))

    def _capture(self, bk: Bucket) -> None:
        """Warm up (Triton compiles, cuBLAS picks kernels), restore the inputs, capture. A piecewise warm-up runs
        the segments only (the cut does nothing), so the codec's cache is not touched."""
        t0 = time.perf_counter()
        dev = self.engine.device
        saved = bk.token.clone(), bk.pos.clone()
        skip = lambda i: None  # noqa: E731

        def warm():
            """One step, then the inputs restored: every warm-up step writes K/V at the slots of the rows' own next
            position, which the first real step overwrites. (A second step at pos + 1 could land inside a held
            window: a quantized row one token short of a full window maps pos + 1 to window slot `residual`.)"""
            self.step(bk, cut=None if bk.io is None else skip)
            bk.token.copy_(saved[0])
            bk.pos.copy_(saved[1])

        warm_up(warm, dev)
        if bk.io is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(bk)
            bk.graphs = [graph]
        else:
            recorder = SegmentRecorder()
            bk.graphs = recorder.record(lambda: self.step(bk, cut=recorder.cut))
        torch.cuda.synchronize(dev)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0

    def ensure_graph(self, bk: Bucket, lengths: list[int]) -> None:
        """Capture the bucket's step now (when capturing and not yet done), with the rows at `lengths`."""
        if self.capture and bk.graphs is None:
            bk.pos.copy_(torch.as_tensor(lengths, dtype=torch.long).to(self.engine.device))
            self._capture(bk)

    def replay(self, bk: Bucket) -> None:
        """Run one step: the captured graph(s) (capturing on first use) or the uncaptured step."""
        if not self.capture:
            self.step(bk)
        else:
            if bk.graphs is None:
                self._capture(bk)
            last = len(bk.graphs) - 1
            for i, graph in enumerate(bk.graphs):  # piecewise: each layer's attention eager between segments
                graph.replay()
                if i < last:
                    self.attend(bk, i)
        self.steps += 1

    # ---- decode loops ----------------------------------------------------------------------------------------
    def decode(self, bk: Bucket, first_logits: torch.Tensor, lengths: list[int], max_new_tokens: int, pick,
               eos_id: int | None, greedy: bool, rows: list[KVCache] | None = None) -> tuple[torch.Tensor, int]:
        """Decode after a prefill that left row b holding lengths[b] tokens. first_logits: [B, V] of each row's
        last prompt token. pick: logits [B, V] -> tokens [B] (greedy: the step's own argmax is used instead).
        rows: the per-row caches the prompts were prefilled through (bk.row_cache), when rows differ in length.
        Returns (tokens [B, n], n), the same tokens and stopping rule as the eager decode loop."""
        dev = self.engine.device
        b = bk.batch
        out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        bk.pos.copy_(torch.as_tensor(lengths, dtype=torch.long).to(dev))
        token = pick(first_logits)
        sync = self.engine.codec.static_form.static_sync and bk.io is None
        if sync and rows is None and len(set(lengths)) > 1:
            raise ValueError("rows of different lengths need their own caches (rows=) for this codec's static step")
        held = list(zip(rows, lengths, strict=True)) if rows is not None else [(bk.cache, lengths[0])]
        n = 0
        for n in range(1, max_new_tokens + 1):
            token, finished = emit_step(out, n, token, done, eos_id)
            if n == max_new_tokens or finished:
                break
            if token is not bk.token:
                bk.token.copy_(token)
            self.replay(bk)
            if sync:  # host work after the steps that fill a row's window (CacheCodec.static_sync): one check a row
                for cache, length in held:
                    if cache.layers[0].sync_due(length + n):
                        sync_layers(cache, length + n)
            token = bk.token if greedy else pick(bk.logits)
        if sync:
            for cache, length in held:
                sync_layers(cache, length + n - 1)
                cache.position = length + n - 1
        else:
            bk.set_length([length + n - 1 for length in lengths])
        return out[:, :n], n

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, pick=argmax_pick, eos_id: int | None = None,
                 ) -> Generation:
        """Prefill (optionally chunked) into the bucket's cache through the engine, then static decode steps.
        prompt_ids: [B, T]. pick: logits [B, V] -> tokens [B]; argmax_pick runs inside the step."""
        e = self.engine
        ids = prompt_ids.to(e.device)
        batch, prompt_len = ids.shape
        if not self.piecewise:
            held = self.buckets.get(batch)
            horizon = prompt_len + max_new_tokens
            cap = held.capacity if held is not None and held.capacity >= horizon else round_capacity(horizon)
            self.blocker = e.codec.static_blocker(e.layer_spec(batch, cap), horizon)
            if self.blocker is not None:
                return self._generate_piecewise(prompt_ids, max_new_tokens, pick, eos_id)
            if self.segments is not None:
                self.segments.buckets.pop(batch, None)
        bk = self.bucket(batch, prompt_len + max_new_tokens)
        if bk.io is None:
            bk.reset()
        elif any(layer.length for layer in bk.cache.layers):  # a fresh cache of the codec (not every codec can
            # truncate to 0); the segments do not hold it, so the old one is let go first: two caches of the bucket
            # at once would ask a memory-sized run (+adapt=memory, a cap) for twice its KV
            bk.cache = None
            bk.cache = e.new_cache(batch=batch, max_len=bk.capacity)
        with Timer(e.device) as prefill:
            first = e.prefill(ids, bk.cache)
        if not self.piecewise:  # a strategy moved the cache while it stored the prompt: its step is not this one
            self.blocker = e.codec.static_blocker(e.layer_spec(batch, bk.capacity), prompt_len + max_new_tokens,
                                                  bk.cache)
            if self.blocker is not None:
                return self._generate_piecewise(prompt_ids, max_new_tokens, pick, eos_id)
        capture_before = self.capture_s
        if max_new_tokens > 1:
            self.ensure_graph(bk, [prompt_len] * batch)  # once per bucket, outside the decode timer
        with Timer(e.device) as decode:
            tokens, n = self.decode(bk, first, [prompt_len] * batch, max_new_tokens, pick, eos_id,
                                    greedy=pick is argmax_pick)
        counters = {"generated_tokens": n * batch, "target_forwards": n, "prefill_s": prefill.seconds,
                    "decode_s": decode.seconds, "graph_capture_s": self.capture_s - capture_before,
                    # 1 only for the whole step as one graph; a piecewise step (captured segments around eager
                    # attention) is counted by fast_path_piecewise
                    "fast_path_graph": int(self.capture and not self.piecewise),
                    "fast_path_piecewise": int(self.piecewise)}
        return Generation(tokens, counters)

    def _generate_piecewise(self, prompt_ids, max_new_tokens, pick, eos_id) -> Generation:
        """This generation through the piecewise decoder (self.blocker says why); the whole step's bucket of its
        batch size goes first, so the two caches are never held together."""
        self.buckets.pop(prompt_ids.shape[0], None)
        if self.segments is None:
            self.segments = FastDecoder(self.engine, capture=self.capture, use_kernels=self.kernels,
                                        fuse_weights=False, piecewise=True, fold_norm=self.fold_norm,
                                        fold_silu=self.fold_silu)
        steps = self.segments.steps
        out = self.segments.generate(prompt_ids, max_new_tokens, pick, eos_id)
        self.steps += self.segments.steps - steps
        return out

    def close(self) -> None:
        self.buckets.clear()
        if self.segments is not None:
            self.segments.close()


def sync_layers(cache: KVCache, length: int) -> None:
    """Tell every layer of a static-sync row (`CacheCodec.static_sync`) that it holds `length` tokens, unless it
    was told already (the last due step)."""
    if cache.layers[0].length != length:
        for layer in cache.layers:
            layer.set_length(length)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [B, V] tensor in two passes: the maximum of each of ~sqrt(V) chunks, then the best chunk.
    torch reduces one row of a large vocabulary in one thread block; the chunk pass spreads it over many. Same
    index, ties included: both passes keep the first maximum."""
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


__all__ = ["FAST_DECODE_MODES", "Bucket", "FastDecoder", "FastPath", "capture_blocker",
           "fuse_projections", "piecewise_blocker", "plan_fast_path", "sync_layers"]

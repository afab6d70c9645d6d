"""Static-buffer, graph-capturable multi-token steps for the speculative strategies.

`greedy` decodes through the engine's fast path (engine/fast_decode.py): on a CUDA device every decode step is a
replayed CUDA graph. Speculation must run on the same footing or it is measured against a faster loop than its own:
its steps are "T new tokens with a [T, T] mask among them" (a verify block, a draft step, a tree level), and here
each such step is one function of static buffers only, captured once per (T, layers) as a CUDA graph:

    tokens  [B, T] long     the new tokens
    base    [B] long        the slot of the first new token = tokens held before the step (a device value)
    offsets [T] long        RoPE position of token t = base + offsets[t] (chain: 0..T-1, tree: node depth)
    mask    [T, T] bool     token t sees new token j (chain: causal, tree: ancestors)
    logits  [B, T, V] fp32, argmax [B, T] long   outputs
    K/V per layer [B, Hkv, capacity, D]          dense buffers; token t's K/V land in slot base + t

Each step is the engine's one model step (engine/model.py) with the static-block mixer (engine/mixers.py
`StaticBlockMixer`): key slot s is visible to new token t iff s < base or (s = base + j and mask[t, j]), so
nothing depends on a host value and rolling back is just a smaller `base` next time. A layer's own sliding window
and sink logits (gpt-oss) apply inside the block too (kernels/attention_decode_varlen.py `verify_attention`: a
tree token is windowed by its depth, as it would be decoded token by token), so these steps serve every model the
one-token static step serves. On the CPU (tests) or with
capture=False the same step runs uncaptured ("static" mode).

Numerics: the eager engine and the fast decoder attend with other kernels and reduction orders, so in bf16 a
near-tie can resolve differently (greedy equivalence is exact in fp32 on the CPU; the benchmark reports it on the
GPU). K and V are written post-RoPE in the model dtype, exactly as the dense cache stores them.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ollm_triton.engine.fast_decode import capture_blocker, fuse_projections
from ollm_triton.engine.graphs import capture, notify_once, round_capacity
from ollm_triton.engine.mixers import StaticBlockMixer
from ollm_triton.engine.model import rope_cos_sin
from ollm_triton.kernels.gemv import decode_linear

FAST_PATHS = ("auto", "static", "off")

# engine -> {(batch, capture): StaticModel}; weak, so a closed and dropped engine frees its buffers and graphs
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_fast_path(requested: str, engine) -> str:
    """"graph", "static" or "eager" for a strategy's `fast_path` setting.

    auto: what the engine's own decode loop uses (engine.fast_path: graph-captured on CUDA when every plugin is
    capturable, eager otherwise), so a strategy and `greedy` run on the same footing; static: the static-buffer
    steps without capture (any device); off: the eager engine.forward.
    """
    if requested == "off":
        return "eager"
    if requested == "static":
        reason = capture_blocker(engine)
        if reason is None and not engine.codec.static_buffers:
            reason = f"cache '{engine.codec.plugin_name}' keeps no dense K/V buffers for the static verify blocks"
        if reason is not None:
            raise ValueError(f"fast_path=static cannot run here: {reason}; use fast_path=auto or off")
        return "static"
    fast = engine.fast_path
    if fast.mode != "graph":  # the piecewise step attends through the codec's cache: speculation runs eagerly there
        return "eager"
    if not engine.codec.static_buffers:  # the static verify blocks attend dense K/V buffers (StaticBlockMixer),
        return "eager"  # each layer with its own window and sinks (gpt-oss), as the one-token static step
    return "graph" if fast.captured else "static"


def static_model(engine, batch: int, max_len: int, capture: bool) -> StaticModel:
    """The engine's StaticModel for `batch` rows and at least `max_len` tokens (shared by every strategy)."""
    models = _MODELS.setdefault(engine, {})
    key = (batch, capture)
    sm = models.get(key)
    if sm is None or sm.capacity < max_len or sm.model is not engine.model:
        sm = StaticModel(engine, batch, max_len, capture)
        models[key] = sm
    return sm


@dataclass
class Step:
    """The static I/O of one (T, layers) step and its CUDA graph once captured."""

    tokens: torch.Tensor
    base: torch.Tensor
    offsets: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    argmax: torch.Tensor
    layers: int
    graph: object | None = None


@dataclass
class Chain:
    """m greedy draft tokens as one function of static buffers (one CUDA graph): a catch-up step of r tokens
    (`first`: its tokens and base are the inputs), then m - 1 single-token steps (`next`), each fed the previous
    step's argmax at the next slot. Out: drafts [B, m]. The same steps as m separate ones, without the host work
    between them (per draft: an argmax, a token copy, a base fill and a replay launch)."""

    first: Step
    next: Step
    drafts: torch.Tensor
    graph: object | None = None


@dataclass
class Captured:
    """Any function of static buffers captured as one graph; `outputs` is what it returned during capture (tensors
    of the graph's pool, rewritten by each replay)."""

    outputs: object = None
    graph: object | None = None


class StaticModel:
    """K/V buffers of `capacity` tokens for `batch` rows of one engine, and its captured steps."""

    def __init__(self, engine, batch: int, max_len: int, capture: bool):
        # a weak reference: this object lives in a dictionary keyed weakly by the engine, which must stay collectable
        self._engine = weakref.ref(engine)
        self.model = engine.model
        self.batch = batch
        self.capacity = round_capacity(max_len)
        self.capture = capture
        self.kernels = engine.use_kernels()  # the engine's fused Triton kernels on CUDA, references elsewhere
        self.attention_kernel: bool | None = None  # False: the blocks attend by masked SDPA (a benchmark's baseline)
        # the weight matmul greedy's decode step uses: the one-shot GEMV for a single row (a draft token, a layer-skip
        # step), which beat cuBLAS at every llama3_8b shape on the H200 (kernels/gemv.py); F.linear for T > 1 rows,
        # one GEMM per (fused) weight, so a T-token verify block reads each weight once
        self.linear = decode_linear if self.kernels else F.linear
        if capture:  # one q/k/v and one gate/up matmul per layer, as the engine's own graph path does
            fuse_projections(engine.model)
        self.cache = engine.new_cache(batch=batch, max_len=self.capacity)
        for layer in self.cache.layers:  # finite everywhere: masked scores must not meet NaN garbage
            layer.k.zero_()
            layer.v.zero_()
        dev = engine.device
        self.cos, self.sin = rope_cos_sin(engine.inv_freq, torch.arange(self.capacity, device=dev), engine.dtype)
        cfg = engine.config
        self.group = cfg.num_heads // cfg.num_kv_heads
        # (t, layers, tree) steps, ("chain", r, m, layers) chains, and the callers' own captured functions
        self.steps: dict[tuple, Step | Chain | Captured] = {}
        self.buffers: dict[tuple, object] = {}
        self.capture_s = 0.0
        self.captures = 0

    @property
    def engine(self):
        engine = self._engine()
        if engine is None:
            raise RuntimeError("the engine of these static buffers was garbage-collected")
        return engine

    # ---- prefill ------------------------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, P] -> logits [B, V] of the last prompt token; the prompt's K/V fill slots 0..P-1."""
        for layer in self.cache.layers:
            layer.truncate(0)
        self.cache.position = 0
        return self.engine.prefill(ids, self.cache)  # chunked when the engine has a prefill_chunk

    # ---- steps --------------------------------------------------------------------------------------------------
    def step(self, t: int, layers: int | None = None, tree: bool = False) -> Step:
        """The step of `t` new tokens through the first `layers` layers (default all), created on first use with
        a causal mask and chain offsets; `tree` steps are separate buffers whose mask and offsets the caller sets
        (so a chain step's causal mask is never overwritten)."""
        layers = layers or self.model.config.num_layers
        key = (t, layers, tree)
        st = self.steps.get(key)
        if st is None:
            st = self.steps[key] = self._new_step(t, layers)
        return st

    def _new_step(self, t: int, layers: int) -> Step:
        dev, b = self.engine.device, self.batch
        return Step(tokens=torch.zeros(b, t, dtype=torch.long, device=dev),
                    base=torch.zeros(b, dtype=torch.long, device=dev),
                    offsets=torch.arange(t, device=dev),
                    mask=torch.ones(t, t, dtype=torch.bool, device=dev).tril_(),
                    logits=torch.zeros(b, t, self.model.config.vocab_size, dtype=torch.float32, device=dev),
                    argmax=torch.zeros(b, t, dtype=torch.long, device=dev), layers=layers)

    def chain(self, r: int, m: int, layers: int | None = None) -> Chain:
        """The greedy draft chain of a catch-up of r tokens and m drafts (created on first use; its steps are its
        own buffers, written inside its graph)."""
        layers = layers or self.model.config.num_layers
        key = ("chain", r, m, layers)
        ch = self.steps.get(key)
        if ch is None:
            ch = self.steps[key] = Chain(self._new_step(r, layers), self._new_step(1, layers),
                                         torch.zeros(self.batch, m, dtype=torch.long, device=self.engine.device))
        return ch

    def run_chain(self, ch: Chain) -> None:
        """Run a chain: its graph (captured on first use) or the eager body."""
        if self.capture:
            if ch.graph is None:
                self._capture(ch, lambda: self._chain_body(ch), (ch.first.tokens, ch.first.base))
            if ch.graph is not None:
                ch.graph.replay()
                return
        self._chain_body(ch)

    def run_captured(self, key: tuple, body, inputs: tuple[torch.Tensor, ...], replay: bool = True):
        """body() -> outputs, a function of static buffers (`inputs` among them) that calls steps through
        `run_inline`: its graph, captured on first use under `key`, is replayed (or body runs eagerly when this
        model does not capture). Returns the outputs. replay=False only captures (outside a timed region)."""
        if not self.capture:
            return body() if replay else None
        c = self.steps.get(key)
        if c is None:
            c = self.steps[key] = Captured()

            def record():
                c.outputs = body()

            self._capture(c, record, inputs)
            if c.graph is None:  # capture failed: from now on uncaptured
                return body() if replay else None
        if replay:
            c.graph.replay()
        return c.outputs

    def buffer(self, key: tuple, make) -> object:
        """A caller's static buffers, made once by make() and kept with this model (and its graphs that read them)."""
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = make()
        return buf

    def run_inline(self, st: Step) -> None:
        """A step's body inside a function that `run_captured` captures as a whole."""
        self._body(st)

    @torch.inference_mode()
    def _chain_body(self, ch: Chain) -> None:
        first, nxt, drafts = ch.first, ch.next, ch.drafts
        r = first.tokens.shape[1]
        self._body(first)
        drafts[:, 0].copy_(first.argmax[:, -1])
        for i in range(1, drafts.shape[1]):  # draft i goes to slot base + r + i - 1
            nxt.tokens.copy_(drafts[:, i - 1 : i])
            torch.add(first.base, r + i - 1, out=nxt.base)
            self._body(nxt)
            drafts[:, i].copy_(nxt.argmax[:, 0])

    def run(self, st: Step) -> None:
        """Run a step: its graph (captured on first use) or the eager body."""
        if self.capture:
            if st.graph is None:
                self._capture(st, lambda: self._body(st), (st.tokens, st.base))
            if st.graph is not None:
                st.graph.replay()
                return
        self._body(st)

    def prepare(self, st: Step) -> None:
        """Capture now (outside a timed region) if this step will be replayed."""
        if self.capture and st.graph is None:
            self._capture(st, lambda: self._body(st), (st.tokens, st.base))

    def _capture(self, holder: Step | Chain | Captured, body, inputs: tuple[torch.Tensor, ...]) -> None:
        """Warm up, restore the inputs, capture `body` into holder.graph. Warm-up writes K/V at slots from `base`
        on, which hold nothing valid yet (they are beyond every committed token). A step that cannot be captured
        still runs, uncaptured, and says so once."""
        t0 = time.perf_counter()
        dev = self.engine.device
        saved = [x.clone() for x in inputs]  # the body reads its inputs, never writes them; warm-up may not either
        try:
            holder.graph = capture(body, dev)
        except Exception as e:
            first = (str(e).splitlines() or [""])[0][:120]
            notify_once(f"speculative fast path: capture failed ({type(e).__name__}: {first}); uncaptured steps")
            self.capture = False
        for x, old in zip(inputs, saved, strict=True):
            x.copy_(old)
        torch.cuda.synchronize(dev)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0

    @torch.inference_mode()
    def _body(self, st: Step) -> None:
        """The step: the engine's model step with the static-block mixer over this object's buffers."""
        mixer = StaticBlockMixer(self.cache.layers, self.cos, self.sin, st.base, st.offsets, st.mask,
                                 group=self.group, kernels=self.kernels, attention_kernel=self.attention_kernel)
        logits = self.model.step(st.tokens, mixer, kernels=self.kernels, linear=self.linear, num_layers=st.layers)
        st.logits.copy_(logits)
        st.argmax.copy_(logits.argmax(-1))

    # ---- K/V moves ------------------------------------------------------------------------------------------------
    def move(self, src: torch.Tensor, dst_start: int) -> None:
        """Copy the K/V of slots `src` (ascending) to slots dst_start.. in every layer (tree compaction)."""
        if src.numel() == 0:
            return
        dst = torch.arange(dst_start, dst_start + src.numel(), device=src.device)
        for layer in self.cache.layers:
            layer.k[:, :, dst] = layer.k[:, :, src]  # the gather copies first: overlapping slots are safe
            layer.v[:, :, dst] = layer.v[:, :, src]

    def dense(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's K/V of slots 0..length-1 (tests compare them with a fresh run)."""
        return [(layer.k[:, :, :length], layer.v[:, :, :length]) for layer in self.cache.layers]

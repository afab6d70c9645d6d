"""`experts`: stream a mixture-of-experts model by expert, not by layer.

An 80B MoE model reads ~3B parameters a token: a token's k routed experts of each layer, not the layer's E. Layer
streaming moves all E (Qwen3-Next-80B: 3.2 GB a layer); this policy moves only the routed experts it does not hold.

Loading (`keep_weight`, called by load_engine for each parameter as it is drawn or read): every parameter except
the routed experts' (attention or Gated DeltaNet, norms, router, shared expert, embeddings, LM head) goes straight to
the device and stays there. Each MoE layer's experts are packed into one host buffer [E, R bytes] (page-locked on
CUDA): expert e's stacked parameters (engine/moe.py `Experts`: every one of them is [E, ...] along dim 0) side by side
in one row of P elements, so bringing an expert in is one copy; the model keeps a storage-free placeholder. So the
host never holds the model at once in the model dtype, only the experts as stored: Qwen3-Next-80B's 77 B expert
parameters are 155 GB in bf16 and 78 GB as fp8, which fits a 128 GB host.

`host_dtype`: `model` stores the rows as they are (R = 2P bytes in bf16); `fp8` stores e4m3 codes with a scale per 128
elements (kernels/fp8_rows.py; R = P + P/64 bytes in bf16), so a miss moves about half the bytes, and the device
dequantizes the codes into the cache slots after the copy, on the copy stream (through a staging buffer of k rows that
the stream's order keeps from being overwritten early; one launch for a layer's misses, below). The weights the model
computes with are then the fp8 round trip of its own: the logits equal a resident run whose experts took the same round
trip, not the bf16 resident run.

`setup(model, device)`: the device holds a cache of C rows in the model dtype, shared by every layer,
C = (budget_gb - headroom_gb - dense bytes) // row bytes (at most `max_cached_experts`, at most every expert). Every
MoE block's expert parameters become views of that cache [C, ...], so the block's own compute (grouped, naive or the
Triton kernels) runs on it unchanged. (A model built without load_engine has its experts packed here.)

`run_experts` (the hook the MoE block calls after routing, prefetch/base.py): the routed ids come to the host (one sync,
shared with the prediction below), each distinct (layer, expert) is looked up: a hit uses its slot, a miss takes a slot
no expert of this step needs, and the layer's misses are copied in as one batch (a side stream on CUDA; the compute
stream waits for those copies only): one copy per run of experts consecutive on the host (bf16: and in the cache, the
batch's slots handed out in ascending order), fp8 through the staging buffer and one dequantization launch per k rows,
writing each row to its slot from an index tensor. One copy and one launch a row, expert after expert, held fp8 to 30%
of its I/O floor on an H100 (issue 18). The ids are translated to slots and the block computes. A step needing more
distinct experts than C (a prefill) runs in rounds of at most C experts; a round computes each routing slot j (every
token's j-th expert) on its own, the other rounds' pairs with zero weight, so each (token, expert) pair's weighted
output is kept as it is and a token's k outputs are summed once at the end, as a single call sums them (summing whole
rounds instead rounded every partial sum: issue 18, bf16 logits 0.45 apart after 4 layers).

Eviction: the least recently used row (`lru`), or the least often routed one, least recent among equals (`lfu`).
When the cache holds less than one token's experts (Qwen3-Next-80B at 8 GB: 9.2 rows a layer for 10 routed), LRU
under the cyclic layer order evicts every row before its layer comes round again, as it does for whole layers
(prefetch/lookahead.py); LFU keeps the most routed experts resident across tokens, at an O(cache rows) scan per
eviction.

Prediction (`predict: router`; the default is `none`: on the first H100 table, experiments/prefetch/README.md, the
router's guesses on random weights moved 1.5x the bytes and decoded 10% slower): the next MoE layer's router
applied to this layer's MLP input, its top
`prefetch_per_token` experts per token fetched while this layer computes. Chosen over recent routing statistics
because the residual stream changes little from one layer to the next, so the next router on today's hidden state
predicts this very token's routing, while statistics predict only experts that are popular in general (a batch-1
decode's routing changes token to token); it costs one [N, hidden] x [hidden, E] product per layer and shares the
routing's host sync. scripts/bench_expert_stream.py measures what it buys beside `none`.

Outputs equal the resident run (`host_dtype: model`; with fp8, the resident run of the round-tripped experts): the cache
holds the weights' own bytes, and the grouped path and the Triton kernels compute each (token, expert) pair alike
whatever index the expert has. In rounds a pair is computed among fewer pairs (a call holds N, not N x k): still
bit for bit where a row's product does not depend on how many rows share its expert (the Triton kernels at one
BLOCK_M; bf16 on the CPU in the tests), not where it does (float32 GEMMs of a few rows on the CPU: ~1e-7). The
kernels pick BLOCK_M from the routing, not the call (kernels/moe.py `_block_m`: 16 up to 16 pairs an expert, else
64, over the N x k pairs and the model's E that engine/moe.py `Experts.routing` passes), so a round's call over the
cache's C rows, one routing slot at a time, tiles as the resident call does at any prompt length (it counted the
cache's rows before, and a long prompt could tile otherwise: issue 18).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.kernels.fp8_rows import BLOCK, FP8, dequantize_fp8_rows, quantize_fp8
from ollm_triton.prefetch.base import PrefetchPolicy
from ollm_triton.prefetch.store import _register_pinned, _unregister_pinned
from ollm_triton.registry import PluginError, register

GB = 1e9
PREDICTORS = ("router", "none")
EVICTIONS = ("lru", "lfu")
HOST_DTYPES = ("model", "fp8")
# elements: each parameter's view in a cache row starts 256-byte aligned in bf16 (coalesced loads), and an fp8 scale
# block never spans two parameters
ALIGN = BLOCK
CHUNK_BYTES = 256 << 20  # float32 temporaries of one quantization step (a Qwen3-Next parameter is 2.1 GB in bf16)


@dataclass
class ExpertStreamingConfig:
    budget_gb: float | None = None  # device memory for the dense part + the expert cache (null: every expert)
    headroom_gb: float = 0.5  # part of budget_gb kept free for activations and the KV cache
    max_cached_experts: int = 0  # cap on the cache's expert slots (0: as many as the budget allows)
    eviction: str = "lru"  # lru | lfu (the least often routed row goes first; ties: the least recent)
    # none | router (next layer's router on this layer's hidden state). none by default: on the first H100 table
    # (experiments/prefetch/README.md) the router's guesses moved 1.5x the bytes for 10% fewer tok/s
    predict: str = "none"
    prefetch_per_token: int = 0  # experts per token prefetched for the next layer (0: the model's experts per token)
    host_dtype: str = "model"  # model (the rows as they are) | fp8 (e4m3 codes + a scale per 128, dequantized on copy)

    def check(self) -> None:
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"budget_gb must be > 0 or null, got {self.budget_gb}")
        if self.headroom_gb < 0:
            raise ValueError(f"headroom_gb must be >= 0, got {self.headroom_gb}")
        if self.max_cached_experts < 0:
            raise ValueError(f"max_cached_experts must be >= 0 (0: as many as the budget allows), got "
                             f"{self.max_cached_experts}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")
        if self.predict not in PREDICTORS:
            raise ValueError(f"predict must be one of {', '.join(PREDICTORS)}, got {self.predict!r}")
        if self.prefetch_per_token < 0:
            raise ValueError(f"prefetch_per_token must be >= 0 (0: the model's experts per token), got "
                             f"{self.prefetch_per_token}")
        if self.host_dtype not in HOST_DTYPES:
            raise ValueError(f"host_dtype must be one of {', '.join(HOST_DTYPES)}, got {self.host_dtype!r}")


def _expert_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> MoE block: the MLPs that declare the expert hook (engine/moe.py `MoE.expert_hooks`)."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers)
            if hasattr(layer.mlp, "expert_hooks") and hasattr(layer.mlp, "experts")}


def _put(rows: torch.Tensor, src: torch.Tensor) -> None:
    """src [n, b] (contiguous) into rows [n, b], a column block of n host rows. From a CUDA source one copy a row:
    each destination is then contiguous and lands by DMA in the page-locked row, where torch stages a strided
    destination through a pageable temporary (an extra pass over 3.2 GB a Qwen3-Next layer, at pageable speed)."""
    if src.is_cuda:
        for i in range(src.shape[0]):
            rows[i].copy_(src[i])
    else:
        rows.copy_(src)


def _fp8_row_bytes(expert_bytes: float, element_size: int) -> float:
    """Host bytes of the routed experts as fp8 rows: a byte a weight and a model-dtype scale per BLOCK weights."""
    return expert_bytes / element_size * (1 + element_size / BLOCK)


@register("prefetch", "experts", ExpertStreamingConfig)
class ExpertStreaming(PrefetchPolicy):
    """MoE models: the dense part resident, routed experts streamed from host memory into a device cache (LRU or
    LFU), the next layer's likely experts prefetched from its router applied early."""

    def __init__(self, cfg: ExpertStreamingConfig | None = None):
        self.cfg = cfg or ExpertStreamingConfig()
        self.model = self.staging = None
        self._loading = None  # the model whose experts are being stored (keep_weight, then setup)
        self._registered: list[torch.Tensor] = []  # host rows page-locked in place (unregistered by close)
        self.host: dict[int, torch.Tensor] = {}

    # --- the run's memory check, before any model exists ------------------------------------------------------
    def weights_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # a checkpoint is read on the host; keep_weight sends the dense part on

    def host_weight_bytes(self, device: torch.device, total_bytes: int, expert_bytes: int = 0,
                          element_size: int = 2) -> float:
        """The routed experts as stored (fp8: a byte a weight + a scale per BLOCK); the dense part goes straight to
        the device. A dense model (no expert bytes) is refused by setup; all of it is counted here."""
        if not expert_bytes:
            return float(total_bytes)
        return _fp8_row_bytes(expert_bytes, element_size) if self.cfg.host_dtype == "fp8" else float(expert_bytes)

    def host_advice(self, room: float, total_bytes: int, expert_bytes: int = 0, element_size: int = 2) -> str | None:
        fp8 = _fp8_row_bytes(expert_bytes, element_size)
        if self.cfg.host_dtype != "fp8" and expert_bytes and fp8 <= room:  # Qwen3-Next-80B: 78.5 GB, not 155
            return f"prefetch.host_dtype=fp8 (the routed experts' host rows in {fp8 / GB:.1f} GB)"
        return None

    def _cap(self) -> float | None:
        return None if self.cfg.budget_gb is None else self.cfg.budget_gb * GB - self.cfg.headroom_gb * GB

    def device_weight_bytes(self, total_bytes: int, layer_bytes: int | None = None, num_layers: int | None = None,
                            head_bytes: int = 0, expert_bytes: int = 0) -> float:
        """The dense part plus a cache filling budget_gb - headroom_gb (all weights without a budget). Refuses in
        one line when the dense part alone does not fit the budget."""
        cap = self._cap()
        if cap is None or not expert_bytes:  # a dense model is refused by setup, naming the model
            return float(total_bytes)
        dense = total_bytes - expert_bytes
        if dense >= cap:
            raise PluginError(self._too_small(dense, "any expert"))
        return float(min(total_bytes, cap))

    def _too_small(self, dense: float, what: str) -> str:
        return (f"prefetch {self.plugin_name}: budget_gb={self.cfg.budget_gb} - headroom_gb={self.cfg.headroom_gb} "
                f"leaves no room for {what} after the {dense / GB:.3f} GB dense part (attention, norms, routers, "
                f"shared experts, embeddings, head) that stays on the device; raise budget_gb")

    # --- loading: the experts into host rows as they are created ------------------------------------------------
    def keep_weight(self, model: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A routed expert parameter is packed (and compressed) into its layer's host rows now, one at a time, and
        the model keeps a storage-free placeholder; any other parameter goes to the compute device."""
        if self._loading is not model:
            self._begin(model, device)
        module_name, _, attr = name.rpartition(".")
        layer = self._layer_of.get(id(model.get_submodule(module_name)))
        if layer is None:
            return value.to(device)
        self._store(layer, attr, value)
        return torch.empty(value.shape, dtype=value.dtype, device="meta")

    def _begin(self, model: nn.Module, device: torch.device) -> None:
        """Start storing `model`'s experts: the blocks, the row layout (from the parameters' shapes, which even a
        meta model has), no rows yet."""
        blocks = _expert_blocks(model)
        if not blocks:  # refused before a dense model is built on the device (it may not fit there)
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise PluginError(f"prefetch {self.plugin_name}: model {kind} has no mixture-of-experts layers, so "
                              "there are no experts to stream; use +prefetch=lookahead (layer streaming) or resident")
        if self.model is not None or self._loading is not None:  # this policy served another model: let it go
            self.close()
        device = torch.device(device)
        self.device, self.cuda = device, device.type == "cuda"
        self.blocks, self.moe_layers = blocks, sorted(blocks)
        self._layer_of = {id(b.experts): i for i, b in blocks.items()}
        first = blocks[self.moe_layers[0]].experts
        self.entries, offset = {}, 0  # name -> (per-expert shape, offset, numel, padded numel)
        for name, p in first._parameters.items():
            if p is None:
                continue
            n = p[0].numel()
            padded = -(-n // ALIGN) * ALIGN
            self.entries[name] = (tuple(p.shape[1:]), offset, n, padded)
            offset += padded
        self.row_elems, self.dtype = offset, None
        self.num_experts = first._parameters[next(iter(self.entries))].shape[0]
        self.host, self._stored, self._registered = {}, set(), []
        self._loading = model

    def _layout_dtype(self, dtype: torch.dtype) -> None:
        """The first stored parameter fixes the rows' dtype and byte sizes (the cache holds one dtype)."""
        if self.dtype is None:
            self.dtype = dtype
            elt = torch.empty((), dtype=dtype).element_size()
            self.row_bytes = self.row_elems * elt  # a cache row on the device
            # a host row: the model's bytes, or the codes then the scales (at byte P: 128-aligned)
            self.host_row_bytes = self.row_elems * (1 if self.cfg.host_dtype == "fp8" else elt) + \
                (self.row_elems // BLOCK * elt if self.cfg.host_dtype == "fp8" else 0)
        elif dtype != self.dtype:
            raise PluginError(f"prefetch {self.plugin_name}: expert parameters come in {self.dtype} and {dtype}; the "
                              "cache rows hold one dtype")

    def _rows(self, layer: int) -> torch.Tensor:
        """Layer's host rows [E, host_row_bytes] uint8, allocated on first use (page-locked on CUDA)."""
        host = self.host.get(layer)
        if host is None:
            host = torch.empty(self.num_experts, self.host_row_bytes, dtype=torch.uint8)
            if self.cuda:  # page-locked in place, as the layer store does: torch's pinned allocator would round
                # the 3.2 GB of a Qwen3-Next layer up to 4 GB (a power of two)
                if _register_pinned(host):
                    self._registered.append(host)
                else:
                    host = host.pin_memory()
            self.host[layer] = host
        return host

    def _store(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Expert parameter `name` of `layer` ([E, ...] on any device) into its columns of the layer's host rows, a
        few experts at a time (fp8: quantized where the value lies, so a GPU-drawn model sends only the codes)."""
        self._layout_dtype(value.dtype)
        host = self._rows(layer)
        _, off, n, padded = self.entries[name]
        e = self.num_experts
        step = max(1, CHUNK_BYTES // (padded * 4))
        for e0 in range(0, e, step):
            x = F.pad(value[e0:e0 + step].detach().reshape(-1, n), (0, padded - n))  # zeros: whole scale blocks
            rows = host[e0:e0 + step]
            if self.cfg.host_dtype == "fp8":
                codes, scales = quantize_fp8(x)
                _put(rows[:, off:off + padded], codes.view(torch.uint8))
                at = self.row_elems + off // BLOCK * scales.element_size()
                scales = scales.view(torch.uint8)
                _put(rows[:, at:at + scales.shape[1]], scales)
            else:
                elt = value.element_size()
                _put(rows[:, off * elt:(off + padded) * elt], x.view(torch.uint8))
        self._stored.add((layer, name))

    # --- setup --------------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, device: torch.device) -> None:
        if self._loading is not model:  # built without load_engine's keep_weight: its experts are packed below
            self._begin(model, device)
        blocks = self.blocks
        device = self.device
        self._next_moe = dict(zip(self.moe_layers, self.moe_layers[1:], strict=False))  # the last predicts none
        expert_params = {id(p) for b in blocks.values() for p in b.experts._parameters.values() if p is not None}
        self.dense_bytes = self._place_dense(model, device, expert_params)
        self._layout_dtype(blocks[self.moe_layers[0]].experts._parameters[next(iter(self.entries))].dtype)
        self.top_k = blocks[self.moe_layers[0]].get_submodule(blocks[self.moe_layers[0]].router_name).top_k
        # fp8 on CUDA: a batch's codes land in a staging buffer of k rows (a decode step's misses of one layer) and
        # are dequantized from it into their slots in one launch; a larger batch (a prefill round, a prefetch) goes
        # through it k rows at a time, the stream's order keeping a chunk from overwriting rows not yet dequantized
        self.staging_rows = self.top_k if self.cuda and self.cfg.host_dtype == "fp8" else 0
        staging = self.staging_rows * self.host_row_bytes
        total = len(blocks) * self.num_experts
        cap = self._cap()
        slots = total if cap is None else int((cap - self.dense_bytes - staging) // self.row_bytes)
        if self.cfg.max_cached_experts:
            slots = min(slots, self.cfg.max_cached_experts)
        self.num_slots = min(slots, total)
        if self.num_slots < 1:  # before packing what load_engine did not
            raise PluginError(self._too_small(self.dense_bytes, f"one {self.row_bytes / 1e6:.3f} MB expert"))
        for i, b in blocks.items():
            for name in self.entries:
                if (i, name) not in self._stored:
                    self._store(i, name, b.experts._parameters[name])
                b.experts._parameters[name] = None  # the host rows hold it now: free the original (or placeholder)
        self._loading = None
        self.staging = torch.empty(self.staging_rows, self.host_row_bytes, dtype=torch.uint8,
                                   device=device) if staging else None
        # NaN until loaded: a slot read before its expert arrived poisons the logits instead of passing unnoticed
        self.cache = torch.full((self.num_slots, self.row_elems), float("nan"), dtype=self.dtype, device=device)
        if self.cuda:  # the side stream's first copies into the cache must land after this fill, not under it
            torch.cuda.synchronize(device)
        views = {name: self.cache[:, off:off + n].view(self.num_slots, *shape)
                 for name, (shape, off, n, _) in self.entries.items()}
        for b in blocks.values():
            for name in views:
                b.experts._parameters[name] = views[name]
            b.expert_hooks = self

        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.model = model
        self.forget()

    def forget(self) -> None:
        """Drop every cached expert and zero the counters: the next step starts cold (a benchmark compares the
        predictors on one engine)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._slot_of: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, LRU first
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._ready: dict[int, object] = {}  # slot -> copy-done event (CUDA) not yet waited for
        self._last_use: dict[int, object] = {}  # slot -> compute-done event of its last use (CUDA)
        self._prefetched: set[tuple[int, int]] = set()  # loaded by a prediction, not yet used
        self._routed: Counter[tuple[int, int]] = Counter()  # (layer, expert) -> steps that routed to it (lfu)
        self._stalls: list[tuple[object, object]] = []  # CUDA (before, after) events around the waits for copies
        self._copy_times: list[tuple[object, object, object]] = []  # CUDA (start, copied, dequantized or None)
        self.copy_s = self.dequant_s = 0.0  # copy-stream time in the host-to-device copies, in the dequantization
        self.counts: Counter[str] = Counter()
        self.stall_s = 0.0
        self.held_bytes = self.dense_bytes + self.num_slots * self.row_bytes + \
            (0 if self.staging is None else self.staging.numel())
        self._layer = None

    def _place_dense(self, model: nn.Module, device: torch.device, skip: set[int]) -> int:
        """Every parameter and buffer but the routed experts' onto the device (tied weights once); their bytes."""
        moved: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or id(p) in skip:
                    continue
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=False)
                module._parameters[name] = moved[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = moved.setdefault(id(b), b.to(device))
        return sum(t.numel() * t.element_size() for t in moved.values())

    # --- the hooks ----------------------------------------------------------------------------------------------
    def before_layer(self, index: int) -> None:
        self._layer = index

    def after_layer(self, index: int) -> None:
        self._layer = None

    def run_experts(self, x, weights, experts, compute):
        layer = self._layer
        if layer not in self.blocks:  # the layer index comes from the hooks: a step without them would mix layers up
            raise RuntimeError(f"prefetch {self.plugin_name}: a MoE block ran outside before_layer/after_layer "
                               f"(layer {layer}); run the model step with this policy as its hooks")
        nxt = self._next_moe.get(layer) if self.cfg.predict == "router" else None
        routed = experts.reshape(-1)
        if nxt is not None:  # the next layer's router on this layer's MLP input (softmax keeps the logits' order)
            router = self.blocks[nxt].get_submodule(self.blocks[nxt].router_name)
            per_token = min(self.cfg.prefetch_per_token or self.top_k, self.num_experts)
            guess = torch.topk(F.linear(x, router.weight, router.bias), per_token, dim=-1).indices.reshape(-1)
            routed = torch.cat((routed, guess))
        ids_host = routed.cpu()  # the one host sync of this layer
        self._resolve_stalls()
        if layer == self.moe_layers[0]:
            self.counts["tokens"] += x.shape[0]
        chosen = ids_host[: experts.numel()].view(experts.shape)
        needed = sorted(set(chosen.reshape(-1).tolist()))
        self.counts["accesses"] += len(needed)
        if self.cfg.eviction == "lfu":
            self._routed.update((layer, e) for e in needed)
        rounds = [needed[i:i + self.num_slots] for i in range(0, len(needed), self.num_slots)]
        self.counts["rounds"] += len(rounds)
        out = pairs = None
        for r, group in enumerate(rounds):
            slots = self._bring_in(layer, group)
            if r == len(rounds) - 1 and nxt is not None:  # queued behind this round's copies, hidden by its compute
                self._prefetch(nxt, ids_host[experts.numel():], pinned=set(slots))
            self._wait(slots)
            # pairs of other rounds point at one of this round's slots (zero weight): never at an unloaded NaN row
            lut = torch.full((self.num_experts,), slots[0], dtype=torch.long)
            lut[torch.tensor(group)] = torch.tensor(slots)
            ids = lut[chosen].to(self.device, non_blocking=True)
            if len(rounds) == 1:
                out = compute(weights, ids)
            else:
                pairs = self._round_pairs(compute, weights, chosen, group, ids, pairs)
            if self.cuda:
                done = torch.cuda.Event()
                done.record()
                for s in slots:
                    self._last_use[s] = done
        if pairs is not None:  # every pair came from its own round: one sum over k, as a single call sums
            out = pairs.sum(dim=1)
        return out

    def _round_pairs(self, compute, weights, chosen, group, ids, pairs):
        """One round of a step split into rounds: each routing slot j (a token's j-th expert) computed on its own,
        so a pair's weighted output is the value a single call makes for it and the rounds never add two rounded
        partial sums. Summing [N, H] rounds instead (the k experts of a token spread over rounds) rounds every
        partial sum to the model dtype: in bf16 the logits moved by up to 0.45 (4 layers of Qwen3-Next-80B shapes,
        random weights, a 64-token prompt in ~11 rounds a layer), as random routers' near-tied top-k flip.
        pairs: [N, k, hidden], zeros where a pair's round has not come yet; adding another round's exact zero
        (weight 0) leaves a value as it is."""
        n, k = chosen.shape
        member = torch.isin(chosen, torch.tensor(group))  # [N, k] on the host: this round's pairs
        w = weights * member.to(self.device, weights.dtype)
        for j in range(k):
            if not bool(member[:, j].any()):
                continue
            part = compute(w[:, j:j + 1], ids[:, j:j + 1])  # [N, hidden]: pair j of each token, 0 outside the round
            if pairs is None:
                pairs = torch.zeros(n, k, part.shape[-1], dtype=part.dtype, device=part.device)
            pairs[:, j] += part
        return pairs

    # --- cache machinery ----------------------------------------------------------------------------------------
    def _take_slot(self, pinned: set[int]) -> int | None:
        """A free slot, else the eviction rule's victim among the slots not in `pinned`, else None."""
        if self._free:
            return self._free.pop()
        candidates = (key for key, slot in self._slot_of.items() if slot not in pinned)  # least recent first
        if self.cfg.eviction == "lfu":
            key = min(candidates, key=self._routed.__getitem__, default=None)  # min keeps the first of equals
        else:
            key = next(candidates, None)
        if key is None:
            return None
        slot = self._slot_of.pop(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.counts["prefetch_wasted"] += 1
        self.counts["evictions"] += 1
        return slot

    def _copy(self, layer: int, rows: list[tuple[int, int]]) -> None:
        """Bring a batch of `layer`'s experts into their slots: rows [(expert, slot)], each slot free or evicted for
        it. Issue 18: one copy and one dequantization a row, serialised on the copy stream, held fp8 to 30% of its
        I/O floor. Now a layer's misses move together: one copy per run of consecutive host rows (bf16: consecutive
        in both the host and the cache, straight into the slots); fp8 lands in a staging buffer of up to
        `staging_rows` rows and one launch dequantizes all of them into their slots from an index tensor."""
        rows = sorted(rows)  # expert order: consecutive host rows become one copy
        host = self.host[layer]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                for _, slot in rows:
                    used = self._last_use.pop(slot, None)
                    if used is not None:  # the compute stream may still be reading the evicted expert
                        self.copy_stream.wait_event(used)
                step = self.staging_rows or len(rows)  # bf16 needs no staging: every run in one go
                for c in range(0, len(rows), step):
                    self._copy_chunk(host, rows[c:c + step])
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            for _, slot in rows:
                self._ready[slot] = ready
        elif self.cfg.host_dtype == "fp8":
            experts, slots = (torch.tensor(v) for v in zip(*rows, strict=True))
            self._unpack(host[experts], self.cache, slots)
        else:
            for e, slot in rows:
                self.cache[slot].view(torch.uint8).copy_(host[e])
        for e, slot in rows:
            self._slot_of[(layer, e)] = slot
        self.counts["bytes_moved"] += len(rows) * self.host_row_bytes
        self.counts["copies"] += len(rows)  # rows moved (a batch may hold several)
        self.counts["batches"] += 1

    def _copy_chunk(self, host: torch.Tensor, rows: list[tuple[int, int]]) -> None:
        """On the copy stream: rows [(expert, slot)] sorted by expert (at most staging_rows with fp8), timed between
        events (copy, then dequantization) for the bench."""
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.copy_stream)
        fp8 = self.staging is not None
        i = 0
        while i < len(rows):  # a run: host rows e, e+1, ... (bf16: into slots s, s+1, ... as well)
            j = i + 1
            while j < len(rows) and rows[j][0] == rows[j - 1][0] + 1 and (fp8 or rows[j][1] == rows[j - 1][1] + 1):
                j += 1
            e, slot = rows[i]
            src = host[e:e + j - i]
            if fp8:
                self.staging[i:j].copy_(src, non_blocking=True)
            else:
                self.cache[slot:slot + j - i].view(torch.uint8).copy_(src, non_blocking=True)
            self.counts["memcpys"] += 1
            i = j
        copied = torch.cuda.Event(enable_timing=True)
        copied.record(self.copy_stream)
        done = None
        if fp8:  # the slots as a device index: from page-locked memory, queued on this stream (no sync)
            slots = torch.tensor([s for _, s in rows], dtype=torch.int32).pin_memory()
            self._unpack(self.staging[:len(rows)], self.cache, slots.to(self.device, non_blocking=True))
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.copy_stream)
        self._copy_times.append((start, copied, done))

    def _unpack(self, rows: torch.Tensor, out: torch.Tensor, slots: torch.Tensor) -> None:
        """fp8 host rows' bytes [R, host_row_bytes] (codes, then scales) dequantized into out[slots[r]]."""
        p = self.row_elems
        dequantize_fp8_rows(rows[:, :p].view(FP8), rows[:, p:].view(self.dtype), out, slots)

    def _bring_in(self, layer: int, group: list[int]) -> list[int]:
        """The slots of `group`'s experts of `layer`, copying in the missing ones (never evicting one of them)."""
        slots, missing = [], []
        for e in group:
            key = (layer, e)
            slot = self._slot_of.get(key)
            if slot is None:
                missing.append((len(slots), key))
                slots.append(-1)
                continue
            self._slot_of.move_to_end(key)
            if key in self._prefetched:
                self._prefetched.discard(key)
                ready = self._ready.get(slot)
                self.counts["prefetch_hits" if ready is None or ready.query() else "prefetch_late"] += 1
            else:
                self.counts["cache_hits"] += 1
            slots.append(slot)
        pinned = {s for s in slots if s >= 0}
        t0 = time.perf_counter()
        taken = []
        for _ in missing:
            slot = self._take_slot(pinned)
            assert slot is not None, "a round holds at most num_slots experts"
            pinned.add(slot)
            taken.append(slot)
        # any of the taken slots may hold any missing expert: in order, the experts (sorted) meet ascending slots, so
        # a cold cache's consecutive free slots take consecutive host rows in one copy
        for (i, _), slot in zip(missing, sorted(taken), strict=True):
            slots[i] = slot
        if missing:
            self._copy(layer, [(key[1], slots[i]) for i, key in missing])
            self.counts["demand_loads"] += len(missing)
        if missing and not self.cuda:  # the CPU copies ran inline: the step waited for all of them
            self.stall_s += time.perf_counter() - t0
        return slots

    def _prefetch(self, layer: int, guesses: torch.Tensor, pinned: set[int]) -> None:
        """Copy in the predicted experts of `layer` (most voted first) into slots this round does not use, as one
        batch."""
        votes = Counter(guesses.tolist())
        room = self.num_slots - len(pinned)
        rows = []
        for e, _ in votes.most_common(min(len(votes), room)):
            key = (layer, e)
            if key in self._slot_of:
                self._slot_of.move_to_end(key)  # keep it: it is about to be used
                pinned.add(self._slot_of[key])
                continue
            slot = self._take_slot(pinned)
            if slot is None:
                break
            rows.append((e, slot))
            self._prefetched.add(key)
            pinned.add(slot)
        if rows:
            self._copy(layer, rows)
            self.counts["prefetch_issued"] += len(rows)

    def _wait(self, slots: list[int]) -> None:
        """The compute stream waits for the copies of `slots` still in flight (timed between two events)."""
        if not self.cuda:
            return
        events = [self._ready.pop(s) for s in slots if s in self._ready]
        if not events:
            return
        before = torch.cuda.Event(enable_timing=True)
        before.record()
        for ev in events:
            torch.cuda.current_stream().wait_event(ev)
        after = torch.cuda.Event(enable_timing=True)
        after.record()
        self._stalls.append((before, after))

    def _resolve_stalls(self, block: bool = False) -> None:
        keep = []
        for before, after in self._stalls:
            if not block and not after.query():
                keep.append((before, after))
                continue
            after.synchronize()
            self.stall_s += before.elapsed_time(after) / 1e3
        self._stalls = keep
        pending = []
        for start, copied, done in self._copy_times:
            last = done or copied
            if not block and not last.query():
                pending.append((start, copied, done))
                continue
            last.synchronize()
            self.copy_s += start.elapsed_time(copied) / 1e3
            if done is not None:
                self.dequant_s += copied.elapsed_time(done) / 1e3
        self._copy_times = pending

    # --- report -------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        if self.model is None:
            return {}
        self._resolve_stalls(block=True)
        c = self.counts
        hits = c["cache_hits"] + c["prefetch_hits"]
        tokens = max(c["tokens"], 1)
        return {
            "accesses": float(c["accesses"]),  # distinct (layer, expert) a step needed, summed over steps
            "hits": float(hits),
            "misses": float(c["prefetch_late"] + c["demand_loads"]),
            "hit_rate": hits / c["accesses"] if c["accesses"] else 0.0,
            "cache_hits": float(c["cache_hits"]),
            "prefetch_hits": float(c["prefetch_hits"]),
            "prefetch_late": float(c["prefetch_late"]),
            "demand_loads": float(c["demand_loads"]),
            "prefetch_issued": float(c["prefetch_issued"]),
            "prefetch_wasted": float(c["prefetch_wasted"]),
            "prefetch_accuracy": (c["prefetch_hits"] + c["prefetch_late"]) / c["prefetch_issued"]
            if c["prefetch_issued"] else 0.0,
            "evictions": float(c["evictions"]),
            "rounds": float(c["rounds"]),
            "tokens": float(c["tokens"]),
            "bytes_moved": float(c["bytes_moved"]),
            "bytes_per_token": c["bytes_moved"] / tokens,
            "stall_s": self.stall_s,
            # CUDA: the copy stream's time in host-to-device copies and in fp8 dequantization (events around each)
            "copy_s": self.copy_s,
            "dequant_s": self.dequant_s,
            "copy_batches": float(c["batches"]),  # _copy calls: a layer's misses (or prefetches) together
            "memcpys": float(c["memcpys"]),  # host-to-device copy calls (CUDA): one per run of consecutive rows
            "expert_bytes": float(self.host_row_bytes),  # moved per expert (fp8: codes + scales)
            "expert_cache_bytes": float(self.row_bytes),  # a cache row on the device (the model dtype)
            "cache_slots": float(self.num_slots),
            "num_experts_stored": float(len(self.blocks) * self.num_experts),
            "dense_bytes": float(self.dense_bytes),
            "device_weight_bytes": float(self.held_bytes),
            "budget_bytes": float(self.cfg.budget_gb or 0.0) * GB,
        }

    def close(self) -> None:
        if self.model is not None:
            if self.cuda:
                self.copy_stream.synchronize()
            for b in self.blocks.values():
                b.expert_hooks = None
        for t in getattr(self, "_registered", ()):  # also after a failed setup; before the memory is freed: CUDA
            _unregister_pinned(t)  # must not keep a freed range locked
        self._registered, self.host, self.cache, self.model, self._loading = [], {}, None, None, None
        self.staging = None

    def host_pinned(self) -> bool:
        """Whether every layer's host rows are page-locked (torch's allocator or registered in place)."""
        ids = {t.data_ptr() for t in self._registered}
        return all(h.is_pinned() or h.data_ptr() in ids for h in self.host.values())

    def __del__(self):
        if getattr(self, "_registered", None):
            try:
                self.close()
            except Exception:  # interpreter shutdown: CUDA may already be gone
                pass


__all__ = ["ExpertStreaming", "ExpertStreamingConfig"]

"""The machinery shared by the layer-streaming policies (on_demand, lookahead, adaptive, memory_aware).

`setup(model, device)`: the embeddings, final norm and LM head go to the device (or stay in host memory and move
around their own forward when `keep_head_on_device` is false); every decoder layer's weights go into a
WeightStore of the configured tier and the layer's parameters are replaced by placeholders (host views, or meta
tensors for the disk tier, so host memory is freed). A `MemoryManager` holds the device slots (one layer each),
sized from `budget_gb`, and a `LayerLoader` fills them on worker threads.

`before_layer(i)`: make sure a load of layer i is under way (or its bytes are still cached in a slot), start the
prefetches of the next `distance` layers (cyclically: the last layers prefetch the next forward's first ones),
wait for layer i, and point its parameters at the slot (`module._parameters[name] = view`, which works under
torch.inference_mode and costs no copy). `after_layer(i)`: record the compute stream's "layer i done" event (a
later load into this slot waits for it), restore the placeholders, and release the slot: kept as a cached copy,
or freed at once (`discard_after_use`, on_demand).

Subclasses choose `distance`, the slot count (`plan_slots`) and the eviction rule, and may retune them at the start
or end of every forward (`forward_start`, `forward_end`). Outputs are bit-identical to the resident run: the
bytes in a slot are the weights' own bytes, at the same alignment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ollm_triton.prefetch.base import PrefetchPolicy
from ollm_triton.prefetch.loader import LOADERS, Completion, LayerLoader
from ollm_triton.prefetch.pool import GPUMemoryPool, MemoryManager, aligned_empty
from ollm_triton.prefetch.stats import PrefetchStats
from ollm_triton.prefetch.store import VERIFY, WeightStore
from ollm_triton.registry import PluginError

STREAM_TIERS = ("cpu", "disk")
EVICTIONS = ("lru", "next_use")
GB = 1e9


@dataclass
class StreamingConfig:
    tier: str = "cpu"  # where the decoder layers live: cpu (pinned host memory) | disk (one safetensors file each)
    budget_gb: float | None = None  # device memory for embeddings/head + layer slots (null: no limit)
    cache_dir: str | None = None  # disk tier: the layer files' directory (null: ~/.cache/ollm_triton/<model hash>)
    keep_head_on_device: bool = True  # embeddings, final norm, LM head: on the device, or moved in per forward
    headroom_gb: float = 0.5  # part of budget_gb kept free for activations and the KV cache
    workers: int = 2  # loader threads (and staging buffers)
    loader: str = "auto"  # auto | staged | kvikio (disk tier)
    verify: str = "once"  # layer-file checksums: always | once (first read of each file) | never
    page_cache: bool = True  # false: reads bypass the page cache (O_DIRECT), measuring the disk itself

    def check(self) -> None:
        if self.tier not in STREAM_TIERS:
            raise ValueError(f"tier must be one of {', '.join(STREAM_TIERS)}, got {self.tier!r}")
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"budget_gb must be > 0 or null, got {self.budget_gb}")
        if self.headroom_gb < 0:
            raise ValueError(f"headroom_gb must be >= 0, got {self.headroom_gb}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.verify not in VERIFY:
            raise ValueError(f"verify must be one of {', '.join(VERIFY)}, got {self.verify!r}")


def _key(i: int) -> str:
    return f"layer.{i}"


class StreamingPolicy(PrefetchPolicy):
    """Base of the policies that stream decoder layers from a WeightStore (not registered itself)."""

    discard_after_use = False  # on_demand frees a slot right after its layer instead of keeping it cached


    def __init__(self, cfg: StreamingConfig, store: WeightStore | None = None):
        self.cfg = cfg
        self.store = store
        self._own_store = store is None
        self.distance = 0
        self.eviction = "lru"
        self.model = None
        self._hooks = []

    # --- what subclasses decide ----------------------------------------------------------------------------
    def min_slots(self) -> int:
        return self.distance + 1

    def plan_slots(self, allowed: int) -> int:
        """Slots to use given how many the budget allows (subclasses override)."""
        return self.min_slots()

    def forward_start(self) -> None:
        """Called at before_layer(0)."""

    def forward_end(self) -> None:
        """Called at after_layer(last)."""

    # --- the run's memory check (engine/footprint.py), before any model exists ---------------------------------
    def max_planned_slots(self, num_layers: int, allowed: int) -> int:
        """The most layer slots this policy may hold given `allowed` by the budget: its slot cap (max_cache_size,
        max_distance + 1, one for on_demand), else every allowed layer."""
        if self.discard_after_use:
            cap = 1
        elif getattr(self.cfg, "max_cache_size", None):
            cap = self.cfg.max_cache_size
        elif getattr(self.cfg, "max_distance", None):
            cap = self.cfg.max_distance + 1
        else:
            cap = num_layers
        return max(1, min(cap, allowed, num_layers))

    def device_weight_bytes(self, total_bytes: int, layer_bytes: int | None = None, num_layers: int | None = None,
                            head_bytes: int = 0, expert_bytes: int = 0) -> float:
        """Weight bytes on the device at once: the embeddings/head (all of them, or the larger module when
        keep_head_on_device is false) plus the layer slots the budget and the policy allow. Without the layer
        shape: all weights, capped by budget_gb - headroom_gb."""
        budget = None if self.cfg.budget_gb is None else self.cfg.budget_gb * GB
        if not layer_bytes or not num_layers:
            cap = total_bytes if budget is None else max(budget - self.cfg.headroom_gb * GB, 0.0)
            return float(min(total_bytes, cap))
        head = head_bytes if self.cfg.keep_head_on_device else head_bytes / 2
        allowed = num_layers if budget is None else int((budget - head - self.cfg.headroom_gb * GB) // layer_bytes)
        return float(min(total_bytes, head + self.max_planned_slots(num_layers, max(allowed, 1)) * layer_bytes))

    # --- setup ---------------------------------------------------------------------------------------------
    def weights_device(self, device: torch.device) -> torch.device:
        # load_engine materialises the weights on the host; setup moves the head and stores the layers
        return torch.device("cpu")

    def setup(self, model: nn.Module, device: torch.device) -> None:
        device = torch.device(device)
        self.model, self.device = model, device
        self.cuda = device.type == "cuda"
        self.layers = list(model.model.layers)
        self.num_layers = len(self.layers)
        self.stats_ = PrefetchStats(device)
        head_device_bytes = self._place_head(model, device)
        if self.store is None:
            dtype = next(iter(dict(self.layers[0].named_parameters()).values())).dtype
            self.store = WeightStore.from_layers(
                self.layers, self.cfg.tier, config=getattr(model, "config", None), dtype=dtype, device=device,
                cache_dir=self.cfg.cache_dir, pin=self.cuda, verify=self.cfg.verify, workers=max(2, self.cfg.workers))
        elif self.store.num_layers != self.num_layers:
            raise PluginError(f"prefetch {self.plugin_name}: the given store holds {self.store.num_layers} layers, "
                              f"the model has {self.num_layers}")
        self._bindings = []  # per layer: [(module, attribute, entry name)]
        self._placeholders = []
        for i, layer in enumerate(self.layers):
            host = self.store.layouts[i].views(self.store.image(i)) if self.store.tier == "cpu" else {}
            binding, placeholder = [], {}
            for e in self.store.layouts[i].entries:
                module_name, _, attr = e.name.rpartition(".")
                module = layer.get_submodule(module_name) if module_name else layer
                binding.append((module, attr, e.name))
                placeholder[e.name] = host.get(e.name, torch.empty(e.shape, dtype=e.dtype, device="meta"))
                module._parameters[attr] = placeholder[e.name]
            self._bindings.append(binding)
            self._placeholders.append(placeholder)
        self.slot_bytes = self.store.slot_bytes
        budget = None if self.cfg.budget_gb is None else int(self.cfg.budget_gb * GB)
        self.budget_bytes = budget
        if budget is None:
            allowed = self.num_layers
        else:
            allowed = int((budget - head_device_bytes - self.cfg.headroom_gb * GB) // self.slot_bytes)
        self.allowed_slots = max(0, min(allowed, self.num_layers))
        slots = self.plan_slots(self.allowed_slots)
        if slots < 1 or slots > self.allowed_slots or slots < min(self.min_slots(), self.num_layers):
            raise PluginError(
                f"prefetch {self.plugin_name}: budget_gb={self.cfg.budget_gb} leaves room for {self.allowed_slots} "
                f"layer slot(s) of {self.slot_bytes / GB:.3f} GB after {head_device_bytes / GB:.3f} GB of "
                f"embeddings/head and headroom_gb={self.cfg.headroom_gb}; this policy needs "
                f"{max(1, min(self.min_slots(), self.num_layers))}: raise budget_gb or lower prefetch_distance")
        self.memory = MemoryManager(device)
        self.pool: GPUMemoryPool = self.memory.add_pool("layers", self.slot_bytes, slots)
        self.loader = LayerLoader(self.store, device, workers=self.cfg.workers, stats=self.stats_,
                                  kind=self.cfg.loader, direct_io=not self.cfg.page_cache)
        self._loading: dict[int, tuple] = {}  # layer -> (future, allocation, was_prefetch)
        self._bound: dict[int, object] = {}  # layer -> allocation in use by compute
        # slot address -> compute-done event of the last layer that ran from it (addresses survive pool resizes)
        self._free_events: dict[int, Completion | None] = {}

    def _place_head(self, model: nn.Module, device: torch.device) -> int:
        """Embeddings, final norm and LM head: onto the device, or (embeddings, LM head) into (pinned) host memory
        with hooks that move them in for their own forward. The final norm's few kB always go to the device: the
        fused forward reads its weight without calling the module, so a hook would not run. Returns the device
        bytes they take."""
        norm = model.model.norm
        for name, p in list(norm._parameters.items()):
            if p is not None:
                norm._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=False)
        norm_bytes = sum(p.numel() * p.element_size() for p in norm._parameters.values() if p is not None)
        modules = [model.model.embed_tokens, model.lm_head]
        moved: dict[int, torch.Tensor] = {}  # tied weights (lm_head = embed_tokens) move once
        keep = self.cfg.keep_head_on_device
        pin = self.cuda and not keep
        for module in modules:
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in moved:
                    if keep:
                        moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=False)
                    else:
                        host = p.detach().to("cpu")
                        moved[id(p)] = nn.Parameter(host.pin_memory() if pin else host, requires_grad=False)
                module._parameters[name] = moved[id(p)]
        per_module = [sum(p.numel() * p.element_size() for p in m._parameters.values() if p is not None)
                      for m in modules]
        if keep:
            return norm_bytes + sum(t.numel() * t.element_size() for t in moved.values())
        for module in modules:
            self._hooks.append(module.register_forward_pre_hook(self._head_in))
            self._hooks.append(module.register_forward_hook(self._head_out))
        return norm_bytes + max(per_module)  # one module's weights on the device at a time

    def _head_in(self, module, args):
        module._ollm_host = dict(module._parameters)
        for name, p in module._ollm_host.items():
            if p is not None:
                module._parameters[name] = p.to(self.device, non_blocking=True)
                self.stats_.count("head_loads")
                t = time.perf_counter()
                self.stats_.io("head", p.numel() * p.element_size(), t, t)

    def _head_out(self, module, args, output):
        module._parameters.update(module._ollm_host)
        del module._ollm_host

    # --- the hooks -----------------------------------------------------------------------------------------
    def before_layer(self, index: int) -> None:
        if index == 0:
            self.stats_.timeline.forward_start()  # here, not in an embedding hook: fused forwards may skip hooks
            self.forward_start()
        if index not in self._loading and not self.pool.holds(_key(index)):
            self._load(index, prefetch=False, victim=self._victim_for(index, index))
        self._prefetch_after(index)
        alloc = self._acquire(index)
        self._bound[index] = alloc
        views = self.store.layouts[index].views(alloc.tensor)
        for module, attr, name in self._bindings[index]:
            module._parameters[attr] = views[name]
        self.stats_.timeline.layer_start()

    def after_layer(self, index: int) -> None:
        self.stats_.timeline.layer_end()
        done = None
        if self.cuda:
            done = Completion(torch.cuda.Event())
            done.event.record()
        placeholder = self._placeholders[index]
        for module, attr, name in self._bindings[index]:
            module._parameters[attr] = placeholder[name]
        alloc = self._bound.pop(index)
        self._free_events[alloc.tensor.data_ptr()] = done
        self.pool.release(_key(index), keep=not self.discard_after_use)
        if index == self.num_layers - 1:
            self.forward_end()

    # --- cache machinery -----------------------------------------------------------------------------------
    def _next_use(self, current: int, layer: int) -> int:
        """How many layers from `current` until `layer` runs again (cyclically; 0 for `current` itself)."""
        return (layer - current) % self.num_layers

    def _victim_for(self, current: int, wanted: int):
        """The eviction choice when a slot is needed for `wanted`: never a cached layer needed sooner than it."""
        need = self._next_use(current, wanted)

        def pick(lru: list[str]) -> str | None:
            candidates = [n for n in lru if self._next_use(current, int(n.split(".")[1])) > need]
            if not candidates:
                return None
            if self.eviction == "next_use":  # Belady: the layer used furthest in the future
                return max(candidates, key=lambda n: self._next_use(current, int(n.split(".")[1])))
            return candidates[0]  # least recently released

        return pick

    def _load(self, layer: int, *, prefetch: bool, victim) -> bool:
        alloc = self.pool.try_allocate(_key(layer), (self.slot_bytes,), torch.uint8, victim=victim)
        if alloc is None:
            if prefetch:
                return False
            raise RuntimeError(f"prefetch {self.plugin_name}: no free slot for layer {layer} "
                               f"({self.pool.num_slots} slots, {self.pool.in_use_count()} in use)")
        future = self.loader.submit(layer, alloc.tensor, self._free_events.pop(alloc.tensor.data_ptr(), None))
        self._loading[layer] = (future, alloc, prefetch)
        if prefetch:
            self.stats_.count("prefetch_issued")
        return True

    def _prefetch_after(self, index: int) -> None:
        for step in range(1, min(self.distance, self.num_layers - 1) + 1):
            j = (index + step) % self.num_layers
            if j in self._loading or self.pool.holds(_key(j)):
                continue
            if not self._load(j, prefetch=True, victim=self._victim_for(index, j)):
                break  # no slot: later layers would need one too

    def _acquire(self, index: int):
        if index in self._loading:
            future, alloc, was_prefetch = self._loading.pop(index)
            ready = future.done()
            t0 = time.perf_counter()
            completion = future.result()  # re-raises a load's error (WeightStoreError names the file)
            self.stats_.host_wait_s += time.perf_counter() - t0
            completion.wait_on_current_stream()
            if was_prefetch:
                self.stats_.access("prefetch_hits" if ready else "prefetch_late")
            else:
                self.stats_.access("demand_loads")
            return alloc
        alloc = self.pool.allocate(_key(index), (self.slot_bytes,), torch.uint8)
        assert alloc.reused, "a cached layer's slot must still hold its bytes"
        self.stats_.access("cache_hits")
        return alloc

    # --- resizing (adaptive, memory_aware) -----------------------------------------------------------------
    def resize_slots(self, slots: int) -> int:
        """Change the slot count (at least distance + 1 and the slots in flight); frees device memory on shrink."""
        # freed slots go back to PyTorch's allocator, which orders their reuse on the compute stream after the work
        # already queued there, so no synchronisation is needed here
        return self.memory.resize("layers", max(1, min(slots, self.allowed_slots)))

    # --- report --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        if self.model is None:
            return {}
        out = self.stats_.summary()
        out.update({"distance": float(self.distance), "slots": float(self.pool.num_slots),
                    "num_layers": float(self.num_layers), "layer_bytes": float(self.slot_bytes),
                    "disk_tier": float(self.store.tier == "disk"), "kvikio": float(self.loader.kind == "kvikio")})
        out["gbps_tier"] = out["gbps_disk"] if self.store.tier == "disk" else out["gbps_copy"]
        out.update({f"pool_{k}": v for k, v in self.pool.report().items()})
        return out

    def close(self) -> None:
        if self.model is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.loader.close()
        self.memory.close()
        if self._own_store:
            self.store.close()


__all__ = ["StreamingConfig", "StreamingPolicy", "aligned_empty"]

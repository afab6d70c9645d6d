"""`+adapt=...`: each strategy driven through its inputs on the CPU (a simulated KV budget or device, injected stall
times, acceptance, power and temperature), the live codec switch against a run that moved its cache by hand, and
the runner's record of the decisions."""

import dataclasses
import gc
import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ollm_triton.adapt.base import Signals
from ollm_triton.decoding.greedy import Greedy
from ollm_triton.engine import load_engine
from ollm_triton.engine.engine import Engine
from ollm_triton.monitor import Sample
from ollm_triton.prefetch.stats import PrefetchStats
from ollm_triton.registry import PluginError, registry
from ollm_triton.run import run_job

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "ollm_triton" / "assets" / "tiny-llama")
PROMPT, NEW = 40, 16
QUANT = {"residual": 16, "group_size": 16}  # short windows, so a 60-token cache holds quantized tokens


@pytest.fixture(scope="module")
def probe():
    """The embedded model over a plain dense cache (references)."""
    return engine()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 8000, (1, PROMPT), generator=torch.Generator().manual_seed(3))


_WEIGHTS = []  # the embedded model, loaded once: every engine here shares its weights (they are only read)


def engine(codec=None):
    if not _WEIGHTS:
        _WEIGHTS.append(load_engine(TINY, device="cpu", dtype=torch.float32))
    base = _WEIGHTS[0]
    return Engine(base.model, attention=registry.build("attention", "sdpa"), codec=codec or registry.build(
        "cache", "dense"), prefetch=registry.build("prefetch", "resident"), device=base.device, dtype=base.dtype,
        tokenizer=base.tokenizer)


def adapted(name, **params):
    """An adapter, the engine built with its wrapped codec, attached as the runner does."""
    adapter = registry.build("adapt", name, params)
    eng = engine(adapter.wrap_codec(registry.build("cache", "dense")))
    adapter.attach(engine=eng)
    return adapter, eng


def dense_bytes_per_token(eng):
    c = eng.config  # K and V, every layer, float32
    return 2 * c.num_kv_heads * c.head_dim * 4 * c.num_layers


def greedy_by_hand(eng, prompt, new, switch_at_len=None, codec=None, capacity=None):
    """Greedy decoding with plain forwards over a dense cache (of `capacity` tokens, default the whole horizon);
    when the cache holds `switch_at_len` tokens, every layer's K/V is appended to a fresh layer of `codec` (the
    public CacheLayer API) and decoding goes on there. Returns (tokens, logits of every step)."""
    cache = eng.new_cache(batch=1, max_len=capacity or PROMPT + new)
    logits = eng.prefill(prompt, cache)
    tokens, steps = [], [logits]
    for _ in range(new - 1):
        tok = logits.argmax(-1)
        tokens.append(int(tok))
        if switch_at_len is not None and cache.layers[0].length == switch_at_len:
            spec = eng.layer_spec(1, PROMPT + new)
            moved = []
            for layer in cache.layers:
                k, v = layer.dense()
                fresh = codec.new_layer(spec)
                fresh.append(k, v)
                moved.append(fresh)
            cache.layers = moved
        logits = eng.forward(tok[:, None], cache)[:, -1]
        steps.append(logits)
    tokens.append(int(logits.argmax(-1)))
    return torch.tensor([tokens]), torch.stack(steps)


# --- memory: the live KV codec switch -----------------------------------------------------------------------------

def test_memory_switch_mid_generation_equals_a_cache_moved_by_hand(probe, prompt, one_torch_thread):
    """A budget dense exceeds mid-run: the switch is recorded at the step the arithmetic says, the tokens before it
    are dense's, and everything after equals a run whose cache was moved to int8 by hand at that point."""
    fits = 48  # dense tokens the budget holds: 40 of prompt, then 8 decode steps
    per_token = dense_bytes_per_token(probe)
    budget_gb = (fits + 0.5) * per_token / 1e9
    adapter, eng = adapted("memory", budget_gb=budget_gb, every=4, **QUANT)
    out = Greedy().generate(eng, prompt, NEW)

    decisions = adapter.report()["adapt/decisions"]
    assert [(d["from"], d["to"]) for d in decisions] == [("dense", "int8")]
    # step 1 is the prefill (40 tokens), step s >= 2 appends token 40 + s - 2: the first that passes 48 held is the
    # 49th, at step 10 (the arithmetic of the budget)
    assert decisions[0]["step"] == fits - PROMPT + 2
    assert decisions[0]["effect"]["kv_bytes_after"] < decisions[0]["effect"]["kv_bytes_before"]

    dense_tokens, dense_logits = greedy_by_hand(probe, prompt, NEW)
    int8 = registry.build("cache", "int8", QUANT)
    ref_tokens, ref_logits = greedy_by_hand(probe, prompt, NEW, switch_at_len=fits, codec=int8)
    switched = fits - PROMPT + 1  # tokens emitted before the switch
    assert torch.equal(out.tokens[:, :switched], dense_tokens[:, :switched])
    assert torch.equal(out.tokens, ref_tokens)
    # the reference really is a different run after the switch (int8 moved its logits), so the equality above binds
    assert not torch.allclose(ref_logits[switched:], dense_logits[switched:], atol=1e-6)


def test_memory_moves_straight_to_the_codec_that_fits_the_horizon(probe, prompt, one_torch_thread):
    """When int8 would not hold the cache's whole horizon (prompt + new tokens) in the budget, the cache goes to
    int4 directly; with a budget even int4 cannot meet, it still moves there and the decision says so."""
    spec = probe.layer_spec(1, PROMPT + NEW)
    layers = probe.config.num_layers
    need = {n: layers * registry.build("cache", n, QUANT).bytes_for(spec, PROMPT + NEW) for n in ("int8", "int4")}
    budget = (need["int8"] + need["int4"]) / 2  # int4 fits the horizon, int8 does not
    assert budget < PROMPT * dense_bytes_per_token(probe) + need["int4"]  # and dense overflows before the end
    adapter, eng = adapted("memory", budget_gb=budget / 1e9, **QUANT)
    Greedy().generate(eng, prompt, NEW)
    moves = [(d["from"], d["to"]) for d in adapter.report()["adapt/decisions"]]
    assert moves == [("dense", "int4")]

    tight, eng = adapted("memory", budget_gb=need["int4"] / 3 / 1e9, **QUANT)
    Greedy().generate(eng, prompt, NEW)
    report = tight.report()
    assert [(d["from"], d["to"]) for d in report["adapt/decisions"]] == [("dense", "int4")]
    assert "moving there anyway" in report["adapt/decisions"][0]["reason"]
    assert "needed more than int4" in report["adapt/memory"]


class SimulatedDevice(TorchDispatchMode):
    """A device allocator on the CPU: every tensor storage made inside counts as allocated until it is freed (weak
    references to the storages), and an op whose outputs take the total past `cap` fails as a CUDA allocation would.
    Storages made outside (the weights) are not counted: `cap` is the room above them."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap, self.peak = cap, 0
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}

    def allocated(self) -> int:
        self.live = {k: (ref, n) for k, (ref, n) in self.live.items() if not ref.expired()}
        return sum(n for _, n in self.live.values())

    def _see(self, tensors, count: bool) -> int:
        made = 0
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                known = self.live.get(storage._cdata)
                if known is None or known[0].expired():
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes() if count else 0)
                    made += storage.nbytes() if count else 0
        return made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._see(tree_flatten((args, kwargs))[0], count=False)
        out = func(*args, **(kwargs or {}))
        if self._see(tree_flatten(out)[0], count=True):
            self.peak = max(self.peak, self.allocated())
            if self.peak > self.cap:
                raise torch.OutOfMemoryError(f"simulated device: {func} takes {self.peak} B past the cap {self.cap}")
        return out


def test_memory_on_a_device_leaves_room_for_the_chunks_activations_and_finishes(prompt, one_torch_thread):
    """The H100 run at its proportions on a simulated device (chunked prefill, no budget): the room above the weights
    is 0.91 of the dense KV the horizon needs (7.94 of 8.72 GB there) and reserve_gb 1/7.94 of it (1 GB there).
    The flat reserve of the first version left too little for a prompt chunk's activations (the H100 ran out
    inside the prefill); the dense cache is now sized with the chunk's activations counted, so the run switches
    and finishes under the cap, and its tokens equal a run whose cache was moved by hand where the decision says."""
    prompt_len, new, chunk = 512, 6, 32
    ids = torch.randint(0, 8000, (1, prompt_len), generator=torch.Generator().manual_seed(5))
    adapter = registry.build("adapt", "memory", dict(QUANT))
    eng = engine(adapter.wrap_codec(registry.build("cache", "dense")))
    eng.prefill_chunk = chunk
    adapter.attach(engine=eng)
    room = 0.91 * (prompt_len + new) * dense_bytes_per_token(eng)
    adapter.strategies[0].cfg.reserve_gb = room / 7.94 / 1e9
    device = SimulatedDevice(room)
    adapter.device_room = lambda: device.cap - device.allocated()
    adapter.strategies[0].inactive = None  # attach found no CUDA device; the simulated one stands in
    with device:
        out = Greedy().generate(eng, ids, new)
    assert device.peak <= room
    decisions = adapter.report()["adapt/decisions"]
    assert [d["from"] for d in decisions] == ["dense"], [d["reason"] for d in decisions]
    held = int(decisions[0]["reason"].rsplit(" at ", 1)[1].split()[0])
    assert held % chunk == 0 and 0 < held < prompt_len  # it moved inside the prefill, as on the H100

    # by hand: dense chunks; the chunk that found `held` tokens attends over dense, then every layer moves
    ladder = registry.build("cache", decisions[0]["to"], QUANT)
    probe = engine()
    cache = probe.new_cache(batch=1, max_len=prompt_len + new)
    for start in range(0, prompt_len, chunk):
        logits = probe.forward(ids[:, start : start + chunk], cache, last_only=True)[:, -1]
        if start == held:
            spec = probe.layer_spec(1, prompt_len + new)
            moved = []
            for layer in cache.layers:
                fresh = ladder.new_layer(spec)
                fresh.append(*layer.dense())
                moved.append(fresh)
            cache.layers = moved
    tokens = [int(logits.argmax(-1))]
    for _ in range(new - 1):
        logits = probe.forward(torch.tensor([[tokens[-1]]]), cache)[:, -1]
        tokens.append(int(logits.argmax(-1)))
    assert out.tokens.tolist() == [tokens]
    assert all(layer.compressed_tokens > 0 for layer in cache.layers)  # the reference really held lossy KV


@pytest.mark.gpu
def test_memory_switch_on_cuda_reads_the_allocator(prompt):
    """On a GPU the room is the allocator's: a cap 200.5 dense tokens above what is allocated plus what the strategy
    keeps for a forward's activations (engine/footprint.py, counted from shapes) and one re-encoded layer sizes
    dense to 200 tokens; at the append past them the cache moves down the ladder, and the tokens equal a cache
    moved by hand to the codec the decision names (fused kernels in both runs, the same buffer sizes). What a first
    forward allocates for good (the cuBLAS workspace, MBs) is counted before the cap is read: a dense run goes
    first."""
    new, fits = 200, 200  # the horizon (240) must not fit with one re-encoded layer's slack (27 tokens)
    base = load_engine(TINY, device="cuda", dtype=torch.float16)

    def on_cuda(codec):
        return Engine(base.model, attention=registry.build("attention", "sdpa"), codec=codec,
                      prefetch=registry.build("prefetch", "resident"), device=base.device, dtype=base.dtype,
                      tokenizer=base.tokenizer, fast_decode="off")

    per_token = 2 * 2 * 64 * 2 * 6  # float16 K and V, 2 heads of 64, 6 layers
    ids = prompt.cuda()
    greedy_by_hand(on_cuda(registry.build("cache", "dense")), ids, new)
    adapter = registry.build("adapt", "memory", {"reserve_gb": 0.0, **QUANT})
    eng = on_cuda(adapter.wrap_codec(registry.build("cache", "dense")))
    strategy = adapter.strategies[0]
    adapter.attach(engine=eng)
    spec = eng.layer_spec(1, PROMPT + new)
    dense = registry.build("cache", "dense")
    kept = strategy._activations(dense, spec, PROMPT + new) + max(c.bytes_for(spec, PROMPT + new)
                                                                   for c in strategy.ladder)
    gc.collect()
    torch.cuda.synchronize()
    adapter.attach(engine=eng, device_memory_gb=(torch.cuda.memory_allocated() + (fits + 0.5) * per_token + kept)
                   / 1e9)
    out = Greedy().generate(eng, ids, new)
    decisions = adapter.report()["adapt/decisions"]
    moves = [(d["from"], d["step"]) for d in decisions]
    assert moves == [("dense", fits - PROMPT + 2)], [d["reason"] for d in decisions]
    ref = greedy_by_hand(on_cuda(registry.build("cache", "dense")), ids, new, switch_at_len=fits,
                         codec=registry.build("cache", decisions[0]["to"], QUANT), capacity=fits)[0]
    assert torch.equal(out.tokens.cpu(), ref)


def test_a_switched_cache_rolls_back_and_reports_its_storage(probe, prompt, one_torch_thread):
    adapter, eng = adapted("memory", budget_gb=45 * dense_bytes_per_token(probe) / 1e9, **QUANT)
    cache = eng.new_cache(batch=1, max_len=PROMPT + NEW)
    eng.prefill(prompt, cache)
    before = cache.layers[0].dense()[0].clone()
    eng.forward(torch.zeros(1, 8, dtype=torch.long), cache)  # 48 tokens: past the budget, re-encoded to int8
    assert adapter.report()["adapt/switches"] == 1
    cache.truncate(PROMPT)
    assert cache.layers[0].length == PROMPT
    after = cache.layers[0].dense()[0]
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # int8 of what was stored, not something else
    stats = cache.stats()
    assert 0 < stats["kv_stored_bytes"] < stats["kv_original_bytes"]


def test_adapt_none_leaves_the_codec_alone_and_bad_parameters_fail_in_one_line():
    none = registry.build("adapt", "none")
    dense = registry.build("cache", "dense")
    assert none.wrap_codec(dense) is dense and none.report()["adapt/switches"] == 0
    with pytest.raises(PluginError, match="adapt 'memory': unknown parameter 'budget'"):
        registry.build("adapt", "memory", {"budget": 1.0})
    with pytest.raises(PluginError, match="budget_gb must be > 0"):
        registry.build("adapt", "memory", {"budget_gb": -1.0})
    with pytest.raises(PluginError, match="unknown cache plugin 'int3'"):
        registry.build("adapt", "memory", {"ladder": ["int3"]})
    memory = registry.build("adapt", "memory")
    assert memory.planning_codec(dense).plugin_name == "int4"  # the runner's memory check counts the last codec


# --- prefetch stalls -> distance --------------------------------------------------------------------------------

class FakeStreaming:
    """The counters and knobs of a layer-streaming policy (prefetch/layer_streaming.py), driven by the test."""

    plugin_name = "lookahead"

    def __init__(self):
        self.stats_ = PrefetchStats(torch.device("cpu"))
        self.distance, self.num_layers, self.allowed_slots = 1, 16, 8
        self.pool = SimpleNamespace(num_slots=3)
        self.resized = []

    def resize_slots(self, n):
        self.resized.append(n)
        self.pool.num_slots = n

    def stall(self, seconds, misses):
        self.stats_.host_wait_s += seconds
        self.stats_.counts["prefetch_late"] += misses


def test_prefetch_strategy_grows_on_stalls_keeps_what_pays_and_steps_back_otherwise():
    adapter = registry.build("adapt", "prefetch", {"every": 1, "stall_target": 0.05, "min_gain": 0.1})
    policy = FakeStreaming()
    adapter.attach(prefetch=policy)
    clock = [0.0]
    time_now = time.perf_counter

    def step(stall, misses):  # one step of 10 ms wall time in which the policy blocked `stall` seconds
        policy.stall(stall, misses)
        clock[0] += 0.01
        adapter.before_append(None, 1)

    import ollm_triton.adapt.prefetch as P

    P.time.perf_counter = lambda: clock[0]
    try:
        step(0.0, 0)  # first look: nothing to compare with
        step(0.005, 2)  # 50%+ stalled with misses: grow 1 -> 2
        assert policy.distance == 2
        step(0.001, 1)  # the grow cut the stall: kept, and still above target: grow again -> 3
        assert policy.distance == 3 and policy.resized == [4]  # 3 slots could not hold distance 3 + 1
        step(0.001, 1)  # no gain from 3: step back to 2 and hold
        assert policy.distance == 2
    finally:
        P.time.perf_counter = time_now
    moves = [(d["from"], d["to"]) for d in adapter.report()["adapt/decisions"]]
    assert moves == [(1, 2), (2, 3), (3, 2)]
    assert "did not cut the stall" in adapter.report()["adapt/decisions"][-1]["reason"]


def test_prefetch_strategy_stays_out_of_a_policy_that_streams_nothing():
    adapter = registry.build("adapt", "prefetch")
    adapter.attach(prefetch=registry.build("prefetch", "resident"))
    assert adapter.report()["adapt/prefetch"].startswith("inactive: prefetch resident streams no layers")


# --- speculative acceptance -> draft length, or off --------------------------------------------------------------

def test_speculative_strategy_switches_drafting_off_and_back_on_with_acceptance():
    adapter = registry.build("adapt", "speculative", {"initial_candidates": 4, "warmup": 1, "hysteresis": 0.0})
    decoder = registry.build("decoder", "adaptive")
    seen = []
    ctl = adapter.strategies[0]
    ctl.on_switch(lambda old, new, why: seen.append((old, new)))
    adapter.attach(decoder=decoder)
    assert decoder.controller is ctl  # the decoder drives the adapter's controller: one implementation
    went_off = None
    for i in range(60):  # drafts cost 30% of a verify and none is accepted: drafting is a loss
        k = ctl.candidates()
        ctl.observe(k, 0, 0.003 * k, 0.01 + 0.003 * k, 0)
        if ctl.k == 0:
            went_off = i
            break
    assert went_off is not None
    for _ in range(300):  # off: nothing is tested, the estimate decays to the prior (1/2) and drafting is tried
        k = ctl.candidates()  # again; then every draft is accepted and the length grows
        ctl.observe(k, k, 0.003 * k, 0.01 + 0.003 * k, 0)
        if ctl.k > 1:
            break
    assert ctl.k > 1
    decisions = adapter.report()["adapt/decisions"]
    assert seen == [(d["from"], d["to"]) for d in decisions] and any(d["to"] == 0 for d in decisions)
    assert "speculation off" in next(d["reason"] for d in decisions if d["to"] == 0)


def test_the_adaptive_decoder_runs_on_the_adapters_controller(probe, prompt, one_torch_thread):
    """Through the real speculative loop with the embedded draft: the adapter's controller chooses every draft
    length (it observes each of the loop's iterations, a burst of plain steps while off as one), and greedy
    speculation stays token-identical to greedy."""
    adapter = registry.build("adapt", "speculative", {"warmup": 1})
    decoder = registry.build("decoder", "adaptive", {"fast_path": "off"})
    adapter.attach(engine=probe, decoder=decoder)
    out = decoder.generate(probe, prompt, NEW)
    ctl = adapter.strategies[0]
    c = out.counters
    assert ctl.iterations == c["iterations"] - c["speculation_off_steps"] + c["speculation_off_bursts"] > 0
    assert out.counters["candidates_final"] == ctl.k
    assert torch.equal(out.tokens, Greedy().generate(probe, prompt, NEW).tokens)
    decoder.close()


def test_speculative_adapter_leaves_the_codec_unwrapped():
    """The speculative loop drives the controller; the static verify steps need the codec's own buffers."""
    dense = registry.build("cache", "dense")
    assert registry.build("adapt", "speculative").wrap_codec(dense) is dense
    assert registry.build("adapt", "memory").wrap_codec(dense) is not dense


def test_speculative_strategy_needs_a_decoder_with_a_controller():
    adapter = registry.build("adapt", "speculative")
    adapter.attach(decoder=Greedy())
    assert "has no draft-length controller" in adapter.report()["adapt/speculative"]


# --- power / temperature -> pause -------------------------------------------------------------------------------

class FakeMonitor:
    def __init__(self):
        self.sample = None

    def latest(self):
        return self.sample


def test_power_strategy_pauses_above_the_target_and_releases_below_it():
    adapter = registry.build("adapt", "power", {"every": 2, "max_power_w": 300.0, "max_temp_c": 80.0,
                                                "pause_step": 0.25})
    monitor = FakeMonitor()
    adapter.attach(monitor=monitor)
    power = adapter.strategies[0]
    energy = [0.0]

    def steps(n, watts, temp, step_s=0.002):
        for _ in range(n):
            energy[0] += watts * step_s
            monitor.sample = Sample(t=time.perf_counter(), gpu_power_w=watts, gpu_temp_c=temp, gpu_energy_j=energy[0])
            time.sleep(step_s)
            adapter.before_append(None, 1)

    steps(2, 250.0, 70.0)
    assert power.setting == 0.0
    steps(2, 350.0, 70.0)  # over the power target: pause a quarter of the time
    assert power.setting == 0.25
    t0 = time.perf_counter()
    steps(2, 320.0, 85.0)  # still over (both): half
    assert power.setting == 0.5
    steps(4, 320.0, 85.0)  # two more looks: 0.75, then the cap (max_pause 0.8)
    assert power.setting == 0.8
    paused = power.paused_s
    assert paused > 0 and time.perf_counter() - t0 > paused  # the pauses really happened, within the wall time
    steps(2, 200.0, 60.0)  # under both with margin: one step down
    assert power.setting == pytest.approx(0.8 - 0.25)
    decisions = adapter.report()["adapt/decisions"]
    assert [d["to"] for d in decisions] == [0.25, 0.5, 0.75, 0.8, 0.55]
    assert "350 W > 300 W" in decisions[0]["reason"]
    assert decisions[0]["effect"]["tokens_per_j"] > 0


def test_power_strategy_without_a_target_is_inactive():
    adapter = registry.build("adapt", "power")
    adapter.attach(monitor=FakeMonitor())
    assert "no target" in adapter.report()["adapt/power"]


# --- the runner ------------------------------------------------------------------------------------------------

def test_runner_records_the_live_switch_in_metrics(tmp_path, one_torch_thread):
    """The runner's job (composed as `python -m ollm_triton.run +adapt=memory adapt.budget_gb=...` would be): the
    codec is wrapped, the run finishes, and the record holds the decision."""
    per_token = 2 * 2 * 64 * 4 * 6  # the embedded model's dense KV per token on the CPU (float32, 6 layers)
    overrides = ["model=tiny", "task=throughput", "task.throughput.prompt_len=40", "task.throughput.new_tokens=12",
                 "task.throughput.repeats=1", "+adapt=memory", f"adapt.budget_gb={45 * per_token / 1e9}",
                 "adapt.residual=16", "adapt.group_size=16", "logger=none", "monitor.enabled=false", "device=cpu"]
    with initialize_config_dir(config_dir=str(REPO / "ollm_triton" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    record = run_job(cfg, tmp_path)
    m = record["metrics"]
    assert record["plugins"]["adapt"]["name"] == "memory"
    # the warm-up generation is as long as the timed one (12 tokens: prefill + 11 steps), so each of the two switches
    # dense -> int8 once: a generation's prefill is its step s, and its step s + n appends token 40 + n - 1, the first
    # past the 45 held at n = 6 -- step 1 + 6 in the warm-up, 13 + 6 in the timed run
    assert m["adapt/switches"] == 2 and [d["to"] for d in m["adapt/decisions"]] == ["int8", "int8"]
    assert [d["step"] for d in m["adapt/decisions"]] == [1 + (45 - 40) + 1, 12 + 1 + (45 - 40) + 1]
    assert Counter(d["strategy"] for d in m["adapt/decisions"]) == {"memory": 2}
    json.dumps(record["metrics"])  # metrics.json can hold the decisions


def test_signals_are_frozen():
    s = Signals(step=1, t=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 2

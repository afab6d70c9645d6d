"""Layer streaming on one device: decode tok/s, peak memory and I/O of every prefetch policy, next to the I/O floor.

    python scripts/bench_prefetch.py                 # H200: llama3_8b shapes, random bf16 weights, budget_gb=8
    python scripts/bench_prefetch.py --small         # any machine: a tiny model, same code paths (CPU as device)

One process, in this order (each section records its own error and the run goes on):
1. the `resident` baseline (all 16 GB on the device): prefill, decode tok/s, peak memory, the reference logits;
2. the two weight stores built once from those weights: pinned host images (tier cpu) and one safetensors file per
   layer (tier disk; written once, reused on later runs, checksummed);
3. the bandwidth of each tier, measured here: host-to-device copies of layer images (CUDA events), parallel reads
   of the layer files from the page cache, and parallel O_DIRECT reads (the disk itself; the page cache is dropped
   for those files first with POSIX_FADV_DONTNEED);
4. every policy under `--budget-gb` for three settings: weights in pinned host memory (cpu), in page-cached layer
   files (disk, page_cache=true), and read from the disk on every access (disk, page_cache=false: O_DIRECT). Each
   run checks that its prefill logits equal the resident run's exactly, then times `--decode-tokens` greedy decode
   steps after warm-up (torch.cuda.synchronize around the timed loop), and for the cpu setting a long prefill too;
5. the fixed-slot pool against PyTorch's caching allocator on the same workload (layer-sized buffers interleaved
   with activation-sized temporaries): time per acquire/release and peak reserved memory.

The I/O floor of a row is the tier's measured bandwidth over the bytes that policy actually read per decode token;
`% floor` is the achieved tok/s over it. Results go to <out>/bench_prefetch.json with the device, versions, git
sha, date and the exact command; a GitHub table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.engine.checkpoint import empty_model, init_random  # noqa: E402
from ollm_triton.engine.config import ModelConfig  # noqa: E402
from ollm_triton.engine.engine import Engine  # noqa: E402
from ollm_triton.prefetch.layer_file import read_layer_data  # noqa: E402
from ollm_triton.prefetch.pool import MemoryManager, aligned_empty  # noqa: E402
from ollm_triton.prefetch.store import WeightStore  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402

GB = 1e9
SMALL_ARCH = dict(model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=16384,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def llama3_8b_arch() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "ollm_triton" / "conf" / "model" / "llama3_8b.yaml").read_text())["arch"]


def policies(budget_slots_cap: int) -> dict[str, tuple[str, dict]]:
    """Row label -> (plugin, parameters). Budget and tier are added per setting."""
    return {
        "on_demand": ("on_demand", {}),
        "lookahead": ("lookahead", {"prefetch_distance": 2, "max_cache_size": 4}),
        "lookahead_next_use": ("lookahead", {"prefetch_distance": 2, "max_cache_size": budget_slots_cap,
                                             "eviction": "next_use"}),
        "adaptive": ("adaptive", {}),
        "memory_aware": ("memory_aware", {}),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_sha() -> str:
    if os.environ.get("OLLM_GIT_SHA"):  # the device copy of the tree carries a stale .git: the caller says
        return os.environ["OLLM_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ollm_triton", "scripts"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return os.environ.get("GIT_SHA", "unknown")


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not args.small and self.device.type != "cuda":
            raise SystemExit("the full benchmark needs CUDA; use --small on a machine without a GPU")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        arch = SMALL_ARCH if args.small else llama3_8b_arch()
        self.cfg = ModelConfig.from_hf(arch)
        self.results: dict = {"rows": [], "errors": [], "bandwidth": {}, "pool": {}}
        self.sdpa = registry.build("attention", "sdpa")
        self.dense = registry.build("cache", "dense")
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, self.cfg.vocab_size, (1, args.prompt), generator=gen)
        self.long_prompt = torch.randint(0, self.cfg.vocab_size, (1, args.prefill), generator=gen)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def guard(self, what: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:
            msg = f"{what}: {type(e).__name__}: {e}"
            print("ERROR " + msg, file=sys.stderr)
            traceback.print_exc()
            self.results["errors"].append(msg)
            return None

    # --- model, stores ------------------------------------------------------------------------------------
    def build_weights(self):
        t = time.perf_counter()
        model = empty_model(self.cfg)
        init_random(model, self.device, self.dtype, seed=0)
        model.eval()
        self.model = model
        print(f"weights: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {self.device} "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    def build_stores(self):
        layers = list(self.model.model.layers)
        t = time.perf_counter()
        self.cpu_store = WeightStore.from_layers(layers, "cpu", pin=self.device.type == "cuda")
        t_cpu = time.perf_counter() - t
        t = time.perf_counter()
        self.disk_store = WeightStore.from_layers(layers, "disk", config=self.cfg, dtype=self.dtype,
                                                  cache_dir=self.args.cache_dir, verify="once",
                                                  workers=self.args.write_workers)
        t_disk = time.perf_counter() - t
        self.results["stores"] = {"cpu_build_s": t_cpu, "disk_build_s": t_disk,
                                  "disk_dir": str(self.disk_store.directory),
                                  "layer_bytes": self.cpu_store.layer_bytes(0),
                                  "layers_bytes": sum(self.cpu_store.layer_bytes(i)
                                                      for i in range(self.cfg.num_layers))}
        # keep the head on the device for the streaming engines; drop the layers' device copies
        self.head = {"embed": self.model.model.embed_tokens.weight, "norm": self.model.model.norm.weight,
                     "lm_head": self.model.lm_head.weight}
        self.model = None
        layers.clear()
        torch.cuda.empty_cache() if self.device.type == "cuda" else None
        print(f"stores: cpu {t_cpu:.1f} s, disk {t_disk:.1f} s ({self.disk_store.directory})", file=sys.stderr)

    def streaming_model(self):
        from torch import nn

        model = empty_model(self.cfg)  # layers stay on meta: the store holds their bytes
        model.model.embed_tokens.weight = nn.Parameter(self.head["embed"], requires_grad=False)
        model.model.norm.weight = nn.Parameter(self.head["norm"], requires_grad=False)
        model.lm_head.weight = nn.Parameter(self.head["lm_head"], requires_grad=False)
        model.tie_weights()
        return model.eval()

    # --- bandwidth ----------------------------------------------------------------------------------------
    def measure_bandwidth(self):
        bw = self.results["bandwidth"]
        n_layers = min(self.cfg.num_layers, self.args.bw_layers)
        nbytes = sum(self.cpu_store.layer_bytes(i) for i in range(n_layers))
        slot = aligned_empty(self.cpu_store.slot_bytes, self.device)
        times = []
        for _ in range(3):
            sync(self.device)
            t = time.perf_counter()
            for i in range(n_layers):
                n = self.cpu_store.layer_bytes(i)
                slot[:n].copy_(self.cpu_store.image(i)[:n], non_blocking=True)
            sync(self.device)
            times.append(time.perf_counter() - t)
        bw["copy_gbps"] = nbytes / sorted(times)[1] / GB
        bw["copy_pinned"] = self.cpu_store.is_page_locked(0) if self.device.type == "cuda" else False
        del slot
        workers = self.args.disk_workers
        stages = [aligned_empty(self.disk_store.slot_bytes, "cpu", pin=self.device.type == "cuda")
                  for _ in range(workers)]

        def read_all(direct: bool, count: int) -> tuple[float, bool]:
            used = []

            def one(i):
                info = self.disk_store.files[i]
                used.append(read_layer_data(info, self.disk_store.layouts[i], stages[i % workers], direct=direct))

            t = time.perf_counter()
            # one thread per staging buffer: layer i uses buffer i % workers, so the threads take disjoint layers
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda w: [one(i) for i in range(w, count, workers)], range(workers)))
            return time.perf_counter() - t, all(used)

        n_all = self.cfg.num_layers
        all_bytes = sum(self.disk_store.layer_bytes(i) for i in range(n_all))
        read_all(False, min(n_all, 2 * workers))  # warm the threads; a freshly written cache is in the page cache
        s, _ = read_all(False, n_all)
        bw["page_cache_gbps"] = all_bytes / s / GB
        self.drop_page_cache()
        s, direct = read_all(True, n_layers)
        bw["disk_direct_gbps"] = nbytes / s / GB
        bw["disk_o_direct"] = direct
        bw["workers"] = workers
        print(f"bandwidth: {bw}", file=sys.stderr)

    def drop_page_cache(self):
        for info in self.disk_store.files:
            fd = os.open(info.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    # --- runs ---------------------------------------------------------------------------------------------
    def run_engine(self, label, setting, engine, *, warm: int, timed: int, long_prefill: bool, tier_gbps=None):
        dev = self.device
        policy = engine.prefetch
        cache = engine.new_cache(1, self.args.prompt + warm + timed + 1)
        sync(dev)
        t = time.perf_counter()
        logits = engine.forward(self.prompt, cache, last_only=True)
        sync(dev)
        prefill_s = time.perf_counter() - t
        exact = max_abs_diff = None
        if label == "resident" and setting == "device":
            self.ref_logits = logits.cpu()
        elif getattr(self, "ref_logits", None) is not None:
            exact = bool(torch.equal(logits.cpu(), self.ref_logits))
            max_abs_diff = (logits.cpu() - self.ref_logits).abs().max().item()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(warm):
            tok = engine.forward(tok, cache)[:, -1].argmax(-1, keepdim=True)
        before = policy.stats() if hasattr(policy, "stats_") else {}
        sync(dev)
        t = time.perf_counter()
        for _ in range(timed):
            tok = engine.forward(tok, cache)[:, -1].argmax(-1, keepdim=True)
        sync(dev)
        decode_s = time.perf_counter() - t
        after = policy.stats() if hasattr(policy, "stats_") else {}
        row = {"setting": setting, "policy": label, "exact": exact, "max_abs_diff": max_abs_diff,
               "prefill_tokens": self.args.prompt,
               "prefill_s": prefill_s, "decode_tokens": timed, "decode_tok_s": timed / decode_s}
        if after:
            d = {k: after[k] - before.get(k, 0.0) for k in ("bytes_read", "stall_s", "host_wait_s", "io_busy_s",
                                                             "accesses", "hits", "cache_hits", "compute_s")}
            row.update({
                "gb_per_token": d["bytes_read"] / timed / GB,
                "stall_s_per_token": d["stall_s"] / timed,
                "host_wait_s_per_token": d["host_wait_s"] / timed,
                "hit_rate": d["hits"] / d["accesses"] if d["accesses"] else 0.0,
                "cache_hit_rate": d["cache_hits"] / d["accesses"] if d["accesses"] else 0.0,
                "overlap_efficiency": min(1.0, max(0.0, 1 - d["stall_s"] / d["io_busy_s"])) if d["io_busy_s"] else 0.0,
                "slots": after["slots"], "distance": after["distance"], "kvikio": bool(after["kvikio"]),
                "gbps_tier_achieved": after["gbps_tier"],
            })
            if tier_gbps:
                row["tier_gbps"] = tier_gbps
                row["floor_tok_s"] = tier_gbps / row["gb_per_token"] if row["gb_per_token"] > 0 else float("inf")
                row["pct_of_floor"] = 100 * row["decode_tok_s"] / row["floor_tok_s"]
            row["stats"] = after
        if long_prefill and self.args.prefill > 0:
            cache2 = engine.new_cache(1, self.args.prefill)
            sync(dev)
            t = time.perf_counter()
            engine.forward(self.long_prompt, cache2, last_only=True)
            sync(dev)
            row["long_prefill_s"] = time.perf_counter() - t
            row["long_prefill_tokens"] = self.args.prefill
            del cache2
        del cache
        return row

    def run_resident(self):
        resident = registry.build("prefetch", "resident")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine = Engine(self.model, attention=self.sdpa, codec=self.dense, prefetch=resident, device=self.device,
                        dtype=self.dtype)
        row = self.run_engine("resident", "device", engine, warm=2, timed=self.args.decode_tokens,
                              long_prefill=True)
        row["peak_gb"] = torch.cuda.max_memory_allocated() / GB if self.device.type == "cuda" else None
        self.results["rows"].append(row)

    def run_policy(self, label, plugin, params, setting, store, *, warm, timed, long_prefill, tier_gbps):
        params = {**params, "tier": store.tier, "budget_gb": self.args.budget_gb,
                  "headroom_gb": self.args.headroom_gb, "page_cache": setting != "disk_cold",
                  "workers": self.args.disk_workers if store.tier == "disk" else 2}
        policy = registry.build("prefetch", plugin, params, store=store)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        engine = Engine(self.streaming_model(), attention=self.sdpa, codec=self.dense, prefetch=policy,
                        device=self.device, dtype=self.dtype)
        try:
            row = self.run_engine(label, setting, engine, warm=warm, timed=timed, long_prefill=long_prefill,
                                  tier_gbps=tier_gbps)
        finally:
            engine.close()
        row["peak_gb"] = torch.cuda.max_memory_allocated() / GB if self.device.type == "cuda" else None
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB if self.device.type == "cuda" else None
        self.results["rows"].append(row)
        print(f"[{self.elapsed():6.1f} s] {setting:10s} {label:20s} {row['decode_tok_s']:8.3f} tok/s "
              f"exact={row['exact']} peak={row['peak_gb']}", file=sys.stderr)

    def run_settings(self):
        a = self.args
        layer = self.cpu_store.slot_bytes
        cap = self.cfg.num_layers
        bw = self.results["bandwidth"]
        for setting, store, warm, timed, names, tier_gbps in (
            ("cpu", self.cpu_store, a.warm_tokens, a.decode_tokens, None, bw.get("copy_gbps")),
            # the prefill pass warms the disk settings (and verifies each file's checksums once)
            ("disk_cached", self.disk_store, 0, a.disk_tokens, None, bw.get("page_cache_gbps")),
            ("disk_cold", self.disk_store, 0, a.cold_tokens, a.cold_policies.split(","), bw.get("disk_direct_gbps")),
        ):
            if setting == "disk_cold":
                self.guard("drop page cache", self.drop_page_cache)
            for label, (plugin, params) in policies(cap).items():
                if names is not None and label not in names:
                    continue
                if self.elapsed() > a.time_limit:
                    self.results["errors"].append(f"{setting}/{label}: skipped, past --time-limit {a.time_limit} s")
                    continue
                self.guard(f"{setting}/{label}", self.run_policy, label, plugin, params, setting, store, warm=warm,
                           timed=timed, long_prefill=setting == "cpu", tier_gbps=tier_gbps)
                self.write()  # after every row, so a run cut short by an outer time limit keeps what it measured
        self.results["slot_gb"] = layer / GB

    # --- pool vs caching allocator ------------------------------------------------------------------------
    def bench_pool(self):
        dev = self.device
        slot = self.cpu_store.slot_bytes
        layers = min(8, self.cfg.num_layers)
        rng = random.Random(0)
        temp_sizes = [rng.randint(slot // 64, slot // 2) for _ in range(4096)]
        out = self.results["pool"]

        def workload(acquire, release, iters):
            temps = []
            k = 0
            sync(dev)
            t = time.perf_counter()
            for it in range(iters):
                for i in range(layers):
                    buf = acquire(i, it)
                    buf[:1].fill_(1)  # touch it, as a load would
                    temps.append(torch.empty(temp_sizes[k % len(temp_sizes)], dtype=torch.uint8, device=dev))
                    k += 1
                    if len(temps) > 3:  # activations live a few layers, then die in a scrambled order
                        temps.pop(rng.randrange(len(temps)))
                    release(i, it, buf)
            sync(dev)
            return (time.perf_counter() - t) / (iters * layers)

        iters = self.args.pool_iters
        results = {}
        for name in ("torch_caching_allocator", "memory_pool"):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_reserved()
                torch.cuda.reset_peak_memory_stats()
            if name == "torch_caching_allocator":
                acquire = lambda i, it: torch.empty(slot, dtype=torch.uint8, device=dev)  # noqa: E731
                release = lambda i, it, buf: None  # noqa: E731
                mm = None
            else:
                mm = MemoryManager(dev)
                mm.add_pool("layers", slot, 2)
                acquire = lambda i, it, mm=mm: mm.allocate(f"layer.{i}", (slot,)).tensor  # noqa: E731
                release = lambda i, it, buf, mm=mm: mm.release(f"layer.{i}")  # noqa: E731
            workload(acquire, release, 2)  # warm-up
            per = workload(acquire, release, iters)
            r = {"us_per_acquire_release": per * 1e6}
            if dev.type == "cuda":
                r["peak_reserved_gb"] = (torch.cuda.max_memory_reserved() - base) / GB
                r["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            if mm is not None:
                r.update({k: v for k, v in mm.report().items() if k.startswith("layers_")})
                mm.close()
            results[name] = r
        out.update(results)
        out["workload"] = (f"{layers} layer-sized buffers of {slot / GB:.3f} GB per step, each followed by one "
                           f"temporary of 1/64..1/2 of that size kept for ~3 steps; {iters} steps")

    # --- report -------------------------------------------------------------------------------------------
    def write(self):
        a = self.args
        r = self.results
        r["meta"] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "git_sha": git_sha(),
            "model": "tiny (--small)" if a.small else "llama3_8b (random bf16)",
            "dtype": str(self.dtype).replace("torch.", ""), "budget_gb": a.budget_gb, "headroom_gb": a.headroom_gb,
            "cpu_count": os.cpu_count(), "wall_s": self.elapsed(),
        }
        try:
            import triton

            r["meta"]["triton"] = triton.__version__
        except Exception:
            pass
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_prefetch.json").write_text(json.dumps(r, indent=1, default=str))
        (out / "bench_prefetch.md").write_text(self.table() + "\n")
        print(f"wrote {out / 'bench_prefetch.json'}", file=sys.stderr)

    def table(self) -> str:
        r = self.results
        rows = r["rows"]
        od = {row["setting"]: row["decode_tok_s"] for row in rows if row["policy"] == "on_demand"}

        def f(x, fmt="{:.2f}"):
            return "-" if x is None else fmt.format(x)

        lines = [
            "| setting | policy | exact | decode tok/s | x on_demand | I/O floor tok/s | % floor | GB read/token "
            "| hit rate | overlap | stall s/token | slots | peak GB | long prefill s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            base = od.get(row["setting"])
            lines.append("| " + " | ".join([
                row["setting"], row["policy"],
                "-" if row["exact"] is None else ("yes" if row["exact"] else f"NO ({row['max_abs_diff']:.1e})"),
                f(row["decode_tok_s"], "{:.3f}"),
                f(row["decode_tok_s"] / base if base else None),
                f(row.get("floor_tok_s"), "{:.3f}"), f(row.get("pct_of_floor"), "{:.0f}%"),
                f(row.get("gb_per_token")), f(row.get("hit_rate")), f(row.get("overlap_efficiency")),
                f(row.get("stall_s_per_token"), "{:.3f}"), f(row.get("slots"), "{:.0f}"), f(row.get("peak_gb")),
                f(row.get("long_prefill_s"), "{:.3f}"),
            ]) + " |")
        bw = r["bandwidth"]
        lines += ["", "| tier bandwidth (measured here) | GB/s |", "|---|---|",
                  f"| host->device copy of layer images (pinned={bw.get('copy_pinned')}) | {f(bw.get('copy_gbps'))} |",
                  f"| layer files from the page cache, {bw.get('workers')} threads | {f(bw.get('page_cache_gbps'))} |",
                  f"| layer files from disk (O_DIRECT={bw.get('disk_o_direct')}), {bw.get('workers')} threads "
                  f"| {f(bw.get('disk_direct_gbps'))} |"]
        pool = r["pool"]
        if pool:
            lines += ["", "| allocator (same workload) | us per acquire+release | peak reserved GB |", "|---|---|---|"]
            for name in ("torch_caching_allocator", "memory_pool"):
                if name in pool:
                    lines.append(f"| {name} | {f(pool[name]['us_per_acquire_release'], '{:.1f}')} | "
                                 f"{f(pool[name].get('peak_reserved_gb'))} |")
        m = r.get("meta", {})
        lines += ["", f"device: {m.get('device')}; {m.get('model')}; budget_gb={m.get('budget_gb')}; torch "
                  f"{m.get('torch')}; git {m.get('git_sha')}; {m.get('date')}; wall {m.get('wall_s', 0):.0f} s"]
        if r["errors"]:
            lines += ["errors: " + "; ".join(r["errors"])]
        return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny model (CPU check of every code path)")
    p.add_argument("--budget-gb", type=float, default=None, help="device budget (default 8; --small: 0.03)")
    p.add_argument("--headroom-gb", type=float, default=None, help="budget kept for activations and KV")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--prefill", type=int, default=None, help="long-prefill tokens timed in the cpu setting")
    p.add_argument("--warm-tokens", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=8, help="timed decode tokens (resident and cpu)")
    p.add_argument("--disk-tokens", type=int, default=3, help="timed decode tokens, disk from the page cache")
    p.add_argument("--cold-tokens", type=int, default=1, help="timed decode tokens, disk without the page cache")
    p.add_argument("--cold-policies", default="on_demand,lookahead,lookahead_next_use")
    p.add_argument("--disk-workers", type=int, default=4)
    p.add_argument("--write-workers", type=int, default=8)
    p.add_argument("--bw-layers", type=int, default=8, help="layers read/copied for the bandwidth measurements")
    p.add_argument("--pool-iters", type=int, default=20)
    p.add_argument("--cache-dir", default=None, help="layer-file directory (default: a fresh one under /tmp)")
    p.add_argument("--time-limit", type=float, default=270.0, help="skip remaining runs after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "experiments" / "prefetch" / "results"))
    args = p.parse_args(argv)
    if args.budget_gb is None:
        args.budget_gb = 0.03 if args.small else 8.0
    if args.headroom_gb is None:
        args.headroom_gb = 0.0 if args.small else 2.5  # 8k-token prefill: ~1.1 GB of KV + ~1 GB of activations
    if args.prefill is None:
        args.prefill = 256 if args.small else 8192
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.mkdtemp(prefix="ollm_bench_layers_", dir="/tmp")
        args.cache_dir = tmp
    bench = Bench(args)
    bench.build_weights()
    bench.guard("resident", bench.run_resident)
    bench.build_stores()
    bench.guard("bandwidth", bench.measure_bandwidth)
    bench.run_settings()
    bench.guard("pool", bench.bench_pool)
    bench.write()
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(bench.table())
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

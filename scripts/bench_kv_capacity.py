"""Longest context whose KV cache fits on one device, per codec: found by running, not computed.

    python scripts/bench_kv_capacity.py                  # H200: llama3_8b (random bf16), dense / int4 / int2
    python scripts/bench_kv_capacity.py --small          # any machine: a tiny model, same code path

For each codec the engine is built once (the 16 GB of weights stay on the device). A candidate context N is tried
like this: `engine.new_cache(1, N + steps)` (codecs pre-allocate to it), N post-RoPE K/V tokens appended to every
layer through the codec's own `append` in chunks (so int4/int2 quantize and pack exactly as after a prefill), then
`--steps` real decode steps (`engine.forward` on one token: every layer attends over all N tokens through the
codec's decode path). N fits when none of that raises an out-of-memory error.

The search starts from an estimate (the stored bytes per token of a small cache over the free memory), brackets N
between a size that fits and one that does not, and bisects to `--resolution`. What it leaves out, on purpose: the
prefill's own compute and activations (a 4096-token chunked prefill adds about 1 GB on llama3_8b; a codec whose
prefill attends over dequantized K/V needs one layer of it in full precision on top). The random K/V content does
not matter for capacity; one random chunk is appended repeatedly to keep the search fast.

Writes <out>/bench_kv_capacity.json (every trial, device, versions, git sha, date, command) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.engine import load_engine  # noqa: E402

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=1 << 23, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMALL = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1 << 20,
             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Trial:
    """Fill a cache of one codec to N tokens and decode; record whether it fit and the peak memory."""

    def __init__(self, engine, device: torch.device, chunk: int, steps: int, limit_bytes: int | None):
        self.engine, self.device, self.chunk, self.steps = engine, device, chunk, steps
        self.limit_bytes = limit_bytes  # --small on the CPU: a pretend device size, since the CPU cannot OOM safely
        cfg = engine.config
        self.kv = torch.randn(1, cfg.num_kv_heads, chunk, cfg.head_dim, device=device, dtype=engine.dtype)

    def __call__(self, n: int) -> dict:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        cache = None
        try:
            cache = self.engine.new_cache(1, n + self.steps)
            self._check_limit(cache)
            for layer in cache.layers:
                done = 0
                while done < n:
                    take = min(self.chunk, n - done)
                    part = self.kv[:, :, :take]
                    layer.append(part, part)
                    done += take
                self._check_limit(cache)
            cache.position = n
            token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            for _ in range(self.steps):
                logits = self.engine.forward(token, cache)
                token = logits[:, -1:].argmax(-1)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            row = {"tokens": n, "fits": True, "kv_stored_gb": cache.stats()["kv_stored_bytes"] / 1e9}
        except Exception as e:  # noqa: BLE001 - only out-of-memory means "does not fit"; anything else is a bug
            if not is_oom(e):
                raise
            row = {"tokens": n, "fits": False, "error": str(e).splitlines()[0][:160]}
        finally:
            del cache
            free_memory(self.device)
        if self.device.type == "cuda":
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        row["seconds"] = time.perf_counter() - t0
        print(f"  N={n:>9,}: {'fits' if row['fits'] else 'out of memory'} ({row['seconds']:.1f} s)", flush=True)
        return row

    def _check_limit(self, cache) -> None:
        if self.limit_bytes is not None:
            held = sum(p.numel() * p.element_size() for p in self.engine.model.parameters())
            held += cache.stats()["kv_stored_bytes"]
            if held > self.limit_bytes:
                raise torch.OutOfMemoryError(f"out of memory: {held} bytes > --small limit {self.limit_bytes}")


def search(trial: Trial, estimate: int, resolution: float, multiple: int) -> tuple[int, list[dict]]:
    """Largest N (a multiple of `multiple`) that fits, to within `resolution`, bracketing around the estimate."""
    rows = []

    def fits(n: int) -> bool:
        rows.append(trial(n))
        return rows[-1]["fits"]

    def snap(n: float) -> int:
        return max(multiple, int(n) // multiple * multiple)

    lo, hi = snap(estimate * 0.9), snap(estimate * 1.05)
    while not fits(lo):
        hi, lo = lo, snap(lo * 0.7)
        if lo <= multiple and not fits(multiple):
            return 0, rows
    while fits(hi):
        lo, hi = hi, snap(hi * 1.3)
    while (hi - lo) / lo > resolution and hi - lo > multiple:
        mid = snap((lo + hi) / 2)
        if mid in (lo, hi):
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, rows


def git_sha() -> str:
    if os.environ.get("OLLM_GIT_SHA"):
        return os.environ["OLLM_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codecs", default="dense,int4,int2")
    p.add_argument("--small", action="store_true", help="tiny model on any device, with a pretend 8 MB limit")
    p.add_argument("--chunk", type=int, default=None, help="tokens per append (default 32768; --small 256)")
    p.add_argument("--steps", type=int, default=4, help="decode steps at the full context")
    p.add_argument("--resolution", type=float, default=0.02, help="stop bisecting at this relative gap")
    p.add_argument("--out", default=os.environ.get("OUT") or "experiments/kv_cache/results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    arch = SMALL if args.small else LLAMA3_8B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chunk = args.chunk or (256 if args.small else 32768)
    limit = 8 * 2**20 if args.small else None
    results = {"codecs": {}, "meta": {
        "command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu", "model": "tiny (--small)" if args.small else "llama3_8b (random bf16)",
        "torch": torch.__version__, "python": platform.python_version(), "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "chunk": chunk,
        "steps": args.steps, "resolution": args.resolution}}
    for name in args.codecs.split(","):
        print(f"[{name}]", flush=True)
        engine = load_engine(arch, codec=name, device=device, dtype=dtype, seed=0, fast_decode="off")
        trial = Trial(engine, device, chunk, args.steps, limit)
        probe = engine.new_cache(1, 8192)  # bytes per token of this codec, from a small real cache
        for layer in probe.layers:
            for start in range(0, 8192, chunk):
                part = trial.kv[:, :, : min(chunk, 8192 - start)]
                layer.append(part, part)
        per_token = probe.stats()["kv_stored_bytes"] / 8192
        del probe
        free_memory(device)
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else limit - weights
        estimate = free / per_token
        best, rows = search(trial, estimate, args.resolution, multiple=128)
        results["codecs"][name] = {"max_tokens": best, "bytes_per_token": per_token, "estimate_tokens": estimate,
                                   "free_gb_after_weights": free / 1e9, "weights_gb": weights / 1e9, "trials": rows}
        print(f"[{name}] longest context that fits: {best:,} tokens", flush=True)
        engine.close()
        del engine, trial
        free_memory(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_kv_capacity.json").write_text(json.dumps(results, indent=1))
    m = results["meta"]
    print("\n| codec | longest context (tokens) | KV bytes/token (all layers) | trials |\n|---|---|---|---|")
    for name, r in results["codecs"].items():
        print(f"| {name} | {r['max_tokens']:,} | {r['bytes_per_token']:,.0f} | {len(r['trials'])} |")
    print(f"\ndevice: {m['device']}; {m['model']}; torch {m['torch']}; git {m['git_sha']}; {m['date']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The system monitor's overhead: the throughput task on the embedded model with the monitor off and on (10 Hz and
100 Hz), alternated round by round in one process, plus what one sample costs and the idle power of the device.

    python scripts/bench_monitor.py                      # auto device; --rounds 6 --new-tokens 128
    python scripts/bench_monitor.py --device cpu --rounds 3 --new-tokens 32 --prompt-len 128

Prints a GitHub table (median decode tok/s of each arm over the rounds, its ratio to "off") and writes JSON with the
device, versions, git sha and date (--out, default bench_monitor.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ollm_triton.engine import load_engine
from ollm_triton.monitor import SystemMonitor
from ollm_triton.registry import registry
from ollm_triton.results import environment
from ollm_triton.tasks.base import RunContext

ASSETS = Path(__file__).resolve().parents[1] / "ollm_triton" / "assets"


def one_round(engine, decoder, device, task, rate: float | None) -> dict:
    monitor = SystemMonitor(rate, device).start() if rate else None
    ctx = RunContext(engine=engine, decoder=decoder, device=device, monitor=monitor)
    try:
        out = task.run(ctx)
    finally:
        if monitor is not None:
            monitor.stop()
    row = {"decode_tok_s": out["decode_tok_s"], "e2e_tok_s": out["e2e_tok_s"]}
    if monitor is not None:
        region = ctx.regions[-1]
        summary = monitor.summary(region.t0, region.t1, tokens=region.tokens)
        row.update(samples=summary["samples"], seconds=summary["seconds"], read_s=monitor.read_s,
                   n_total=len(monitor.samples()), energy_j=summary.get("energy_j"),
                   tokens_per_j=summary.get("tokens_per_j"), gpu=monitor.gpu)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rates", default="10,100", help="monitor rates (Hz) compared with off")
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of idle power measured first (GPU)")
    ap.add_argument("--out", default="bench_monitor.json")
    args = ap.parse_args()

    engine = load_engine(str(ASSETS / "tiny-llama"), device=args.device, dtype="auto")
    device = engine.device
    decoder = registry.build("decoder", "greedy")
    task = registry.build("task", "throughput", {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                                 "repeats": 3})
    rates = [float(r) for r in args.rates.split(",") if r]

    with SystemMonitor(10.0, device) as idle:  # idle power: the device with nothing queued, same process
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        time.sleep(args.idle_s)
        t1 = time.perf_counter()
    idle_summary = idle.summary(t0, t1)
    one_sample = []
    probe = SystemMonitor(10.0, device)
    for _ in range(200):
        a = time.perf_counter()
        probe.sample_now()
        one_sample.append(time.perf_counter() - a)

    one_round(engine, decoder, device, task, None)  # warm-up of kernels and allocator outside every arm
    arms: dict[str, list[dict]] = {"off": [], **{f"{r:g} Hz": [] for r in rates}}
    for _ in range(args.rounds):  # alternate the arms inside each round: drift (clocks, heat) hits all alike
        arms["off"].append(one_round(engine, decoder, device, task, None))
        for r in rates:
            arms[f"{r:g} Hz"].append(one_round(engine, decoder, device, task, r))

    base = statistics.median(r["decode_tok_s"] for r in arms["off"])
    table = []
    for name, rows in arms.items():
        dec = statistics.median(r["decode_tok_s"] for r in rows)
        e2e = statistics.median(r["e2e_tok_s"] for r in rows)
        spread = (min(r["decode_tok_s"] for r in rows), max(r["decode_tok_s"] for r in rows))
        tpj = [r["tokens_per_j"] for r in rows if r.get("tokens_per_j")]
        table.append({"arm": name, "decode_tok_s": dec, "decode_min": spread[0], "decode_max": spread[1],
                      "e2e_tok_s": e2e, "vs_off": dec / base,
                      "samples_per_round": statistics.median(r.get("samples", 0) for r in rows),
                      "tokens_per_j": statistics.median(tpj) if tpj else None})
    record = {
        "study": "monitor overhead",
        "command": "python scripts/bench_monitor.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "env": environment(device),
        "gpu": idle.gpu,
        "idle": idle_summary,
        "sample_cost_us": {"median": 1e6 * statistics.median(one_sample), "max": 1e6 * max(one_sample)},
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "table": table,
        "raw": arms,
    }
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    print(f"device: {record['env']['device_name']} ({device}); monitor GPU: {idle.gpu}")
    print(f"one sample: median {record['sample_cost_us']['median']:.0f} us, max {record['sample_cost_us']['max']:.0f}"
          f" us; idle power: {idle_summary.get('power_mean_w', 'n/a')} W over {args.idle_s} s")
    print()
    print("| monitor | decode tok/s (median) | min..max | e2e tok/s | vs off | samples/round | tokens/J |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        tpj = f"{r['tokens_per_j']:.3g}" if r["tokens_per_j"] else "n/a"
        print(f"| {r['arm']} | {r['decode_tok_s']:.1f} | {r['decode_min']:.1f}..{r['decode_max']:.1f} | "
              f"{r['e2e_tok_s']:.1f} | {r['vs_off']:.3f} | {r['samples_per_round']:g} | {tpj} |")


if __name__ == "__main__":
    main()

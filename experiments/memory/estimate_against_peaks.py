"""The memory check's estimate beside the measured peak of every job of a memory-study multirun (CPU, no GPU needed).

    tar xzf experiments/memory/results/2026-12-07d-h100-memory.tgz -C /tmp/mem
    python experiments/memory/estimate_against_peaks.py /tmp/mem/memory

Each job is re-estimated from its own resolved config with this tree's `check_fits` (engine/footprint.py), once with
sdpa's masks assumed and once with the run's attention backend's declared ones, beside the peak the job measured
(`device_peak_allocated_bytes`) and the estimate it recorded then (`footprint.device_bytes`).
"""

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ollm_triton.build import model_source, resolve_config, resolve_plugins
from ollm_triton.engine.footprint import check_fits
from ollm_triton.registry import registry


def main(root: Path) -> None:
    print("| job | context | plugin set | peak GB | estimate then | now, sdpa's masks assumed | now, the backend's "
          "masks | of which the last chunk's attention | now - peak |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for job in sorted((p for p in root.iterdir() if (p / "metrics.json").exists()), key=lambda p: int(p.name)):
        run = json.loads((job / "metrics.json").read_text())
        resolved = resolve_config(OmegaConf.load(job / "resolved_config.yaml"))
        plugins = resolve_plugins(resolved)
        built = {g: registry.build(g, plugins[g]["name"], plugins[g]["params"]) for g in plugins}
        source, _ = model_source(resolved["model"])
        batch, context = registry.build("task", "memory", resolved["task"]["memory"]).footprint(False)
        kw = dict(dtype=resolved["model"].get("dtype", "auto"), device=torch.device("cuda"), batch=batch,
                  context=context, codec=built["cache"], prefetch=built["prefetch"], free=(1e12, 1e12),
                  prefill_chunk=int(resolved.get("prefill_chunk") or 0))
        assumed = check_fits(source, **kw)["device_bytes"]
        now = check_fits(source, attention=built["attention"], **kw)
        peak = run["metrics"]["device_peak_allocated_bytes"]
        length = resolved["task"]["memory"]["context_len"]
        name = next(o.split("=", 1)[1] for o in run["overrides"] if o.startswith("+experiment/plugins="))
        print(f"| {job.name} | {length} | {name} | {peak / 1e9:.2f} | {run['footprint']['device_bytes'] / 1e9:.2f} "
              f"| {assumed / 1e9:.2f} | {now['device_bytes'] / 1e9:.2f} | {now['chunk_attention_bytes'] / 1e9:.2f} "
              f"| {(now['device_bytes'] - peak) / 1e9:+.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Markdown tables of the long-context quality sweeps (`bash experiments/device_run.sh quality_long ROOT`).

    python scripts/quality_long_tables.py multirun/quality_long

One table per sweep folder (attention_dense, attention_window, attention_sparse, cache_quant, cache_evict), one row per
run: the plugin and its parameters, perplexity and its change against sdpa + dense (the first run of
attention_dense, or of cache_quant when only that sweep ran), then passkey and multikey accuracy overall and at each
length the runs measured (the columns come from the metrics, so 8k / 16k / 32k appear as they were run).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ollm_triton.results import load  # noqa: E402

SWEEPS = [("attention_dense", "attention"), ("attention_window", "attention"), ("attention_sparse", "attention"),
          ("cache_quant", "cache"), ("cache_evict", "cache")]
PARAMS = {"attention": ["attention.window", "attention.sink", "attention.pattern", "attention.density",
                        "attention.block_size"],
          "cache": ["cache.ratio", "cache.residual", "cache.num_clusters"]}
RETRIEVAL = ("passkey", "multikey")


def baseline_ppl(root: Path) -> float:
    """Perplexity of sdpa + dense: the run with both baselines in the first sweep that has one (nan if none)."""
    for sub, _ in SWEEPS:
        if not (root / sub).exists():
            continue
        df = load(root / sub, include_failed=False)
        if df.empty or "perplexity/ppl" not in df:
            continue
        base = df[(df.get("attention", "sdpa") == "sdpa") & (df.get("cache", "dense") == "dense")]
        if not base.empty:
            return float(base["perplexity/ppl"].iloc[0])
    return math.nan


def length_columns(df, task: str) -> list[str]:
    cols = [c for c in df.columns if re.fullmatch(rf"{task}/acc@\d+", c)]
    return sorted(cols, key=lambda c: int(c.rsplit("@", 1)[1]))


def fmt(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(df, kind: str, base: float) -> str:
    params = [c for c in PARAMS[kind] if c in df.columns and df[c].notna().any()]
    acc_cols = [c for t in RETRIEVAL if f"{t}/acc" in df.columns for c in [f"{t}/acc", *length_columns(df, t)]]
    head = [kind, *[p.split(".", 1)[1] for p in params], "ppl", "Δ ppl vs sdpa + dense", *acc_cols, "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, r in df.iterrows():
        cells = [str(r.get(kind, "")), *[fmt(r[p], "") if str(r[p]) != "nan" else "" for p in params]]
        if r.status == "ok":
            ppl = r.get("perplexity/ppl", math.nan)
            cells += [fmt(ppl, ".3f"), fmt(100 * (ppl / base - 1), "+.2f") + "%" if base == base else "",
                      *[fmt(r.get(c), ".2f") for c in acc_cols], "ok"]
        else:
            cells += [""] * (2 + len(acc_cols)) + [f"failed: {str(r.error).splitlines()[0] if r.error else '?'}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(root: Path) -> str:
    base = baseline_ppl(root)
    out = []
    for sub, kind in SWEEPS:
        if (root / sub).exists():
            df = load(root / sub)
            body = table(df, kind, base) if not df.empty else f"(no runs under {root / sub})\n"
            out.append(f"### {sub}\n\n{body}")
    if not out:
        raise SystemExit(f"{root}: none of {', '.join(s for s, _ in SWEEPS)} is there; run experiments/device_run.sh "
                         "quality_long first")
    return "\n".join(out)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/quality_long")))

"""Tables and quality-vs-compression curves of the long-context quality sweeps (`+experiment=quality_long`, run
by `bash experiments/device_run.sh quality_long ROOT`; `notebooks/quality_long.py` plots them).

    python -m ollm_triton.quality_curves multirun/quality_long
    python -m ollm_triton.quality_curves multirun/quality_long --plot quality_vs_kept.png

One table per sweep folder (attention_dense, attention_window, attention_sparse, cache_quant, cache_evict), one row per
run: the plugin and its parameters, perplexity and its change against sdpa + dense (the first run of
attention_dense, or of cache_quant when only that sweep ran), then passkey and multikey accuracy overall and at each
length the runs measured (the columns come from the metrics, so 8k / 16k / 32k appear as they were run).

`plot` draws the quality-vs-compression curves (as kvpress publishes them): perplexity change and retrieval
accuracy against the fraction of the context's KV each run keeps or reads -- an eviction codec's ratio, a quantizer's
bits over 16 (nominal: its group scales add ~8% at int4), a window over the longest measured context, a sparse
pattern's density -- one line per method, the dense baseline at 1.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ollm_triton.results import load

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


QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}


def kept_fraction(r, kind: str, context: int) -> tuple[str, float] | None:
    """(method, fraction of the KV kept or read) of one run, or None for a run with no such axis (cluster, the
    full-attention backends other than the baseline)."""
    name = str(r.get(kind, ""))
    if kind == "cache":
        ratio = r.get("cache.ratio")
        if ratio is not None and ratio == ratio:
            return name, float(ratio)
        if name in QUANT_BITS:
            return "quantization (int8 / int4 / int2)", QUANT_BITS[name] / 16
        return ("dense", 1.0) if name == "dense" else None
    if name == "sliding_window" and context:
        sink = int(r.get("attention.sink", 0) or 0)
        return f"sliding window (sink {sink})", min(1.0, r["attention.window"] / context)
    if name == "sparse":
        return f"sparse {r.get('attention.pattern')}", float(r["attention.density"])
    return ("dense", 1.0) if name == "sdpa" else None


def curve_points(root: Path) -> tuple[list[dict], int]:
    """Every finished run of the sweeps under root as {method, kept, dppl (%), passkey, multikey}, and the longest
    retrieval context measured (the denominator of a window's fraction)."""
    base = baseline_ppl(root)
    frames = [(load(root / sub, include_failed=False), kind) for sub, kind in SWEEPS if (root / sub).exists()]
    context = max((int(c.rsplit("@", 1)[1]) for df, _ in frames for t in RETRIEVAL for c in length_columns(df, t)),
                  default=0)
    points = []
    for df, kind in frames:
        for _, r in df.iterrows():
            got = kept_fraction(r, kind, context)
            if got is None:
                continue
            ppl = r.get("perplexity/ppl", math.nan)
            points.append({"method": got[0], "kept": got[1], "dppl": 100 * (ppl / base - 1),
                           **{t: r.get(f"{t}/acc", math.nan) for t in RETRIEVAL}})
    return points, context


def plot(root: Path, out: Path | None = None):
    """The curves of the sweeps under root as a matplotlib figure, saved to out when given (PNG)."""
    import matplotlib.pyplot as plt

    root = Path(root)
    points, context = curve_points(root)
    if not points:
        raise ValueError(f"{root}: no finished run with a kept fraction to plot")
    methods = sorted({p["method"] for p in points} - {"dense"})
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, m in enumerate(methods):
        pts = sorted((p for p in points if p["method"] in (m, "dense")), key=lambda p: p["kept"])
        xs, color = [p["kept"] for p in pts], f"C{i}"
        ax_p.plot(xs, [p["dppl"] for p in pts], "o-", color=color, label=m)
        for task, style in zip(RETRIEVAL, ("o-", "s--"), strict=True):
            ax_r.plot(xs, [p[task] for p in pts], style, color=color, label=f"{m}: {task}")
    for ax in (ax_p, ax_r):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of the KV kept or read")
        ax.grid(True, alpha=0.3)
    ax_p.set_ylabel("perplexity change vs sdpa + dense (%)")
    ax_p.set_yscale("symlog", linthresh=1.0)
    ax_r.set_ylabel(f"retrieval accuracy (up to {context:,} tokens)")
    ax_r.set_ylim(-0.05, 1.05)
    ax_p.legend(fontsize=7)
    ax_r.legend(fontsize=6, ncol=2)
    fig.suptitle(f"quality vs compression: {root.name}")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def tables(root: Path) -> str:
    """The markdown tables of the sweeps under root, one section per sweep folder."""
    root = Path(root)
    base = baseline_ppl(root)
    out = []
    for sub, kind in SWEEPS:
        if (root / sub).exists():
            df = load(root / sub)
            body = table(df, kind, base) if not df.empty else f"(no runs under {root / sub})\n"
            out.append(f"### {sub}\n\n{body}")
    if not out:
        raise ValueError(f"{root}: none of {', '.join(s for s, _ in SWEEPS)} is there; run experiments/device_run.sh "
                         "quality_long first")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    import matplotlib

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("root", nargs="?", default="multirun/quality_long", type=Path)
    ap.add_argument("--plot", type=Path, default=None, help="also draw the quality-vs-compression curves to this PNG")
    args = ap.parse_args()
    try:
        print(tables(args.root))
        if args.plot:
            matplotlib.use("Agg")
            plot(args.root, args.plot)
            print(f"plot: {args.plot}")
    except ValueError as e:  # one line: the folder holds no sweep, or no run to plot
        raise SystemExit(f"error: {e}") from None

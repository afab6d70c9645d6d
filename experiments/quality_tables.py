"""Markdown tables from the quality sweeps (`bash experiments/device_run.sh quality ROOT`): one row per run.

python experiments/quality_tables.py /tmp/quality
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ollm_triton.results import load  # noqa: E402

PARAMS = {
    "attention": [
        "attention.window",
        "attention.sink",
        "attention.pattern",
        "attention.density",
        "attention.block_size",
    ],
    "cache": ["cache.ratio", "cache.residual", "cache.num_clusters"],
}


def baseline_ppl(root: Path) -> float:
    """Perplexity of the baseline plugins (sdpa + dense) from the attention_dense sweep: every Δ is against it."""
    df = load(root / "attention_dense")
    return float(df[df.attention == "sdpa"]["perplexity/ppl"].iloc[0])


def table(root: Path, kind: str, base: float) -> str:
    df = load(root)
    if df.empty:
        return f"(no runs under {root})\n"
    params = [c for c in PARAMS[kind] if c in df.columns]
    lines = [
        "| "
        + " | ".join(
            [
                kind,
                *[p.split(".")[1] for p in params],
                "ppl",
                "Δ ppl vs sdpa + dense",
                "passkey acc",
                "acc@1024",
                "acc@4096",
                "status",
            ]
        )
        + " |"
    ]
    lines.append("|" + "---|" * (len(params) + 7))
    for _, r in df.iterrows():
        ppl = r.get("perplexity/ppl")
        cells = [str(r[kind]), *[("" if str(r[p]) == "nan" else str(r[p])) for p in params]]
        if r.status == "ok":
            cells += [
                f"{ppl:.4f}",
                f"{100 * (ppl / base - 1):+.2f}%",
                f"{r['passkey/acc']:.2f}",
                f"{r.get('passkey/acc@1024', float('nan')):.2f}",
                f"{r.get('passkey/acc@4096', float('nan')):.2f}",
                "ok",
            ]
        else:
            cells += ["", "", "", "", "", f"failed: {r.error}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/quality")
    base = baseline_ppl(root)
    for sub, kind in [
        ("attention_dense", "attention"),
        ("attention_window", "attention"),
        ("attention_sparse", "attention"),
        ("cache_quant", "cache"),
        ("cache_evict", "cache"),
    ]:
        if (root / sub).exists():
            print(f"### {sub}\n")
            print(table(root / sub, kind, base))

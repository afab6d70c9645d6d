"""Greedy equivalence of the speculative strategies under lossy KV codecs: how often their tokens equal `greedy`'s
with the same codec.

    python experiments/decoding/lossy_codecs.py            # CPU, about a minute

The small random test model of tests/test_speculative.py (vocab 48, hidden 32, 2 layers, sharpened LM head), a
noisy copy as draft, 3 prompts x 64 new tokens, `quant` caches with 16-token groups so that quantisation engages
within the run (`residual` full-precision tokens kept; the shipped presets keep 128). Prints a GitHub table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402

ARCH = dict(model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
STRATEGIES = [
    ("speculative", {"num_candidates": 4}),
    ("tree", {"depth": 4, "branching": 2, "width": 3}),
    ("tree", {"depth": 4, "branching": 2, "width": 3, "compaction": "rerun"}),
    ("prompt_lookup", {"num_candidates": 4, "max_ngram": 2}),
    ("self_speculative", {"draft_layers": 1}),
]


def build(codec: dict | None, noise: float = 0.0):
    cache = registry.build("cache", "quant", codec) if codec else None
    eng = load_engine(ARCH, codec=cache, device="cpu", dtype=torch.float32, seed=1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        eng.model.lm_head.weight.mul_(40.0)
        for p in eng.model.parameters():
            if noise and p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * noise)
    return eng


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 48, (1, 9), generator=gen), torch.randint(0, 48, (1, 1), generator=gen),
               torch.tensor([[3, 9, 4, 3, 9, 4, 3, 9, 4, 3, 9]])]
    codecs = [("dense", None)] + [
        (f"int{bits} residual {res}", {"bits": bits, "group_size": 16, "residual": res})
        for bits in (8, 4, 2) for res in (0, 32)
    ]
    rows = ["| cache | " + " | ".join(n + (f" ({p['compaction']})" if "compaction" in p else "") for n, p in STRATEGIES)
            + " |", "|---|" + "---:|" * len(STRATEGIES)]
    for label, codec in codecs:
        target, draft = build(codec), build(codec, noise=0.1)
        refs = [registry.build("decoder", "greedy").generate(target, p, 64).tokens for p in prompts]
        cells = []
        for name, params in STRATEGIES:
            kwargs = {"draft_engine": draft} if name in ("speculative", "tree") else {}
            s = registry.build("decoder", name, params, **kwargs)
            outs = [s.generate(target, p, 64).tokens for p in prompts]
            same = sum(bool(torch.equal(o, r)) for o, r in zip(outs, refs, strict=True))
            cells.append(f"{same}/3")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Ablation quickstart: what do int8 / int4 / int2 KV caches cost in perplexity, and what do they save?
#
# Runs a small Hydra multirun over KV codecs on the embedded model (CPU, seconds per run), loads every run's
# `metrics.json` with `ollm_triton.results.load`, and plots perplexity against stored KV bytes. Perplexity is fed
# through the cache in chunks of 16 tokens, so every token attends over the codec's stored keys and values.
# Change `SWEEP` to ask your own question.
#
# The sweep lands under `multirun/quickstart/<date>_<time>/` (beside the repository's other sweeps when the notebook
# runs from the repository or from `notebooks/`, else under the working directory), and each figure is shown and
# saved there as PNG, next to the runs it plots.

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd

from ollm_triton.results import load, notebook_root, run_sweep

ROOT = notebook_root()  # the repository root when Jupyter runs this from notebooks/
sweep_dir = ROOT / "multirun" / "quickstart" / time.strftime("%Y-%m-%d_%H-%M-%S")
SWEEP = [
    "task=[perplexity,memory]",
    "logger=none",
    "task.perplexity.max_tokens=1024",
    "task.perplexity.max_length=512",
    "task.perplexity.stride=256",
    "task.perplexity.chunk=16",
    "task.memory.context_len=1024",
    "task.memory.new_tokens=4",
    "+cache=dense,int8,int4,int2",
]

# %%
print(run_sweep(SWEEP, sweep_dir, cwd=ROOT))  # python -m ollm_triton.run -m <SWEEP> hydra.sweep.dir=<sweep_dir>

# %%
df = load(sweep_dir).sort_values("memory/kv_ratio", ascending=False)
cols = ["cache", "status", "perplexity/ppl", "perplexity/tokens_scored", "memory/kv_ratio", "memory/kv_stored_bytes"]
df[cols]

# %%
assert len(df) == 4 and (df.status == "ok").all()
fig, ax = plt.subplots()
ax.scatter(df["memory/kv_ratio"], df["perplexity/ppl"])
for _, row in df.iterrows():
    ax.annotate(row["cache"], (row["memory/kv_ratio"], row["perplexity/ppl"]))
ax.set_xlabel("stored / original KV bytes at 1028 tokens (residual window of 128 included)")
ax.set_ylabel("perplexity (1024 held-out tokens)")
ax.set_title("KV codecs on the embedded tiny-llama (CPU)")
fig.tight_layout()
figure_path = sweep_dir / "ppl_vs_kv_bytes.png"
fig.savefig(figure_path, dpi=120)
print(f"saved {figure_path}")
plt.show()

# %% [markdown]
# The same plugins from Python, text in and text out: `OptimizedInference` (README, "From Python") composes and
# validates its arguments with the runner's schema. One prompt of a few hundred tokens through dense and int4 KV
# (a 16-token residual, so most of the prompt is stored in 4 bits): the answers and the bytes each cache held.

# %%
from ollm_triton import OptimizedInference

prompt = "def fibonacci(n):\n    " * 24
rows = []
for cache in ("dense", {"name": "int4", "residual": 16, "group_size": 16}):
    with OptimizedInference("tiny", cache=cache, device="cpu") as llm:
        answer = llm.generate(prompt, max_new_tokens=16)
        report, stats = llm.memory_report(), llm.stats()
        rows.append({"cache": llm.plugins["cache"]["name"], "kv_bytes": report["kv_bytes"],
                     "kv_tokens_compressed": report["kv_tokens_compressed"], "decode_tok_s": stats["decode_tok_s"],
                     "answer": answer[:40]})
pd.DataFrame(rows)

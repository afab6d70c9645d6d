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
# # The studies: the source document's tables, one sweep each
#
# Each study is a preset of `ollm_triton/conf/experiment/` run as one Hydra sweep on Llama-3-8B shapes
# (`python -m ollm_triton.run -m +experiment=<study>`, a GPU); `ollm_triton.results.study_table` turns its multirun
# directory into the study's table (every plugin set against the baseline of the same length; a set that did not
# fit keeps its row and says so), and this notebook plots it.
#
# - `STUDY`: `memory` | `throughput` | `context_scaling` | `energy` (environment `OLLM_STUDY`; with `STUDY_DIR`, the
#   sweep's own study).
# - `STUDY_DIR`: a finished sweep of that study, e.g. one brought back from the GPU (environment `OLLM_STUDY_DIR`).
#   Left empty, the notebook runs the study's smoke sweep (`debug=smoke`: the embedded model, tiny lengths, seconds on
#   a CPU) under `multirun/studies/`, so every cell runs anywhere; those numbers check the plumbing, they are not
#   the study.
#
# The figure is shown and saved as `<study>.png` beside the runs it plots.

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt

from ollm_triton.results import STUDIES, load, markdown_table, notebook_root, run_sweep, study_name, study_table

STUDY_DIR = os.environ.get("OLLM_STUDY_DIR", "")
# a finished sweep names its own study (its jobs' +experiment=<study>); the smoke run needs one
STUDY = os.environ.get("OLLM_STUDY") or (study_name(load(STUDY_DIR)) if STUDY_DIR else "memory")
assert STUDY in STUDIES, f"STUDY must be one of {STUDIES}, got {STUDY!r}"

ROOT = notebook_root()  # the repository root when Jupyter runs this from notebooks/

# %%
if STUDY_DIR:
    sweep_dir = Path(STUDY_DIR)
else:
    sweep_dir = ROOT / "multirun" / "studies" / f"{STUDY}_smoke_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    print(run_sweep([f"+experiment={STUDY}", "debug=smoke", "logger=none"], sweep_dir, cwd=ROOT))

# %%
table = study_table(sweep_dir, STUDY)
print(f"{table.attrs['study']} on {table.attrs['device'] or 'an unknown device'}"
      f"{' (smoke run: the embedded model, tiny lengths)' if table.attrs['smoke'] else ''}\n")
print(markdown_table(table))

# %% [markdown]
# What each figure shows: memory and context scaling draw one line per plugin set against the context length (a
# length where the set did not fit is a cross on the axis, labelled with why); throughput and energy draw one bar per
# set, each bar relative to the baseline set (1.0 = the baseline; above 1 is better: faster, more tokens per joule,
# shorter time to first token).

# %%
# (x axis, the columns plotted, one panel each); x None: one bar per set of `<column>_x_baseline`
PLOTS = {
    "memory": ("context", ["peak_gb", "kv_gb"]),
    "context_scaling": ("context", ["peak_gb", "ttft_s", "decode_tok_s"]),
    "throughput": (None, ["decode_tok_s", "ttft_s", "tokens_per_j"]),
    "energy": (None, ["tokens_per_j", "decode_tok_s"]),
}
LABELS = {"peak_gb": "peak memory (GB)", "kv_gb": "KV cache stored (GB)", "ttft_s": "time to first token (s)",
          "decode_tok_s": "decode tok/s", "tokens_per_j": "tokens per joule"}

x, columns = PLOTS[STUDY]
columns = [c for c in columns if c in table and table[c].notna().any()]  # tokens/J: only where NVML measured it
fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
for ax, column in zip(axes[0], columns, strict=True):
    if x is None:
        ratio = table[f"{column}_x_baseline"]
        ax.barh(table["set"], ratio.fillna(0))
        ax.axvline(1.0, color="k", lw=0.8)
        for i, (value, status) in enumerate(zip(ratio, table["status"], strict=True)):
            ax.annotate(f"{value:.2f}x" if value == value else status, (value if value == value else 0, i),
                        va="center", fontsize=8)
        # time to first token's ratio is baseline / this (a speed-up), the others this / baseline: both "above 1
        # is better", and the axis says which
        ax.set_xlabel("time to first token: baseline / this (above 1 is shorter)" if column == "ttft_s"
                      else f"{LABELS[column]}, x baseline")
        ax.invert_yaxis()
    else:
        for name, rows in table.groupby("set", sort=False):
            ok = rows[rows.status == "ok"]
            line, = ax.plot(ok[x], ok[column], marker="o", label=name)
            for _, row in rows[rows.status != "ok"].iterrows():  # did not fit / failed: a cross on the axis
                ax.plot([row[x]], [0], marker="x", ms=10, color=line.get_color(), clip_on=False)
                ax.annotate(row["status"], (row[x], 0), rotation=90, fontsize=7, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(LABELS[column])
        ax.legend(fontsize=7)
    ax.set_title(LABELS[column])
fig.suptitle(f"{STUDY}: {table.attrs['device'] or 'device unknown'}{' (smoke)' if table.attrs['smoke'] else ''}")
fig.tight_layout()
figure_path = sweep_dir / f"{STUDY}.png"
fig.savefig(figure_path, dpi=120)
print(f"saved {figure_path}")
plt.show()

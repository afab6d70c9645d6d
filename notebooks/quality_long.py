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
# # Quality at long context: what each codec and backend costs, against how much of the KV it keeps
#
# The `quality_long` study (`ollm_triton/conf/experiment/quality_long.yaml`): perplexity, passkey and 16-pair
# multi-key retrieval on the long-context embedded model at 8k / 16k / 32k, one sweep per plugin group, run on a GPU
# by `bash experiments/device_run.sh quality_long ROOT` (findings: `experiments/quality_long/README.md`).
# `ollm_triton.quality_curves` turns the sweeps under ROOT into one table per group and the quality-vs-compression
# curves drawn here.
#
# - `QUALITY_DIR` (environment `OLLM_QUALITY_DIR`): a finished ROOT, e.g. one brought back from the GPU.
#   Left empty, the notebook runs two smoke sweeps (`debug=smoke`: the shipped 4k model at a few hundred tokens,
#   dense / int4 and snapkv at two ratios; about 30 s on a CPU) under `multirun/quality_long/`, so every cell runs
#   anywhere; those numbers check the plumbing, they are not the study.
#
# The figure is shown and saved as `quality_vs_compression.png` in ROOT, beside the sweeps it plots.

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt

from ollm_triton.quality_curves import plot, tables
from ollm_triton.results import notebook_root, run_sweep

QUALITY_DIR = os.environ.get("OLLM_QUALITY_DIR", "")
ROOT = notebook_root()  # the repository root when Jupyter runs this from notebooks/

# %%
if QUALITY_DIR:
    quality_root = Path(QUALITY_DIR)
else:
    quality_root = ROOT / "multirun" / "quality_long" / f"smoke_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    # two of device_run.sh's five sweeps, fewer settings: perplexity through the codec's stored K/V (chunks of 16)
    sweeps = {"cache_quant": ["+cache=dense,int4"], "cache_evict": ["+cache=snapkv", "cache.ratio=0.5,0.25"]}
    for name, overrides in sweeps.items():
        common = ["+experiment=quality_long", "debug=smoke", "logger=none", "task.perplexity.chunk=16"]
        print(run_sweep([*common, *overrides], quality_root / name, cwd=ROOT)[-600:])

# %%
print(tables(quality_root))

# %% [markdown]
# Left: perplexity change against sdpa + dense (symmetric log scale), right: passkey (circles) and multikey
# (squares) accuracy, both against the fraction of the context's KV a run keeps (eviction ratio), stores (a
# quantizer's bits over 16) or reads (a window over the longest context, a sparse density). A method that keeps
# quality sits flat at the top right of both panels down to small fractions.

# %%
fig = plot(quality_root)
figure_path = quality_root / "quality_vs_compression.png"
fig.savefig(figure_path, dpi=120)
print(f"saved {figure_path}")
plt.show()

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
# # Ablation quickstart: a sweep, loaded and plotted
#
# Runs a small Hydra multirun over plugin choices on the CPU, loads every run's `metrics.json` with
# `ollm_triton.results.load`, and plots one metric per plugin choice. Change `SWEEP` to ask your own question;
# on a GPU drop `debug=smoke` and pick a larger model.

# %%
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ollm_triton.results import load

REPO = Path(os.environ.get("OLLM_REPO", Path.cwd())).resolve()
if not (REPO / "conf").exists():  # executed from notebooks/
    REPO = REPO.parent
sweep_dir = Path(tempfile.mkdtemp(prefix="ollm-sweep-"))
SWEEP = ["model=tiny_random", "task=[throughput,memory]", "debug=smoke", "logger=none", "+decoder=greedy,sample"]

# %%
cmd = [sys.executable, "-m", "ollm_triton.run", "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]
proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
print(proc.stdout[-2000:])
assert proc.returncode == 0, proc.stderr[-2000:]

# %%
df = load(sweep_dir)
cols = ["decoder", "status", "throughput/decode_tok_s", "memory/kv_stored_bytes"]
df[cols]

# %%
assert len(df) == 2 and (df.status == "ok").all()
ax = df.plot.bar(x="decoder", y="throughput/decode_tok_s", legend=False, title="decode tok/s (smoke, CPU)")
ax.set_ylabel("tok/s")
plt.tight_layout()

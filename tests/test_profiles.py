"""Profiles (`profile=memory_optimized | speed_optimized | long_context | balanced`): each sets every knob the source
document names for it, and each runs as a whole (debug=smoke, in process)."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir

from ollm_triton.run import CONF, run_job

# The source's PROFILES (optimizations.md, "Configuration Management"), in this project's names; balanced has no
# numbers there ("adaptive attention, moderate compression, standard prefetching"): ours are stated in its yaml.
SOURCE = {
    "memory_optimized": {"attention.name": "sliding_window", "cache.name": "int4", "prefetch.prefetch_distance": 1,
                         "prefetch.budget_gb": 4.0, "context.ratio": 0.6},
    "speed_optimized": {"attention.name": "sparse", "cache.name": "dense", "prefetch.prefetch_distance": 4,
                        "prefetch.budget_gb": 8.0, "decoder.name": "speculative", "decoder.num_candidates": 4,
                        "context.ratio": 0.8},
    "long_context": {"attention.name": "multiscale", "cache.name": "cluster", "cache.num_clusters": 256,
                     "prefetch.prefetch_distance": 3, "prefetch.budget_gb": 5.0, "context.ratio": 0.4,
                     "max_context": 32768},
    "balanced": {"attention.name": "adaptive", "cache.name": "int8", "prefetch.prefetch_distance": 2,
                 "prefetch.budget_gb": 6.0, "decoder.name": "adaptive", "decoder.initial_candidates": 4,
                 "context.name": "adaptive", "context.max_context": 8192},
}


RUN = ("debug=smoke", "logger=none", "task=[memory]")


@pytest.fixture(scope="module")
def composed():
    """{(profile, as run?): config}, composed once (each Hydra initialisation costs seconds here)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return {(name, run): compose(config_name="config", overrides=[f"profile={name}", *(RUN if run else ())])
                for name in SOURCE for run in (False, True)}


def test_every_profile_file_is_covered():
    files = {p.stem for p in (CONF / "profile").glob("*.yaml")} - {"none"}
    assert files == set(SOURCE)


@pytest.mark.parametrize("name", sorted(SOURCE))
def test_profile_sets_the_source_knobs(name, composed):
    cfg = composed[(name, False)]
    for key, value in SOURCE[name].items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, f"profile={name}: {key} is {node!r}, the source says {value!r}"
    # every plugin group the source names is chosen by the profile, not left to its baseline
    for group in ("attention", "cache", "prefetch", "context"):
        assert cfg.get(group) is not None, f"profile={name} leaves {group} at its baseline"


@pytest.mark.parametrize("name", sorted(SOURCE))
def test_profile_runs_as_a_whole(name, composed, tmp_path, one_torch_thread):
    cfg = composed[(name, True)]
    record = run_job(cfg, tmp_path)
    assert record["status"] == "ok" and not record["refused"]
    plugins = {g: p["name"] for g, p in record["plugins"].items()}
    for key, value in SOURCE[name].items():
        group, _, field = key.partition(".")
        if field == "name":
            assert plugins[group] == value
    m = record["metrics"]
    assert m["prefetch/accesses"] > 0  # the layers went through the lookahead policy
    kept = m["memory/kv_tokens_seen"] - 2  # the smoke run decodes 2 tokens after the (compressed) prompt
    if "context.ratio" in SOURCE[name]:
        assert m["memory/context_method"] == cfg.context.name
        assert abs(kept - SOURCE[name]["context.ratio"] * 64) <= 1 or m["memory/context_over_budget"] > 0
    else:  # the adaptive manager: 64 smoke tokens are within 8192, nothing dropped
        assert m["memory/context_method"] == "none" and kept == 64 and math.isclose(m["memory/context_ratio"], 1.0)

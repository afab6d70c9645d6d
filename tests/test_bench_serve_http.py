"""scripts/bench_serve.py's HTTP mode on the embedded model: its openai clients and its Python-API driver count the
tokens the server's scheduler generated (its own counter is the reference) and time every request."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("openai")  # test_serve's serve extra: skipped where it is not installed
from test_serve import serving  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_http_and_api_drivers_count_what_the_server_generated(bench):
    reqs = [([5 + i, 17, 300 + i, 42], n) for i, n in enumerate((3, 5, 2))]
    with serving("+decoder=greedy", "serve.max_batch=3") as (server, url):
        counts = server.scheduler.counts
        for drive in (lambda: bench.drive_http(url, server.model_name, reqs, concurrency=2),
                      lambda: bench.drive_api(server.scheduler, reqs)):
            before = counts["generated_tokens"]
            out = asyncio.run(drive())
            assert out["requests"] == 3 and out["generated"] == counts["generated_tokens"] - before > 0
            assert 0 < out["ttft_s_p50"] <= out["ttft_s_p99"] <= out["wall_s"]
            assert out["itl_s_p50"] is not None and out["e2e_tok_s"] == out["generated"] / out["wall_s"]

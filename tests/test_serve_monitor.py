"""The system monitor in the server (serve/metrics.py MonitorCollector): /metrics carries the latest GPU and process
readings, the energy since the server started and tokens per joule, from a fake NVML source with a known power and
energy trace; without NVML only the process series and the reason; monitor.enabled=false exports none of it.

/metrics is scraped through the app in-process (starlette's TestClient, no lifespan: the scheduler is stepped here).
"""

from __future__ import annotations

import threading
import time

import pytest

# the serve extra (README): a machine without it skips the module
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families
TestClient = pytest.importorskip("starlette.testclient").TestClient

import ollm_triton.build as build_module  # noqa: E402
from ollm_triton.serve.scheduler import SamplingParams  # noqa: E402
from ollm_triton.serve.server import build, compose  # noqa: E402

pytestmark = pytest.mark.timeout(120)
WATTS = 250.0


def scrape(server) -> dict[str, float]:
    """{series{labels}: value} of one /metrics scrape."""
    text = TestClient(server.app).get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def generate(server, tokens: int) -> None:
    """One greedy request through the server's scheduler, stepped in this thread."""
    req = server.scheduler.submit([5, 17, 300], tokens, SamplingParams(temperature=0.0))
    while not req.finished:
        server.scheduler.step()
    assert len(req.generated) == tokens


def monitor_threads() -> int:
    return sum(t.name == "ollm-system-monitor" for t in threading.enumerate())


def test_metrics_export_a_fake_gpu_its_energy_and_tokens_per_joule(monkeypatch):
    """A fake NVML: 250 W, an energy counter growing at 250 J/s, fixed temperature, utilization, memory, clock.
    The energy since start is 250 W times the span from the monitor's first sample to its last, and tokens per
    joule is the generated tokens over it."""
    base = time.perf_counter()
    gpu = {"gpu_util": 37.0, "gpu_mem_used": 123_456_789, "gpu_temp_c": 61.0, "sm_clock_mhz": 1410.0,
           "gpu_power_w": WATTS}
    real = build_module.SystemMonitor
    monkeypatch.setattr(build_module, "SystemMonitor", lambda rate, device: real(rate, device, gpu_sampler=lambda: {
        **gpu, "gpu_energy_j": 5000.0 + WATTS * (time.perf_counter() - base)}))
    server = build(compose(["model=tiny_random", "device=cpu", "monitor.rate_hz=50", "serve.max_context=64"]))
    try:
        assert server.monitor is not None and server.monitor.running and server.monitor.rate_hz == 50
        generate(server, 3)
        time.sleep(0.1)
        server.monitor.stop()  # frozen: the scrape and the reference read the same samples
        m = scrape(server)
        samples = server.monitor.samples()
        span = samples[-1].t - samples[0].t
        assert span > 0.1 and len(samples) >= 5
        assert m["ollm_gpu_power_watts"] == WATTS and m["ollm_gpu_temperature_celsius"] == 61.0
        assert m["ollm_gpu_utilization_percent"] == 37.0 and m["ollm_gpu_memory_used_bytes"] == 123_456_789
        assert m["ollm_gpu_sm_clock_hertz"] == 1410e6
        assert m["ollm_monitor_seconds"] == pytest.approx(span, rel=1e-9)
        assert m["ollm_gpu_energy_joules_total"] == pytest.approx(WATTS * span, rel=1e-3)
        assert m["ollm_generated_tokens_total"] == 3
        assert m["ollm_tokens_per_joule"] == pytest.approx(3 / m["ollm_gpu_energy_joules_total"], rel=1e-9)
        assert m['ollm_monitor_info{energy_source="nvml energy counter",gpu="injected sampler",rate_hz="50"}'] == 1
        assert m["ollm_process_resident_memory_bytes"] > 10**7 and m["ollm_process_cpu_percent"] >= 0
    finally:
        server.close()
    assert not server.monitor.running


def test_without_nvml_the_host_series_and_the_reason_and_an_off_switch():
    before = monitor_threads()
    server = build(compose(["model=tiny_random", "device=cpu", "serve.max_context=64"]))
    try:
        generate(server, 2)
        time.sleep(0.25)  # the second sample carries the process's CPU percent
        m = scrape(server)
        assert m['ollm_monitor_info{energy_source="none",gpu="unavailable (the run is on cpu)",rate_hz="10"}'] == 1
        assert m["ollm_process_resident_memory_bytes"] > 10**7 and "ollm_process_cpu_percent" in m
        assert m["ollm_monitor_seconds"] > 0
        assert not [k for k in m if k.startswith(("ollm_gpu_", "ollm_tokens_per_joule"))], m  # absent, not zero
    finally:
        server.close()
    assert monitor_threads() == before  # close() stopped the server's sampler

    off = build(compose(["model=tiny_random", "device=cpu", "serve.max_context=64", "monitor.enabled=false"]))
    try:
        assert off.monitor is None and monitor_threads() == before
        m = scrape(off)
        assert "ollm_requests_running" in m and not [k for k in m if k.startswith(("ollm_monitor", "ollm_process",
                                                                                  "ollm_gpu"))]
    finally:
        off.close()


@pytest.mark.gpu
def test_on_a_gpu_metrics_carry_nvml_readings():
    """The real NVML path: a server on CUDA exports the GPU's power, memory and energy since start, and tokens per
    joule is the generated tokens over that energy."""
    pytest.importorskip("pynvml")
    server = build(compose(["device=cuda", "monitor.rate_hz=50"]))
    try:
        assert not server.monitor.gpu.startswith("unavailable"), server.monitor.gpu
        generate(server, 32)
        time.sleep(0.3)
        server.monitor.stop()
        m = scrape(server)
        assert m["ollm_gpu_power_watts"] > 0 and m["ollm_gpu_memory_used_bytes"] > 0, m
        assert m["ollm_gpu_energy_joules_total"] > 0 and m["ollm_generated_tokens_total"] == 32
        assert m["ollm_tokens_per_joule"] == pytest.approx(32 / m["ollm_gpu_energy_joules_total"], rel=1e-9)
        assert m["ollm_monitor_seconds"] > 0.3
    finally:
        server.close()

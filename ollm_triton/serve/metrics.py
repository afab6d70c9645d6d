"""`GET /metrics`: the scheduler's dynamic-batching statistics and the HTTP layer's counts, in Prometheus text format.

Read from `Scheduler.stats()` at each scrape (a custom collector on the app's own registry, so two servers in one
process do not share series):

    ollm_requests_running, ollm_requests_queued                       gauges
    ollm_requests_{submitted,finished,refused,cancelled,errors,timeouts}_total, ollm_generated_tokens_total,
    ollm_prefill_tokens_total, ollm_prefix_cache_hits_total, ollm_prefix_cache_tokens_reused_total   counters
    ollm_requests_per_second, ollm_generated_tokens_per_second        over the last minute of scrapes (the first
                                                                       scrape: since the server started)
    ollm_batch_size_mean, ollm_padding_ratio                           gauges
    ollm_queue_seconds, ollm_time_to_first_token_seconds, ollm_inter_token_latency_seconds   {quantile="0.5"|"0.99"}
    ollm_kv_cache_bytes{state="in_use"|"reserved"|"prefix_cache", codec=...}
    ollm_http_requests_total{route, status}                            counter, per endpoint and status
    ollm_model_info{model, attention, cache, decoder, prefetch}         1

A statistic the scheduler adds later is exported as ollm_scheduler_<name> (a gauge) until it gets a name here.

The system monitor's latest sample and its totals since the server started (monitor.py; off with
monitor.enabled=false), where the field was read:

    ollm_gpu_power_watts, ollm_gpu_temperature_celsius, ollm_gpu_utilization_percent, ollm_gpu_memory_used_bytes,
    ollm_gpu_sm_clock_hertz, ollm_process_cpu_percent (100 = one core), ollm_process_resident_memory_bytes   gauges
    ollm_gpu_energy_joules_total                     counter: joules since the monitor's first sample
    ollm_tokens_per_joule                            gauge: generated tokens over that energy (idle time included)
    ollm_monitor_seconds                             gauge: seconds from the first sample to the latest
    ollm_monitor_info{gpu, energy_source, rate_hz}   1; gpu names the device, or `unavailable (<why>)`

Without NVML (no driver, nvidia-ml-py missing, a CPU server) the GPU series, the energy and tokens per joule are
absent, the process series are there, and ollm_monitor_info's gpu label says why.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

COUNTERS = {
    "requests_submitted": ("ollm_requests_submitted", "Requests accepted into the queue"),
    "requests_finished": ("ollm_requests_finished", "Requests that generated to their end (length or stop)"),
    "requests_refused": ("ollm_requests_refused", "Requests refused with 429: the queue was full"),
    "requests_cancelled": ("ollm_requests_cancelled", "Requests cancelled (client gone, stop string, shutdown)"),
    "requests_errors": ("ollm_requests_errors", "Requests that failed (engine error or queue timeout)"),
    "requests_timeouts": ("ollm_requests_timeouts", "Requests that waited longer than queue_timeout_s"),
    "generated_tokens": ("ollm_generated_tokens", "Tokens generated"),
    "prefill_tokens": ("ollm_prefill_tokens", "Prompt tokens prefilled (prefix-cache hits excluded)"),
    "prefix_cache_hits": ("ollm_prefix_cache_hits", "Requests whose prompt prefix came from the prefix cache"),
    "prefix_tokens_reused": ("ollm_prefix_cache_tokens_reused", "Prompt tokens taken from the prefix cache"),
}
GAUGES = {
    "running": ("ollm_requests_running", "Requests in the running batch"),
    "queued": ("ollm_requests_queued", "Requests waiting for a slot"),
    "batch_size_mean": ("ollm_batch_size_mean", "Mean rows per decode step"),
    "padding_ratio": ("ollm_padding_ratio", "Share of computed rows that were padding"),
}
QUANTILES = {
    "queue_s": ("ollm_queue_seconds", "Time from submission to joining the batch"),
    "ttft_s": ("ollm_time_to_first_token_seconds", "Time from submission to the first token"),
    "itl_s": ("ollm_inter_token_latency_seconds", "Time between consecutive tokens of a request"),
}
KV = {"kv_bytes_in_use": "in_use", "kv_bytes_reserved": "reserved", "kv_bytes_prefix_cache": "prefix_cache"}
# the scheduler's own lifetime averages: replaced by the windowed rates below
RATES = {"requests_per_s", "generated_tokens_per_s"}
RATE_WINDOW_S = 60.0


class SchedulerCollector:
    """Reads `scheduler.stats()` at each scrape."""

    def __init__(self, scheduler: Any, info: dict[str, str], codec: str):
        self.scheduler = scheduler
        self.info = info
        self.codec = codec
        self._samples: deque[tuple[float, float, float]] = deque()  # (time, finished, generated) per scrape
        self._lock = threading.Lock()

    def _rates(self, stats: dict[str, float]) -> tuple[float, float]:
        now = time.monotonic()
        finished, generated = float(stats.get("requests_finished", 0)), float(stats.get("generated_tokens", 0))
        with self._lock:
            while self._samples and now - self._samples[0][0] > RATE_WINDOW_S:
                self._samples.popleft()
            first = self._samples[0] if self._samples else None
            self._samples.append((now, finished, generated))
        if first is None or now - first[0] < 1e-3:
            return float(stats.get("requests_per_s", 0.0)), float(stats.get("generated_tokens_per_s", 0.0))
        dt = now - first[0]
        return (finished - first[1]) / dt, (generated - first[2]) / dt

    def collect(self):
        stats = self.scheduler.stats()
        info = InfoMetricFamily("ollm_model", "The served model and its plugins")
        info.add_metric([], self.info)
        yield info
        done = set(RATES)
        for key, (name, doc) in GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
                done.add(key)
        for key, (name, doc) in COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
                done.add(key)
        req_rate, tok_rate = self._rates(stats)
        yield GaugeMetricFamily("ollm_requests_per_second", "Requests finished per second (last minute)",
                                value=req_rate)
        yield GaugeMetricFamily("ollm_generated_tokens_per_second", "Tokens generated per second (last minute)",
                                value=tok_rate)
        for key, (name, doc) in QUANTILES.items():
            family = GaugeMetricFamily(name, doc + " (p50, p99 of recent requests)", labels=["quantile"])
            for q, suffix in (("0.5", "p50"), ("0.99", "p99")):
                if f"{key}_{suffix}" in stats:
                    family.add_metric([q], float(stats[f"{key}_{suffix}"]))
                    done.add(f"{key}_{suffix}")
            yield family
        kv = GaugeMetricFamily("ollm_kv_cache_bytes", "KV cache memory by state", labels=["state", "codec"])
        for key, state in KV.items():
            if key in stats:
                kv.add_metric([state, self.codec], float(stats[key]))
                done.add(key)
        yield kv
        for key, value in stats.items():
            if key not in done and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = "ollm_scheduler_" + re.sub(r"\W", "_", key)
                yield GaugeMetricFamily(name, f"Scheduler statistic {key}", value=float(value))


# Sample field -> (series, help, factor to the series' unit)
MONITOR_GAUGES = {
    "gpu_power_w": ("ollm_gpu_power_watts", "GPU power draw (NVML)", 1.0),
    "gpu_temp_c": ("ollm_gpu_temperature_celsius", "GPU temperature", 1.0),
    "gpu_util": ("ollm_gpu_utilization_percent", "GPU utilization (NVML: share of time a kernel ran)", 1.0),
    "gpu_mem_used": ("ollm_gpu_memory_used_bytes", "GPU memory used, the whole device", 1.0),
    "sm_clock_mhz": ("ollm_gpu_sm_clock_hertz", "GPU SM clock", 1e6),
    "cpu_percent": ("ollm_process_cpu_percent", "CPU of the server process (100 = one core busy)", 1.0),
    "rss_bytes": ("ollm_process_resident_memory_bytes", "Resident memory of the server process", 1.0),
}


class MonitorCollector:
    """Reads the system monitor's latest sample and its totals since start at each scrape; `generated()` is the
    tokens generated so far (tokens per joule)."""

    def __init__(self, monitor: Any, generated: Any):
        self.monitor = monitor
        self.generated = generated

    def collect(self):
        latest = self.monitor.latest()
        totals = self.monitor.since_start()
        info = InfoMetricFamily("ollm_monitor", "What the system monitor samples (gpu: the device, or why not)")
        info.add_metric([], {"gpu": str(self.monitor.gpu), "rate_hz": f"{self.monitor.rate_hz:g}",
                             "energy_source": str(totals.get("energy_source", "none"))})
        yield info
        for key, (name, doc, factor) in MONITOR_GAUGES.items():
            value = getattr(latest, key, None) if latest is not None else None
            if value is not None:  # a field this machine does not offer is absent, not zero
                yield GaugeMetricFamily(name, doc + " (latest sample)", value=float(value) * factor)
        if "seconds" in totals:
            yield GaugeMetricFamily("ollm_monitor_seconds", "Seconds from the monitor's first sample to its latest",
                                    value=float(totals["seconds"]))
        energy = totals.get("energy_j")
        if energy is not None:
            yield CounterMetricFamily("ollm_gpu_energy_joules", "GPU energy since the server started",
                                      value=float(energy))
            if energy > 0:
                yield GaugeMetricFamily("ollm_tokens_per_joule", "Tokens generated per joule of GPU energy since "
                                        "the server started (idle time included)",
                                        value=float(self.generated()) / float(energy))


def make_registry(scheduler: Any, info: dict[str, str], codec: str,
                  monitor: Any = None) -> tuple[CollectorRegistry, Counter]:
    """The app's registry: the scheduler's collector, the system monitor's (when there is one), the HTTP request
    counter."""
    registry = CollectorRegistry()
    registry.register(SchedulerCollector(scheduler, info, codec))
    if monitor is not None:
        registry.register(MonitorCollector(monitor, lambda: scheduler.stats().get("generated_tokens", 0)))
    http = Counter("ollm_http_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    return registry, http

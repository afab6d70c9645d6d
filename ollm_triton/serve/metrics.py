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


def make_registry(scheduler: Any, info: dict[str, str], codec: str) -> tuple[CollectorRegistry, Counter]:
    """The app's registry: the scheduler's collector and the HTTP request counter."""
    registry = CollectorRegistry()
    registry.register(SchedulerCollector(scheduler, info, codec))
    http = Counter("ollm_http_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    return registry, http

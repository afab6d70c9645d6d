"""The system monitor: a background thread that samples the run's GPU (NVML) and this process (psutil).

    with SystemMonitor(rate_hz=10, device=torch.device("cuda")) as mon:
        t0 = time.perf_counter(); ...work...; t1 = time.perf_counter()
    mon.summary(t0, t1, tokens=n)   # {"power_mean_w", "energy_j", "tokens_per_j", "temp_peak_c", ...}

A `Sample` holds one reading of every field, each None where it is not available: the GPU fields when NVML is absent
(no driver, no nvidia-ml-py, a CPU run), `read_bytes` where the OS hides a process's I/O counters. Why the GPU fields
are missing is a line (`gpu` in `summary`: `unavailable (NVML Shared Library Not Found)`), never an exception.

Energy: NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, Volta and newer) when the GPU has one,
read at the region's ends (interpolated between the samples around them); otherwise the trapezoid over power
(`energy_joules`). Both are reported where both exist: on Ampere-and-newer GPUs `nvmlDeviceGetPowerUsage` is a 1 s
average, so a trapezoid over it smears a short region; the instantaneous field (`NVML_FI_DEV_POWER_INSTANT`) is
read instead when the driver offers it.

This module imports nothing of the toolkit (a leaf, like timing.py): the runner, the facade and the adaptive
optimizer read its samples.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch

MAX_SAMPLES = 200_000  # ~5.5 h at 10 Hz (~40 MB); older samples are dropped first


@dataclass
class MonitorConfig:
    """The `monitor` section of a run: sampled for every job unless disabled."""

    enabled: bool = True
    rate_hz: float = 10.0  # samples per second of the background thread

    def check(self) -> None:
        if not (isinstance(self.rate_hz, (int, float)) and 0 < self.rate_hz <= 1000):
            raise ValueError(f"monitor.rate_hz={self.rate_hz!r} is not accepted; accepted: a number in (0, 1000]")


@dataclass(frozen=True)
class Sample:
    """One reading at `t` (time.perf_counter seconds). GPU: utilization %, memory used (bytes, the whole device),
    power (W), temperature (C), SM clock (MHz), the energy counter (J since the driver loaded). Process: CPU %
    (100 = one core busy, since the previous sample), resident set (bytes), bytes read from storage since the process
    started."""

    t: float
    gpu_util: float | None = None
    gpu_mem_used: int | None = None
    gpu_power_w: float | None = None
    gpu_temp_c: float | None = None
    sm_clock_mhz: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    read_bytes: int | None = None
    gpu_energy_j: float | None = None
    cpu_time_s: float | None = None  # user + system CPU seconds of the process so far (the region's CPU % is read
    # from its difference: psutil's per-sample percent counts 10 ms clock ticks, +-50 % at 50 Hz)


GpuSampler = Callable[[], dict]  # -> the GPU fields of Sample (a subset), read now


# --- energy ------------------------------------------------------------------------------------------------------

def _interp(samples: list[Sample], name: str, t: float) -> float | None:
    """`name` at time t, linear between the samples around it (held flat past the ends); None without values."""
    pts = [(s.t, getattr(s, name)) for s in samples if getattr(s, name) is not None]
    if not pts:
        return None
    times = [p[0] for p in pts]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return float(pts[0][1])
    if i == len(pts):
        return float(pts[-1][1])
    (ta, va), (tb, vb) = pts[i - 1], pts[i]
    return float(va + (vb - va) * (t - ta) / (tb - ta)) if tb > ta else float(vb)


def energy_joules(samples: Iterable[Sample], t0: float | None = None, t1: float | None = None) -> float | None:
    """Joules drawn over [t0, t1] (default: the first to the last sample): the trapezoid over `gpu_power_w`, the
    power at t0 and t1 interpolated from the samples around them. None where no sample has a power reading."""
    pts = sorted((s for s in samples if s.gpu_power_w is not None), key=lambda s: s.t)
    if not pts:
        return None
    t0 = pts[0].t if t0 is None else t0
    t1 = pts[-1].t if t1 is None else t1
    if t1 <= t0:
        return 0.0
    inner = [(s.t, s.gpu_power_w) for s in pts if t0 < s.t < t1]
    curve = [(t0, _interp(pts, "gpu_power_w", t0)), *inner, (t1, _interp(pts, "gpu_power_w", t1))]
    return sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in zip(curve, curve[1:], strict=False))


# --- the GPU through NVML ----------------------------------------------------------------------------------------

def _field_value(v) -> float:
    kind = int(v.valueType)  # nvmlValueType_t: double, uint, ulong, ulonglong, slonglong, sint
    attr = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}.get(kind, "uiVal")
    return float(getattr(v.value, attr))


def nvml_sampler(device: torch.device | None) -> tuple[GpuSampler | None, str]:
    """(a function reading the GPU of `device` through NVML, its description) or (None, why not)."""
    if device is None:
        if not torch.cuda.is_available():
            return None, "unavailable (no CUDA device)"
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"unavailable (the run is on {device.type})"
    try:
        import pynvml
    except ImportError:
        return None, "unavailable (nvidia-ml-py is not installed: pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device)
        name = pynvml.nvmlDeviceGetName(handle)
    except Exception as e:  # pynvml.NVMLError and its many subclasses: no driver, no library, no permission
        return None, f"unavailable ({e or type(e).__name__})"
    name = name.decode() if isinstance(name, bytes) else str(name)

    def optional(read: Callable[[], float]) -> Callable[[], float | None] | None:
        """`read` when it works on this GPU now (a field a GPU or driver lacks raises NotSupported), else None."""
        try:
            read()
        except Exception:
            return None
        return read

    instant = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", None)

    def power_instant() -> float:
        v = pynvml.nvmlDeviceGetFieldValues(handle, [instant])[0]
        if v.nvmlReturn != pynvml.NVML_SUCCESS:
            raise RuntimeError("instant power not offered")
        return _field_value(v) / 1e3

    power = optional(power_instant) if instant is not None else None
    power_source = "instant"
    if power is None:
        power = optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
        power_source = "nvmlDeviceGetPowerUsage (a 1 s average on Ampere and newer)"
    reads = {
        "gpu_util": optional(lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        "gpu_mem_used": optional(lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)),
        "gpu_power_w": power,
        "gpu_temp_c": optional(lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))),
        "sm_clock_mhz": optional(lambda: float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))),
        "gpu_energy_j": optional(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3),
    }
    reads = {k: f for k, f in reads.items() if f is not None}

    def sample() -> dict:
        out = {}
        for key, read in reads.items():
            try:
                out[key] = read()
            except Exception:  # a transient NVML error loses one field of one sample, not the monitor
                pass
        return out

    missing = sorted(set(("gpu_util", "gpu_mem_used", "gpu_power_w", "gpu_temp_c", "sm_clock_mhz")) - set(reads))
    note = f"; not offered: {', '.join(missing)}" if missing else ""
    power_note = f"; power: {power_source}" if "gpu_power_w" in reads else ""
    return sample, f"{name} (NVML{power_note}{note})"


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of torch's device: by UUID (NVML counts every GPU; CUDA_VISIBLE_DEVICES renumbers them for
    torch), else by the index CUDA_VISIBLE_DEVICES maps it to."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # a MIG instance or an older driver: fall back to the index
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        index = int(visible[index])
    return pynvml.nvmlDeviceGetHandleByIndex(index)


# --- this process through psutil ---------------------------------------------------------------------------------

class _ProcessReader:
    def __init__(self):
        try:
            import psutil
        except ImportError:  # a dependency of the package; without it the host fields stay None
            self.proc = None
            return
        self.proc = psutil.Process()
        self.last: tuple[float, float] | None = None  # (wall, CPU seconds) of the previous read
        try:
            self.proc.io_counters()
            self.io = True
        except Exception:  # AccessDenied, or an OS without per-process I/O counters (macOS)
            self.io = False

    def read(self) -> dict:
        if self.proc is None:
            return {}
        with self.proc.oneshot():
            times = self.proc.cpu_times()
            now, cpu = time.perf_counter(), float(times.user + times.system)
            out = {"rss_bytes": int(self.proc.memory_info().rss), "cpu_time_s": cpu}
            if self.last is not None and now > self.last[0]:  # since the previous sample (psutil's cpu_percent
                out["cpu_percent"] = 100 * (cpu - self.last[1]) / (now - self.last[0])  # reads the same counter)
            self.last = (now, cpu)
            if self.io:
                try:
                    out["read_bytes"] = int(self.proc.io_counters().read_bytes)
                except Exception:
                    pass
        return out


# --- the monitor -------------------------------------------------------------------------------------------------

class SystemMonitor:
    """Samples the GPU of `device` (None: the current CUDA device, if any) and this process `rate_hz` times a
    second on a daemon thread. `gpu_sampler` replaces NVML (tests drive a known power trace through it); `gpu` then
    describes it as "injected"."""

    def __init__(self, rate_hz: float = 10.0, device: torch.device | None = None, *,
                 gpu_sampler: GpuSampler | None = None, max_samples: int = MAX_SAMPLES):
        if not (isinstance(rate_hz, (int, float)) and rate_hz > 0):
            raise ValueError(f"rate_hz must be a number > 0, got {rate_hz!r}")
        self.rate_hz = float(rate_hz)
        self.device = device
        if gpu_sampler is not None:
            self._gpu, self.gpu = gpu_sampler, "injected sampler"
        else:
            self._gpu, self.gpu = nvml_sampler(device)
        self._host = _ProcessReader()
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.read_s = 0.0  # seconds the sampling itself took (the monitor's own overhead)
        # since the first sample, kept apart from the bounded deque (a server runs for days): the running trapezoid
        # over power, and the first and newest (t, J) of the energy counter
        self._first: Sample | None = None
        self._powered: tuple[float, float] | None = None  # (t, W) of the newest sample with a power reading
        self._trapezoid_j = 0.0
        self._counter: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def gpu_available(self) -> bool:
        return self._gpu is not None

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample_now(self) -> Sample:
        """Take one sample now (also from other threads: a task's region ends sample, so a region shorter than
        the period still has readings at both ends)."""
        t0 = time.perf_counter()
        values = self._gpu() if self._gpu is not None else {}  # stamped at t0: the GPU's reading is the one that
        values.update(self._host.read())  # energy integrates; the host's follows within ~0.1 ms
        s = Sample(t=t0, **values)
        with self._lock:
            self._samples.append(s)
            self._accumulate(s)
            self.read_s += time.perf_counter() - t0
        return s

    def _accumulate(self, s: Sample) -> None:
        """Add `s` to the totals since the first sample (under the lock). A sample stamped before the newest one
        (another thread's sample_now took the lock later) adds no span: the trapezoid never runs backwards."""
        if self._first is None:
            self._first = s
        if s.gpu_power_w is not None:
            last = self._powered
            if last is None or s.t > last[0]:
                if last is not None:
                    self._trapezoid_j += (s.t - last[0]) * (last[1] + s.gpu_power_w) / 2
                self._powered = (s.t, s.gpu_power_w)
        if s.gpu_energy_j is not None:
            first = self._counter[0] if self._counter is not None else (s.t, s.gpu_energy_j)
            if self._counter is None or s.t > self._counter[1][0]:
                self._counter = (first, (s.t, s.gpu_energy_j))

    def _loop(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.perf_counter()
        while not self._stop.is_set():
            self.sample_now()
            next_t += period
            delay = next_t - time.perf_counter()
            if delay < 0:  # fell behind (a loaded host): skip the missed ticks instead of sampling in a burst
                next_t, delay = time.perf_counter(), 0.0
            self._stop.wait(delay)

    def start(self) -> SystemMonitor:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ollm-system-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)
            self.sample_now()  # the last reading, so a region that ends now has one after it

    def __enter__(self) -> SystemMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ---- reading ------------------------------------------------------------------------------------------------
    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def since_start(self) -> dict[str, float | str]:
        """The totals from the first sample to the newest, however many samples the deque has dropped: seconds;
        energy_j and energy_source (the NVML energy counter's difference where the GPU has one, else the trapezoid
        over power; both absent without a GPU reading). Empty before the first sample."""
        with self._lock:
            first, latest = self._first, (self._samples[-1] if self._samples else None)
            powered, trapezoid, counter = self._powered, self._trapezoid_j, self._counter
        if first is None or latest is None:
            return {}
        out: dict[str, float | str] = {"seconds": latest.t - first.t}
        if counter is not None:
            out["energy_j"], out["energy_source"] = counter[1][1] - counter[0][1], "nvml energy counter"
        elif powered is not None:
            out["energy_j"], out["energy_source"] = trapezoid, "trapezoid over power"
        return out

    def samples(self, t0: float | None = None, t1: float | None = None) -> list[Sample]:
        """The samples with t0 <= t <= t1 (either end open when None), oldest first."""
        with self._lock:
            out = list(self._samples)
        return [s for s in out if (t0 is None or s.t >= t0) and (t1 is None or s.t <= t1)]

    def summary(self, t0: float, t1: float, tokens: int | None = None) -> dict[str, float | str]:
        """What the region [t0, t1] drew and used: `summarize` over this monitor's samples."""
        return summarize(self.samples(), t0, t1, tokens=tokens, gpu=self.gpu)


def summarize(samples: list[Sample], t0: float, t1: float, tokens: int | None = None,
              gpu: str = "") -> dict[str, float | str]:
    """What the region [t0, t1] drew and used (keys without a prefix; the runner writes them as monitor/...).

    seconds, samples; energy_j (and energy_source; energy_j_trapezoid beside a counter's), tokens_per_j (when
    `tokens` is given and energy is known); power_mean_w / power_peak_w, temp_peak_c, gpu_util_mean,
    gpu_mem_peak_bytes, sm_clock_mean_mhz; cpu_percent_mean, rss_peak_bytes, read_bytes (read in the region);
    gpu: what was sampled (the GPU's name, or `unavailable (<why>)`). A field no sample holds is left out.
    """
    everything = sorted(samples, key=lambda s: s.t)
    inside = [s for s in everything if t0 <= s.t <= t1]
    out: dict[str, float | str] = {"gpu": gpu, "seconds": t1 - t0, "samples": len(inside)}

    def values(name: str) -> list[float]:
        return [getattr(s, name) for s in inside if getattr(s, name) is not None]

    def mean(name: str) -> float | None:
        """Time-weighted over the region (the trapezoid of the interpolated curve divided by its length)."""
        if not any(getattr(s, name) is not None for s in everything):
            return None
        if t1 <= t0:
            return _interp(everything, name, t0)
        pts = [(s.t, getattr(s, name)) for s in inside if getattr(s, name) is not None]
        curve = [(t0, _interp(everything, name, t0)), *pts, (t1, _interp(everything, name, t1))]
        area = sum((tb - ta) * (a + b) / 2 for (ta, a), (tb, b) in zip(curve, curve[1:], strict=False))
        return area / (t1 - t0)

    def peak(name: str) -> float | None:
        vals = values(name) + [v for v in (_interp(everything, name, t0), _interp(everything, name, t1))
                               if v is not None]
        return max(vals) if vals else None

    trapezoid = energy_joules(everything, t0, t1)
    counter = None
    e0, e1 = _interp(everything, "gpu_energy_j", t0), _interp(everything, "gpu_energy_j", t1)
    if e0 is not None and e1 is not None:
        counter = e1 - e0
    energy = counter if counter is not None else trapezoid
    if tokens is not None:
        out["tokens"] = int(tokens)
    if energy is not None:
        out["energy_j"] = energy
        out["energy_source"] = "nvml energy counter" if counter is not None else "trapezoid over power"
        if counter is not None and trapezoid is not None:
            out["energy_j_trapezoid"] = trapezoid
        if tokens is not None and energy > 0:
            out["tokens_per_j"] = tokens / energy
    stats = {
        "power_mean_w": mean("gpu_power_w"),
        "power_peak_w": peak("gpu_power_w"),
        "temp_peak_c": peak("gpu_temp_c"),
        "gpu_util_mean": mean("gpu_util"),
        "gpu_mem_peak_bytes": peak("gpu_mem_used"),
        "sm_clock_mean_mhz": mean("sm_clock_mhz"),
        "rss_peak_bytes": peak("rss_bytes"),
    }
    c0, c1 = _interp(everything, "cpu_time_s", t0), _interp(everything, "cpu_time_s", t1)
    if c0 is not None and c1 is not None and t1 > t0:
        stats["cpu_percent_mean"] = 100 * (c1 - c0) / (t1 - t0)
    r0, r1 = _interp(everything, "read_bytes", t0), _interp(everything, "read_bytes", t1)
    if r0 is not None and r1 is not None:
        stats["read_bytes"] = r1 - r0
    for key, value in stats.items():
        if value is not None:
            out[key] = int(value) if key.endswith("_bytes") else float(value)
    return out


SUMMED = ("seconds", "samples", "energy_j", "energy_j_trapezoid", "tokens", "read_bytes")


def merge_summaries(parts: list[dict[str, float | str]]) -> dict[str, float | str]:
    """One summary of several regions' (`SystemMonitor.summary`): seconds, samples, energy, tokens and bytes read
    summed; peaks the largest; means weighted by each region's seconds; tokens_per_j: the tokens over the energy of
    the regions that counted tokens; text fields (gpu, energy_source, ...) their distinct values joined by '; '."""
    out: dict[str, float | str] = {}
    keys = list(dict.fromkeys(k for p in parts for k in p))
    for key in keys:
        have = [p for p in parts if key in p]
        values = [p[key] for p in have]
        if any(isinstance(v, str) for v in values):
            out[key] = "; ".join(dict.fromkeys(str(v) for v in values))
        elif key in SUMMED:
            out[key] = sum(values)
        elif "_peak" in key:
            out[key] = max(values)
        elif "_mean" in key:
            weights = [float(p.get("seconds", 0.0)) for p in have]
            total = sum(weights)
            out[key] = sum(w * v for w, v in zip(weights, values, strict=True)) / total if total > 0 else \
                sum(values) / len(values)
    counted = [p for p in parts if p.get("tokens") and "energy_j" in p]  # a region without tokens (idle) is not
    spent = sum(float(p["energy_j"]) for p in counted)  # in tokens per joule: its energy bought no tokens
    if counted and spent > 0:
        out["tokens_per_j"] = sum(int(p["tokens"]) for p in counted) / spent
    for key in out:
        if key.endswith("_bytes") or key in ("samples", "tokens"):
            out[key] = int(out[key])
    return out


def wandb_series(run, samples: list[Sample], origin: float) -> int:
    """Log every sample to a W&B run as monitor/<field> against monitor/t_s (seconds since `origin`); returns how
    many were logged. `run` is a wandb Run (anything with define_metric and log)."""
    run.define_metric("monitor/t_s")
    run.define_metric("monitor/*", step_metric="monitor/t_s")
    names = [f.name for f in fields(Sample) if f.name != "t"]
    for s in samples:
        row = {f"monitor/{n}": getattr(s, n) for n in names if getattr(s, n) is not None}
        row["monitor/t_s"] = s.t - origin
        run.log(row)
    return len(samples)


__all__ = ["MonitorConfig", "Sample", "SystemMonitor", "energy_joules", "merge_summaries", "nvml_sampler",
           "summarize", "wandb_series"]

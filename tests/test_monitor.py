"""The system monitor (ollm_triton/monitor.py): energy is the integral of power over the timed region, tokens per
joule follow from it, the host path records this process on a machine without NVML and says why the GPU fields are
missing, and the runner writes monitor/... summaries over each task's timed region."""

import io
import math
import time

import pytest
import torch

from ollm_triton.monitor import (
    Sample,
    SystemMonitor,
    energy_joules,
    merge_summaries,
    nvml_sampler,
    summarize,
    wandb_series,
)


def trace(times, power, energy=None):
    return [Sample(t=t, gpu_power_w=power(t), gpu_energy_j=None if energy is None else energy(t)) for t in times]


def test_energy_is_the_integral_of_a_known_power_trace():
    # linear power between irregular samples: the trapezoid (with the ends interpolated) is exact
    times = [0.0, 0.07, 0.31, 0.32, 0.9, 1.43, 2.0]
    samples = trace(times, lambda t: 200 + 40 * t)
    exact = lambda a, b: 200 * (b - a) + 20 * (b * b - a * a)  # noqa: E731
    assert energy_joules(samples) == pytest.approx(exact(0.0, 2.0), rel=1e-12)
    assert energy_joules(samples, 0.1, 1.5) == pytest.approx(exact(0.1, 1.5), rel=1e-12)  # ends between samples
    assert energy_joules(samples, 0.5, 0.6) == pytest.approx(exact(0.5, 0.6), rel=1e-12)  # no sample inside
    # a curved trace sampled at 100 Hz: within the trapezoid's error
    dense = trace([i / 100 for i in range(301)], lambda t: 300 + 100 * math.sin(t))
    assert energy_joules(dense, 0.25, 2.75) == pytest.approx(300 * 2.5 + 100 * (math.cos(0.25) - math.cos(2.75)),
                                                             rel=1e-4)
    assert energy_joules([Sample(t=0.0), Sample(t=1.0)]) is None  # no power readings: unknown, not zero


def test_summary_tokens_per_joule_and_the_energy_counter():
    times = [i * 0.1 for i in range(21)]
    power = lambda t: 150.0 + 100.0 * (t > 1.0)  # noqa: E731  a step at 1 s
    samples = [Sample(t=t, gpu_power_w=power(t), gpu_temp_c=60 + t, cpu_time_s=0.5 * t, rss_bytes=int(1e9 + t * 1e8))
               for t in times]
    s = summarize(samples, 0.25, 0.75, tokens=500, gpu="fake")
    assert s["energy_j"] == pytest.approx(150 * 0.5) and s["energy_source"] == "trapezoid over power"
    assert s["tokens_per_j"] == pytest.approx(500 / 75)
    assert s["power_mean_w"] == pytest.approx(150) and s["power_peak_w"] == pytest.approx(150)
    assert s["temp_peak_c"] == pytest.approx(60.75)
    assert s["cpu_percent_mean"] == pytest.approx(50)  # half a core, from the CPU-time counter
    assert s["rss_peak_bytes"] == int(1e9 + 0.75e8)
    # the NVML energy counter, where present, is what energy_j reports; the trapezoid stands beside it
    counted = [Sample(t=t, gpu_power_w=999.0, gpu_energy_j=5000 + 200 * t) for t in times]
    s = summarize(counted, 0.33, 1.58, tokens=10)
    assert s["energy_j"] == pytest.approx(200 * 1.25) and s["energy_source"] == "nvml energy counter"
    assert s["energy_j_trapezoid"] == pytest.approx(999 * 1.25)
    assert s["tokens_per_j"] == pytest.approx(10 / 250)


def test_merged_regions_sum_energy_and_tokens():
    a = {"gpu": "g", "seconds": 1.0, "energy_j": 100.0, "tokens": 50, "power_mean_w": 100.0, "power_peak_w": 120.0}
    b = {"gpu": "g", "seconds": 3.0, "energy_j": 900.0, "tokens": 150, "power_mean_w": 300.0, "power_peak_w": 310.0}
    m = merge_summaries([a, b])
    assert m["energy_j"] == 1000 and m["tokens"] == 200 and m["tokens_per_j"] == pytest.approx(0.2)
    assert m["power_mean_w"] == pytest.approx(250) and m["power_peak_w"] == 310 and m["gpu"] == "g"
    idle = {"gpu": "g", "seconds": 10.0, "energy_j": 700.0, "tokens": 0, "power_mean_w": 70.0}  # not in tokens/J
    m = merge_summaries([idle, a, b])
    assert m["energy_j"] == 1700 and m["tokens_per_j"] == pytest.approx(0.2)


def test_the_thread_samples_an_injected_gpu_at_its_rate():
    """A fake NVML: constant 250 W and an energy counter that grows at 250 J/s. Whatever the thread's timing on a
    loaded host, the region's energy is 250 W times its length, by the counter and by the trapezoid."""
    base = time.perf_counter()
    fake = lambda: {"gpu_power_w": 250.0, "gpu_energy_j": 250.0 * (time.perf_counter() - base)}  # noqa: E731
    with SystemMonitor(rate_hz=50, gpu_sampler=fake) as mon:
        time.sleep(0.05)
        t0 = time.perf_counter()
        time.sleep(0.3)
        t1 = time.perf_counter()
        time.sleep(0.05)
    assert not mon.running
    s = mon.summary(t0, t1, tokens=60)
    assert 5 <= s["samples"] <= 25, s  # ~15 at 50 Hz; a loaded host may skip ticks, never bursts
    assert s["energy_j"] == pytest.approx(250 * (t1 - t0), rel=1e-3)
    assert s["energy_j_trapezoid"] == pytest.approx(250 * (t1 - t0), rel=1e-9)
    assert s["tokens_per_j"] == pytest.approx(60 / s["energy_j"])
    assert mon.latest().t >= t1 and mon.samples(t0, t1) and all(t0 <= x.t <= t1 for x in mon.samples(t0, t1))


def test_energy_since_start_outlives_the_dropped_samples():
    """A fake GPU without an energy counter whose power rises linearly (100 W + 400 W/s): since_start's running
    trapezoid is the exact integral over [first sample, latest sample], though the deque kept only 4 samples."""
    base = time.perf_counter()
    power = lambda t: 100.0 + 400.0 * (t - base)  # noqa: E731
    with SystemMonitor(rate_hz=100, gpu_sampler=lambda: {"gpu_power_w": power(time.perf_counter())},
                       max_samples=4) as mon:
        time.sleep(0.3)
    total = mon.since_start()
    t1 = mon.latest().t
    t0 = t1 - total["seconds"]
    exact = 100.0 * (t1 - t0) + 200.0 * ((t1 - base) ** 2 - (t0 - base) ** 2)
    assert total["seconds"] > 0.25 and len(mon.samples()) == 4
    assert total["energy_source"] == "trapezoid over power"
    assert total["energy_j"] == pytest.approx(exact, rel=1e-3)
    assert mon.summary(mon.samples()[0].t, t1)["energy_j"] < total["energy_j"] / 5  # what the deque still holds
    assert SystemMonitor(rate_hz=1, device=torch.device("cpu")).since_start() == {}  # no sample yet


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-NVML path; a GPU machine samples its GPU")
def test_host_metrics_without_nvml_and_the_reason():
    for device in (None, torch.device("cpu"), torch.device("cuda")):
        sampler, why = nvml_sampler(device)
        assert sampler is None and why.startswith("unavailable (") and why.endswith(")"), why
    with SystemMonitor(rate_hz=100, device=torch.device("cpu")) as mon:
        t0 = time.perf_counter()
        x = torch.randn(128, 128)
        while time.perf_counter() - t0 < 0.2:  # busy for 0.2 s: some CPU time on the process's counter
            x = torch.tanh(x @ x)
        t1 = time.perf_counter()
    assert mon.gpu == "unavailable (the run is on cpu)"
    s = mon.summary(t0, t1, tokens=7)
    assert s["rss_peak_bytes"] > 10**7 and s["cpu_percent_mean"] > 0 and s["tokens"] == 7
    assert not any(k.startswith(("energy", "power", "temp", "gpu_")) for k in s), s  # nothing GPU, nothing invented
    assert all(x.gpu_power_w is None and x.rss_bytes > 0 for x in mon.samples())


def test_wandb_gets_the_time_series():
    class Run:
        def __init__(self):
            self.rows, self.metrics = [], []

        def define_metric(self, name, step_metric=None):
            self.metrics.append((name, step_metric))

        def log(self, row):
            self.rows.append(row)

    run = Run()
    samples = [Sample(t=10.0 + i, gpu_power_w=100.0 + i, rss_bytes=5) for i in range(3)]
    assert wandb_series(run, samples, origin=10.0) == 3
    assert [r["monitor/t_s"] for r in run.rows] == [0.0, 1.0, 2.0]
    assert [r["monitor/gpu_power_w"] for r in run.rows] == [100.0, 101.0, 102.0]
    assert "monitor/gpu_util" not in run.rows[0]  # absent fields are not logged as zeros
    assert ("monitor/*", "monitor/t_s") in run.metrics


def test_runner_writes_monitor_summaries_over_the_timed_region(monkeypatch, tmp_path):
    """run_job with a fake 100 W GPU: monitor/throughput/energy_j is 100 W times the task's timed region, the
    region holds the tokens the task generated, and the job's record says what was sampled."""
    from hydra import compose, initialize_config_dir

    import ollm_triton.build as build
    import ollm_triton.run as run

    real = build.SystemMonitor  # the one build sequence starts the monitor (build.py)
    monkeypatch.setattr(build, "SystemMonitor", lambda rate, device: real(rate, device, gpu_sampler=lambda: {
        "gpu_power_w": 100.0}))
    with initialize_config_dir(config_dir=str(run.CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny_random", "task=throughput", "debug=smoke",
                                                        "logger=none", "device=cpu", "monitor.rate_hz=20"])
    seen = []
    m = run.run_job(cfg, tmp_path, on_samples=lambda samples, origin: seen.append(len(samples)))["metrics"]
    assert m["monitor/gpu"] == "injected sampler" and m["monitor/rate_hz"] == 20
    seconds = m["monitor/throughput/seconds"]
    assert m["monitor/throughput/energy_j"] == pytest.approx(100 * seconds, rel=1e-9)
    assert m["monitor/throughput/tokens"] == m["throughput/new_tokens"] * m["throughput/batch"]
    assert m["monitor/throughput/tokens_per_j"] == pytest.approx(m["monitor/throughput/tokens"] / (100 * seconds))
    assert m["monitor/throughput/region"] == "timed" and m["monitor/throughput/tokens_counted"] == "generated"
    # the timed region is the decode repeats: no longer than the job, no shorter than the timed run itself
    assert m["throughput/decode_s"] <= seconds < m["monitor/job_seconds"]
    assert m["monitor/energy_j"] == pytest.approx(m["monitor/throughput/energy_j"])
    assert seen and seen[0] >= 2


# --- progress bars (ollm_triton/progress.py) ----------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_quiet_off_a_terminal_and_draws_on_one(monkeypatch):
    from ollm_triton.progress import progress

    monkeypatch.delenv("OLLM_PROGRESS", raising=False)
    log = io.StringIO()  # CI, `> log 2>&1`
    assert list(progress(range(5), desc="quiet", file=log)) == [0, 1, 2, 3, 4]
    with progress(total=3, desc="quiet", file=log) as bar:
        bar.update(3)
        bar.set_postfix(loss=1.0)
    assert log.getvalue() == ""
    tty = Terminal()
    assert list(progress(range(5), desc="drawn", file=tty)) == [0, 1, 2, 3, 4]
    assert "drawn" in tty.getvalue() and "0/5" in tty.getvalue()  # a finished bar is cleared (leave=False)
    monkeypatch.setenv("OLLM_PROGRESS", "0")  # forced off even on a terminal
    tty = Terminal()
    list(progress(range(3), desc="off", file=tty))
    assert tty.getvalue() == ""
    monkeypatch.setenv("OLLM_PROGRESS", "1")  # forced on in a log
    list(progress(range(3), desc="on", file=log))
    assert "0/3" in log.getvalue()


def test_perplexity_counts_its_windows_on_the_bar(monkeypatch, capsys):
    from ollm_triton.engine import load_engine
    from ollm_triton.tasks.perplexity import score

    arch = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "max_position_embeddings": 128}
    engine = load_engine(arch, device="cpu")
    ids = torch.arange(41) % 64
    monkeypatch.setenv("OLLM_PROGRESS", "1")
    out = score(engine, ids, max_length=16, stride=8, chunk=16)
    assert out.windows == 5  # windows start at 0, 8, 16, 24, 32: the last one reaches token 41
    assert "0/5" in capsys.readouterr().err  # the bar's total is the windows score() runs
    monkeypatch.delenv("OLLM_PROGRESS")  # stderr captured by pytest is not a terminal: quiet
    score(engine, ids, max_length=16, stride=8, chunk=16)
    assert capsys.readouterr().err == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvml_reads_the_gpu_that_works():
    pytest.importorskip("pynvml")
    device = torch.device("cuda")
    with SystemMonitor(rate_hz=50, device=device) as mon:
        x = torch.randn(4096, 4096, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:  # long enough for NVML's 1 s power average to see the load
            x = torch.tanh(x @ x)
            torch.cuda.synchronize()
        t1 = time.perf_counter()
    assert not mon.gpu.startswith("unavailable"), mon.gpu
    s = mon.summary(t0, t1, tokens=100)
    assert s["power_mean_w"] > 20 and s["energy_j"] > 20 * (t1 - t0) * 0.5, s
    assert s["tokens_per_j"] == pytest.approx(100 / s["energy_j"])
    assert s["gpu_util_mean"] > 20 and s["temp_peak_c"] > 0 and s["gpu_mem_peak_bytes"] > 64 * 2**20
    if "energy_j_trapezoid" in s:  # the counter and the trapezoid over power agree within NVML's averaging
        assert s["energy_j_trapezoid"] == pytest.approx(s["energy_j"], rel=0.35)

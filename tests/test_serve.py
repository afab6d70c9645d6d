"""The OpenAI-compatible server (python -m ollm_triton.serve) on the embedded model, driven by the real `openai`
client over loopback: completion, chat, streaming, stop strings, cancellation mid-stream, concurrent requests equal
to their one-at-a-time greedy outputs, a codec and a windowed backend through the server, the chat prefix cache on
turn 2, every bad input, an engine failure that fails alone, a bounded load test, and SIGTERM.

Servers run uvicorn in a thread of this process (a socket bound to port 0 on 127.0.0.1); the SIGTERM test starts
`python -m ollm_triton.serve` as a subprocess. References are greedy generations on a separate engine
(`registry.build("decoder", "greedy").generate`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

# the serve extra (README): a machine without it (the GPU box, unless its wheels are carried) skips the module
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.run import ASSETS, RunError  # noqa: E402
from ollm_triton.serve.chat import load_chat_template  # noqa: E402
from ollm_triton.serve.server import build, compose  # noqa: E402

pytestmark = pytest.mark.timeout(120)
MODEL = ASSETS / "tiny-llama"
PROMPTS = [
    "def add(a, b):\n",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(10):\n    print(i",
    "# Return the number of lines in a file.\ndef count_lines(path):\n    with open(path) as f:\n",
    "x = {",
    "    raise ValueError(",
    "if __name__ == '__main__':\n    main()\n\n\ndef main():\n    parser = argparse.ArgumentParser(description=",
]


@contextmanager
def serving(*overrides: str, fault=None):
    """A server of `overrides` on a free loopback port: yields (Server, base_url). `fault(engine)` may patch the
    engine before the server starts."""
    server = build(compose(["serve.port=0", "serve.log_level=warning", *overrides]))
    if fault is not None:
        fault(server.engine)
    sock = server.bind()
    uv = server.uvicorn_server()
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
        server.close()  # the model and the monitor's sampling thread
        assert not thread.is_alive(), "the server did not shut down"


def client(base_url: str, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = server.scheduler.stats()
        if stats["running"] == 0 and stats["queued"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the scheduler did not return to idle: {stats}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def main_server():
    with serving() as s:
        yield s


@pytest.fixture(scope="module")
def api(main_server):
    return client(main_server[1])


class Reference:
    """Greedy generations on a separate engine (one request at a time)."""

    def __init__(self, **plugins):
        self.engine = load_engine(str(MODEL), **plugins)
        self.tok = self.engine.tokenizer
        self.greedy = registry.build("decoder", "greedy")
        self.template = load_chat_template(MODEL)

    def tokens(self, ids: list[int], n: int) -> list[int]:
        out = self.greedy.generate(self.engine, torch.tensor([ids]), n, eos_id=self.tok.eos_token_id)
        return [t for t in out.tokens[0].tolist() if t not in self.tok.eos_token_ids]

    def text(self, prompt: str, n: int) -> str:
        return self.tok.decode(self.tokens(self.tok.encode(prompt), n), skip_special_tokens=True)

    def chat(self, messages: list[dict], n: int) -> str:
        return self.tok.decode(self.tokens(self.template.encode(self.tok, messages), n), skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref():
    r = Reference()
    yield r
    r.engine.close()


# ---- the happy paths ------------------------------------------------------------------------------------------------
def test_models_health_and_completion(main_server, api, ref):
    server, base = main_server
    assert [m.id for m in api.models.list().data] == ["tiny"]
    health = httpx.get(base.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["cache"] == "dense"
    r = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == ref.text(PROMPTS[0], 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(ref.tok.encode(PROMPTS[0]))
    # token ids as the prompt: the same answer
    ids = api.completions.create(model="tiny", prompt=ref.tok.encode(PROMPTS[0]), max_tokens=12, temperature=0)
    assert ids.choices[0].text == r.choices[0].text


def test_chat_uses_the_template(api, ref):
    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def fib(n):"}]
    r = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.chat(messages, 10)
    assert r.usage.prompt_tokens == len(ref.template.encode(ref.tok, messages))


def test_streaming_equals_the_whole_answer(main_server, api, ref):
    want = ref.text(PROMPTS[2], 16)
    chunks = list(api.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16  # the usage chunk closes the stream
    chat = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "import os"}],
                                            max_tokens=8, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == \
        ref.chat([{"role": "user", "content": "import os"}], 8)
    # the wire format: OpenAI's chunks as server-sent events, then data: [DONE]
    with httpx.stream("POST", main_server[1] + "/completions", json={"model": "tiny", "prompt": "x = ",
                                                                      "max_tokens": 3, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_stop_strings(api, ref):
    full = ref.text(PROMPTS[4], 24)
    stop = full.strip()[len(full.strip()) // 2:][:3]  # a piece from the middle of the greedy answer
    assert stop and stop in full
    want = full[:full.index(stop)]
    r = api.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=[stop, "@@@@"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = list(api.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=stop,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_and_seeded_sampling(api):
    r = api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-5)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # greedy: the chosen is the top
    c = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=3)
    assert len(c.choices[0].logprobs.content) == 3 and len(c.choices[0].logprobs.content[0].top_logprobs) == 3
    a, b, other = (api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=s)
                   .choices[0].text for s in (7, 7, 8))
    assert a == b and a != other


def test_cancel_mid_stream_frees_the_slot(main_server, api):
    server, _ = main_server
    before = server.scheduler.stats()["requests_cancelled"]
    stream = api.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=3000, temperature=0, stream=True)
    got = [next(stream) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in got)
    assert server.scheduler.stats()["running"] == 1
    stream.close()  # the client goes away mid-answer
    stats = wait_idle(server, 10)
    assert stats["requests_cancelled"] == before + 1 and stats["kv_bytes_in_use"] == 0
    (req,) = [r for r in list(server.app.state.requests.values())[-1:]]
    assert req.events[-1].finish_reason == "cancelled" and len(req.generated) < 3000


def test_concurrent_requests_equal_their_one_at_a_time_outputs(main_server, api, ref):
    lengths = [5, 17, 9, 30, 3, 22, 12, 26]
    want = [ref.text(p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    start = threading.Barrier(len(PROMPTS))

    def one(i):
        start.wait()
        return api.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    assert [r.choices[0].text for r in got] == want
    assert main_server[0].scheduler.stats()["batch_size_mean"] > 1  # they really ran together


def test_chat_prefix_cache_on_turn_two(api):
    turn1 = [{"role": "user", "content": "def area(r):"}]
    a = api.chat.completions.create(model="tiny", messages=turn1, max_tokens=12, temperature=0)
    turn2 = [*turn1, {"role": "assistant", "content": a.choices[0].message.content},
             {"role": "user", "content": "def perimeter(r):"}]
    raw = api.chat.completions.with_raw_response.create(model="tiny", messages=turn2, max_tokens=4, temperature=0)
    b = raw.parse()
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens - 1, (cached, a.usage)  # turn 1's prompt (its last token may re-merge)
    assert int(raw.headers["x-prefill-tokens"]) == b.usage.prompt_tokens - cached < b.usage.prompt_tokens


@pytest.mark.parametrize("overrides, plugins", [
    (["+cache=int4"], {"codec": "int4"}),
    (["+attention=sliding_window", "attention.window=16", "attention.sink=2"], {}),
])
def test_plugins_through_the_server(overrides, plugins):
    if not plugins:
        plugins = {"attention": registry.build("attention", "sliding_window", {"window": 16, "sink": 2})}
    reference = Reference(**plugins)
    try:
        with serving(*overrides) as (server, base):
            api = client(base)
            assert httpx.get(base.removesuffix("/v1") + "/health").json()[overrides[0][1:].split("=")[0]] == \
                overrides[0].split("=")[1]
            prompts = PROMPTS[2], PROMPTS[7]  # longer than the window
            with ThreadPoolExecutor(2) as pool:
                got = list(pool.map(lambda p: api.completions.create(model="tiny", prompt=p, max_tokens=10,
                                                                     temperature=0).choices[0].text, prompts))
            assert got == [reference.text(p, 10) for p in prompts]
    finally:
        reference.engine.close()


# ---- bad input and faults ------------------------------------------------------------------------------------------
BAD = [
    # (endpoint, body, status, param, words the message must hold)
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", ["'tiny'"]),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", [">= 1"]),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 4096}, 400, "max_tokens", ["4095"]),
    ("completions", {"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature", ["[0, 2]"]),
    ("completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", ["(0, 1]"]),
    ("completions", {"model": "tiny", "prompt": [1] * 4096}, 400, "prompt", ["4096"]),
    ("completions", {"model": "tiny", "prompt": ""}, 400, "prompt", ["empty"]),
    ("completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", ["one prompt"]),
    ("completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n", ["1"]),
    ("completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of", ["1"]),
    ("completions", {"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", ["0"]),
    ("completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "logprobs", ["0 to 5"]),
    ("completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ["4"]),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": "8"}, 400, "max_tokens", ["integer"]),
    ("completions", {"model": "tiny", "prompt": "x", "temprature": 0}, 400, "temprature", ["temperature"]),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages", ["non-empty"]),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", ["user"]),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", ["null"]),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs", ["logprobs=true"]),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1},
     400, "frequency_penalty", ["0"]),
]


@pytest.mark.parametrize("endpoint, body, status, param, words", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_input_is_refused_naming_the_field(main_server, endpoint, body, status, param, words):
    r = httpx.post(f"{main_server[1]}/{endpoint}", json=body)
    err = r.json()["error"]
    assert (r.status_code, err["param"]) == (status, param), err
    assert param.split(".")[-1].split("[")[0] in err["message"] and all(w in err["message"] for w in words), err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_input_through_the_client_and_malformed_json(main_server, api):
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(main_server[1] + "/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    r = httpx.get(main_server[1] + "/nowhere")
    assert r.status_code == 404 and "routes" in r.json()["error"]["message"]


def test_too_many_requests_and_bounded_load():
    """max_batch 4, max_queue 8: beyond 12 in flight a request gets 429 at once. 100 requests from 16 threads, under
    a fixed time cap: each is a complete answer or an explicit 429; afterwards nothing runs, nothing is queued, and
    the KV memory in use is back to its idle level."""
    with serving("serve.max_batch=4", "serve.max_queue=8") as (server, base):
        api = client(base, timeout=60)
        # 429 with the server's body: fill the batch and the queue with long streams, then one more
        release = threading.Event()

        def hold(prompt):
            stream = api.completions.create(model="tiny", prompt=prompt, max_tokens=3000, temperature=0, stream=True)
            next(stream)
            release.wait(30)
            stream.close()

        holders = [threading.Thread(target=hold, args=(p,), daemon=True) for p in PROMPTS + PROMPTS[:4]]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 10
        while (server.scheduler.stats()["running"], server.scheduler.stats()["queued"]) != (4, 8):
            assert time.monotonic() < deadline, server.scheduler.stats()
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            api.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and "max_queue" in e.value.body["message"]
        assert e.value.response.headers["retry-after"] == "1"
        release.set()
        for t in holders:
            t.join(30)
        wait_idle(server)
        idle_kv = server.scheduler.stats()["kv_bytes_in_use"]

        def one(i):
            try:
                r = api.completions.create(model="tiny", prompt=PROMPTS[i % 8], max_tokens=1 + i % 4, temperature=0)
                return "ok" if r.choices[0].finish_reason in ("length", "stop") and \
                    (r.choices[0].finish_reason == "stop" or r.usage.completion_tokens == 1 + i % 4) else r
            except openai.RateLimitError as err:
                return 429 if err.body["code"] == "rate_limit_exceeded" else err

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(100)))
        elapsed = time.monotonic() - t0
        assert elapsed < 45, f"100 requests took {elapsed:.1f} s"
        assert all(r in ("ok", 429) for r in results), [r for r in results if r not in ("ok", 429)][:3]
        assert results.count("ok") >= 12, results.count(429)  # at least the batch and the queue were served
        stats = wait_idle(server)
        assert stats["kv_bytes_in_use"] == idle_kv == 0
        metrics = {s.name: s.value for f in text_string_to_metric_families(httpx.get(
            base.removesuffix("/v1") + "/metrics").text) for s in f.samples if not s.labels}
        assert metrics["ollm_requests_refused_total"] == results.count(429) + 1
        assert metrics["ollm_requests_running"] == metrics["ollm_requests_queued"] == 0


def test_queue_timeout_and_a_client_that_leaves_a_waiting_answer():
    with serving("serve.max_batch=1", "serve.queue_timeout_s=0.5") as (server, base):
        # a non-streamed answer whose client gives up is cancelled in the scheduler
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3000}, timeout=0.5)
        assert wait_idle(server, 5)["requests_cancelled"] == 1
        # a request queued longer than queue_timeout_s behind a long one: 429 with its own code
        api = client(base)
        stream = api.completions.create(model="tiny", prompt="x", max_tokens=3000, temperature=0, stream=True)
        next(stream)
        with pytest.raises(openai.RateLimitError) as e:
            api.completions.create(model="tiny", prompt="y", max_tokens=2)
        assert e.value.body["code"] == "queue_timeout" and "queue_timeout_s" in e.value.body["message"]
        stream.close()
        assert wait_idle(server, 5)["requests_timeouts"] == 1


@pytest.mark.parametrize("where", ["before the step", "inside the step"])
def test_an_engine_failure_fails_alone(where, ref):
    """A request whose prompt holds token 8000 makes the model step raise (at its start, or in its fourth layer
    after three layers wrote K/V): that request gets 500 with OpenAI's body, the request prefilled in the same
    batched step gets the same answer as alone, and the server goes on. A gate request (token 7999) holds the
    scheduler in one step while the two arrive, so they join the batch together."""
    gate = threading.Event()

    def fault(engine):
        step = engine.model.step

        def failing(ids, mixer, *args, **kwargs):
            if (ids == 7999).any():
                gate.wait(10)  # the two requests queue meanwhile
            if not (ids == 8000).any():
                return step(ids, mixer, *args, **kwargs)
            if where == "before the step":
                raise RuntimeError("injected fault")

            def mixer_failing(i, *a, **k):
                if i == 3:
                    raise RuntimeError("injected fault")
                return mixer(i, *a, **k)

            return step(ids, mixer_failing, *args, **kwargs)

        engine.model.step = failing

    with serving(fault=fault) as (server, base):
        api = client(base)
        bad_prompt = ref.tok.encode(PROMPTS[6])
        bad_prompt[2] = 8000  # the same length as the good prompt: they prefill in one batched step
        good_prompt = ref.tok.encode(PROMPTS[0])[:len(bad_prompt)]
        with ThreadPoolExecutor(3) as pool:
            held = pool.submit(api.completions.create, model="tiny", prompt=[7999, 5], max_tokens=1)
            while server.scheduler.stats()["running"] < 1:
                time.sleep(0.005)
            bad = pool.submit(api.completions.create, model="tiny", prompt=bad_prompt, max_tokens=6, temperature=0)
            good = pool.submit(api.completions.create, model="tiny", prompt=good_prompt, max_tokens=6, temperature=0)
            deadline = time.monotonic() + 10
            while server.scheduler.stats()["queued"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            gate.set()
            held.result()
            with pytest.raises(openai.InternalServerError) as e:
                bad.result()
            assert good.result().choices[0].text == ref.tok.decode(ref.tokens(good_prompt, 6))
        assert "injected fault" in e.value.body["message"] and e.value.body["type"] == "server_error"
        assert api.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert server.scheduler.stats()["requests_errors"] == 1


def test_metrics_export_the_batching_statistics(main_server, api):
    api.completions.create(model="tiny", prompt="x = 1", max_tokens=3)
    text = httpx.get(main_server[1].removesuffix("/v1") + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("ollm_requests_running", "ollm_requests_queued", "ollm_requests_per_second",
                 "ollm_generated_tokens_per_second", "ollm_generated_tokens", "ollm_batch_size_mean",
                 "ollm_queue_seconds", "ollm_time_to_first_token_seconds", "ollm_inter_token_latency_seconds",
                 "ollm_kv_cache_bytes", "ollm_http_requests"):
        assert name in names, name
    assert 'ollm_time_to_first_token_seconds{quantile="0.99"}' in text
    assert 'ollm_kv_cache_bytes{codec="dense",state="in_use"}' in text
    assert 'ollm_model_info{adapt="none",attention="sdpa",cache="dense",context="none",decoder="openai_defaults",' \
        'model="tiny",prefetch="resident"}' in text
    # the system monitor (on by default): this process's readings, and the GPU's or why there are none
    assert {"ollm_process_resident_memory_bytes", "ollm_monitor_info", "ollm_monitor_seconds"} <= names
    gpu = main_server[0].monitor.gpu
    assert f'gpu="{gpu}"' in text
    assert gpu.startswith("unavailable") != ("ollm_gpu_power_watts" in names or "ollm_gpu_utilization_percent" in names)


def test_a_random_model_without_tokenizer_takes_token_ids():
    with serving("model=tiny_random", "+decoder=greedy") as (server, base):
        api = client(base)
        r = api.completions.create(model="tiny_random", prompt=[5, 17, 300], max_tokens=4, logprobs=1)
        assert r.choices[0].text.count("<") == 4 and r.choices[0].logprobs.tokens[0].startswith("<")
        assert r.choices[0].text == api.completions.create(model="tiny_random", prompt=[5, 17, 300],
                                                           max_tokens=4).choices[0].text  # +decoder=greedy
        with pytest.raises(openai.BadRequestError) as e:
            api.completions.create(model="tiny_random", prompt="text", max_tokens=4)
        assert e.value.body["param"] == "prompt" and "token ids" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="tiny_random", messages=[{"role": "user", "content": "x"}])
        assert "chat template" in e.value.body["message"]


# ---- configuration and the process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["+cahce=int4"], ["cahce"]),
    (["+decoder=speculative"], ["greedy", "sample"]),
    (["serve.port=-1"], ["serve.port", "65535"]),
    (["serve.max_batch=0"], ["serve.max_batch", ">= 1"]),
    (["serve.prot=1"], ["prot"]),
    (["+cache=int4", "cache.bits=3"], ["bits"]),
    (["+adapt=memory"], ["+adapt=memory is not applied by the server", "no +adapt"]),
    (["+context=importance"], ["+context=importance is not applied by the server", "no +context"]),
    (["monitor.rate_hz=0"], ["monitor.rate_hz=0", "accepted: a number in (0, 1000]"]),
    (["monitor.enable=false"], ["enable"]),
])
def test_bad_configuration_fails_in_one_line(overrides, words):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ollm_triton.registry import PluginError
    from ollm_triton.run import composition_error

    with pytest.raises((RunError, PluginError, ValueError, HydraException, OmegaConfBaseException)) as e:
        build(compose(overrides))
    message = composition_error(e.value) if isinstance(e.value, (HydraException, OmegaConfBaseException)) \
        else str(e.value)
    assert all(w in message for w in words), message


def test_a_model_that_does_not_fit_is_refused_before_loading(monkeypatch):
    """The runner's memory check runs before load_engine: with 2 GB free, Llama-3-8B shapes are refused in one line
    (the embedded model fits)."""
    import ollm_triton.engine.footprint as footprint

    monkeypatch.setattr(footprint, "free_memory", lambda device, gb=None: (2 * 10**9, 2 * 10**9))
    monitors = lambda: sum(t.name == "ollm-system-monitor" for t in threading.enumerate())  # noqa: E731
    before = monitors()
    with pytest.raises(ValueError, match="llama3_8b does not fit"):
        build(compose(["model=llama3_8b", "+cache=int4"]))
    assert monitors() == before  # the refused build stopped the monitor it had started


def test_python_m_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ollm_triton.serve", "serve.port=0", "serve.shutdown_timeout_s=0.5"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "err", "w"), text=True, env=env,
                            cwd=tmp_path)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, (tmp_path / "err").read_text()
            if "listening on " in line:
                url = line.split("listening on ")[1].strip()
        assert url, "no startup line"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url.removesuffix("/v1") + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        api = client(url)
        assert api.completions.create(model="tiny", prompt="def f(", max_tokens=3).usage.completion_tokens == 3
        stream = api.completions.create(model="tiny", prompt="x", max_tokens=3000, temperature=0, stream=True)
        next(stream)  # a request is running when SIGTERM comes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in stream:  # the running stream ends (cancelled by the shutdown), it does not hang
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "err").read_text()
    assert "Traceback" not in err and "Application shutdown complete" in err, err

"""Start `python -m ollm_triton.serve <overrides>`, drive it over loopback with plain HTTP, then SIGTERM it.

    python3 scripts/serve_check.py +cache=int4 model=llama3_8b      # issue 16's GPU check

Prints: the time to come up, end-to-end tok/s at 1, 8 and 32 concurrent completions (512-token prompts, 32 new,
greedy), a streamed completion's last event, the server's KV / batch / latency metrics, and whether SIGTERM ended
it cleanly. A check that the whole stack runs on a machine, not a benchmark (scripts/bench_serve.py is that)."""
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

overrides = sys.argv[1:]
t0 = time.time()
proc = subprocess.Popen([sys.executable, "-m", "ollm_triton.serve", "serve.port=0", "serve.log_level=warning",
                         *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
url = None
for line in proc.stdout:
    print(line.rstrip(), flush=True)
    if "listening on" in line:
        url = line.split("listening on ")[1].strip()
        break
assert url, proc.stderr.read()
root = url.removesuffix("/v1")
while httpx.get(root + "/health").status_code != 200:
    time.sleep(0.1)
print(f"up after {time.time() - t0:.1f} s", flush=True)
model = httpx.get(url + "/models").json()["data"][0]["id"]

def one(i, n_prompt=512, n_new=32, stream=False):
    body = {"model": model, "prompt": [(i * 7919 + j * 31) % 128000 + 1 for j in range(n_prompt)],
            "max_tokens": n_new, "temperature": 0}
    t = time.time()
    r = httpx.post(url + "/completions", json=body, timeout=300)
    r.raise_for_status()
    return time.time() - t, r.json()["usage"]["completion_tokens"]

print("warm", one(0, 64, 4), flush=True)
for conc in (1, 8, 32):
    t = time.time()
    with ThreadPoolExecutor(conc) as pool:
        res = list(pool.map(one, range(conc)))
    dt = time.time() - t
    gen = sum(r[1] for r in res)
    print(f"concurrent={conc}: {gen} tokens in {dt:.2f} s = {gen / dt:.0f} tok/s end to end", flush=True)
with httpx.stream("POST", url + "/completions", json={"model": model, "prompt": [1, 2, 3], "max_tokens": 8,
                                                       "stream": True}) as r:
    lines = [l for l in r.iter_lines() if l]
print("stream", len(lines), lines[-1], flush=True)
m = httpx.get(root + "/metrics").text
SHOWN = ("ollm_kv", "ollm_batch", "ollm_time_to", "ollm_inter", "ollm_model", "ollm_generated_tokens_total",
         "ollm_requests_finished")
print("\n".join(line for line in m.splitlines() if line.startswith(SHOWN)), flush=True)
proc.send_signal(signal.SIGTERM)
rc = proc.wait(60)
err = proc.stderr.read()
print("exit", rc, "traceback" if "Traceback" in err else "no traceback", flush=True)
print(err[-1500:])

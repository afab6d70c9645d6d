"""`python -m ollm_triton.serve [model=...] [+attention=...] [+cache=...] [+decoder=...] [+prefetch=...] [serve.k=v]`

An OpenAI-compatible server (ollm_triton/serve/app.py) on the continuous-batching scheduler, composed from
ollm_triton/conf/serve.yaml. A bad override, plugin parameter or model ends in one line, exit status 2, before
anything loads. SIGTERM (or Ctrl-C): uvicorn stops accepting, running requests get serve.shutdown_timeout_s to
finish, then the scheduler cancels what is left and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import sys

HELP = """usage: python -m ollm_triton.serve [model=NAME] [+attention=X] [+cache=Y] [+decoder=greedy|sample]
                                  [+prefetch=Z] [plugin.param=value ...] [serve.key=value ...]

An OpenAI-compatible server over the engine and its plugins, with continuous batching. Same groups as the runner
(python -m ollm_triton.run --help); plugins are APPENDED with +. A group left out runs its baseline.
    python -m ollm_triton.serve                                   # the embedded model on 127.0.0.1:8000
    python -m ollm_triton.serve +cache=int4 serve.max_batch=32 serve.port=8080
    python -m ollm_triton.serve model=llama3_8b +attention=sliding_window attention.window=1024

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream: true = server-sent events),
           GET /v1/models, GET /health, GET /metrics (Prometheus: batching, KV, and the system monitor's GPU power,
           energy and tokens per joule since start, temperature, utilization, memory; process CPU and RSS)
Monitor:   monitor.enabled=false (off), monitor.rate_hz=10 (samples per second), as in the runner
Client:    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

serve.* keys and their defaults (ollm_triton/conf/serve.yaml):
"""


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        from pathlib import Path

        print(HELP + (Path(__file__).parent.parent / "conf" / "serve.yaml").read_text().split("serve:", 1)[1])
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ollm_triton.build import USER_ERRORS
    from ollm_triton.run import composition_error
    from ollm_triton.serve.server import build, compose

    try:
        cfg = compose(args)
        server = build(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    try:
        sock = server.bind()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        server.close()
        sys.exit(2)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"ollm-triton serve: {server.describe()}", flush=True)
    print(f"ollm-triton serve: listening on http://{shown}:{port}/v1", flush=True)
    # uvicorn handles SIGTERM/SIGINT while it runs (graceful shutdown, then the lifespan's), then raises the signal
    # again for the handler it found: this one, so that a shut-down server exits 0 rather than dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    try:
        server.uvicorn_server().run(sockets=[sock])  # returns after SIGTERM/SIGINT and the lifespan's shutdown
    finally:
        sock.close()
        server.close()  # the monitor's thread and the model (the scheduler already stopped in the lifespan)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()

"""`python -m <module> <args>` (and `python <script> <args>`) for tests that start a command line, without paying
its imports each time.

Each run is still its own process: a child forked from a server that has already imported torch, Hydra and the
package modules the entry point imports, in which the entry point itself runs fresh as `__main__` (runpy, as
`python -m` runs it), with the test's environment, working directory, argv and its own stdout/stderr, and ends like an
interpreter does (non-daemon threads joined, atexit handlers run). What is skipped is ~3 s of imports per start on the
2-core CI machine; the suite starts `python -m ollm_triton.run` two dozen times. Tests that check the interpreter
start-up itself (the installed wheel, the console script) keep real `subprocess` runs.

    proc = run_module("ollm_triton.run", ["model=tiny_random", ...], env={**os.environ, "WANDB_MODE": "offline"})
    proc.returncode, proc.stdout, proc.stderr  # as subprocess.run(..., capture_output=True, text=True) gives them
    proc = run_script(REPO / "scripts" / "bench_kv_capacity.py", ["--small", ...])
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What ollm_triton/run.py imports at its top (the expensive part of its start; the scripts' ollm_triton.engine is among
# them); not ollm_triton.run itself, so that the child runs run.py once, as __main__, exactly as `python -m
# ollm_triton.run` does. A module that run.py starts to import later is simply imported in the child (slower, same
# behaviour).
PRELOAD = ["torch", "hydra", "omegaconf", "ollm_triton.build", "ollm_triton.config_nodes", "ollm_triton.monitor",
           "ollm_triton.registry", "ollm_triton.results", "ollm_triton.tasks.base", "cli_fork"]

_lock = threading.Lock()
_context = None


def _server():
    """The forkserver context, started once per test session with PRELOAD imported (the server has run no torch op
    and started no thread, so forking it is safe)."""
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
        return _context


def _child(target: str, is_path: bool, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [target, *args]
    try:
        if is_path:  # `python script.py` puts the script's folder first on sys.path
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:  # what the interpreter does before it exits; multiprocessing's child would skip both
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    # SystemExit(code) goes on to multiprocessing, which exits with that code (None: 0; an uncaught exception: its
    # traceback on stderr and 1), as the interpreter would


def run_module(module: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | str = REPO,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module *args` in cwd with env (default: this process's): returncode, stdout, stderr (text)."""
    return _run(module, False, args, env, cwd, timeout)


def run_script(path: Path | str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | str = REPO,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python path *args`, as run_module."""
    return _run(str(path), True, args, env, cwd, timeout)


def _run(target: str, is_path: bool, args: list[str], env: dict[str, str] | None, cwd: Path | str,
         timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *([] if is_path else ["-m"]), target, *args]
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="cli_fork") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _server().Process(target=_child, args=(target, is_path, list(args), env, str(cwd), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        if not os.path.exists(err):  # it died in multiprocessing's own start-up: the reason is on this stderr
            raise RuntimeError(f"the forked {' '.join(cmd[1:])} exited {proc.exitcode} before running")
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess(cmd, proc.exitcode, f_out.read(), f_err.read())

"""A regular install runs: a wheel built from the repo, installed into a fresh directory, composes its packaged
configs and runs from an unrelated working directory, through `python -m ollm_triton.run` and the `ollm-triton`
console script. (An editable install hides a missing config or asset: it reads them from the checkout.)"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site directory, wheel path): the wheel built from a copy of the package sources (the build writes build/
    and *.egg-info where it runs, not in the checkout), installed with --target."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "ollm_triton", src / "ollm_triton", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("ollm_triton-*.whl")
    site = root / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return site, wheel


def _run(cmd, site, cwd):
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _console_script(site):
    """The console script run through this interpreter (its shebang), checking that the installed copy is the one
    imported."""
    script = site / "bin" / "ollm-triton"
    check = f"import ollm_triton; assert ollm_triton.__file__.startswith({str(site)!r}), ollm_triton.__file__"
    return [sys.executable, "-c", f"{check}; import runpy, sys; sys.argv[0] = {str(script)!r}; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')"]


@pytest.fixture(scope="module")
def started(installed, tmp_path_factory):
    """The installed copy's three runs, started together as soon as it is installed: name -> (future of the
    finished process, its run directory). Each is one interpreter start (~6 s, one core), so two cores finish the
    three in about the time of two; every test below still asserts on its own run."""
    site, _ = installed
    cwd = tmp_path_factory.mktemp("unrelated")  # an unrelated working directory
    dirs = {name: cwd / name for name in ("module", "console")}
    commands = {
        "module": [sys.executable, "-m", "ollm_triton.run", "debug=smoke", "logger.mode=disabled", "task=perplexity",
                   "+cache=int4", f"hydra.run.dir={dirs['module']}"],
        "help": [*_console_script(site), "--help"],
        "console": [*_console_script(site), "debug=smoke", "logger.mode=disabled", "model=tiny_random", "task=memory",
                    f"hydra.run.dir={dirs['console']}"],
    }
    pool = ThreadPoolExecutor(len(commands))
    yield {name: (pool.submit(_run, cmd, site, cwd), dirs.get(name)) for name, cmd in commands.items()}
    pool.shutdown()


def test_wheel_carries_configs_and_assets(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ollm_triton/conf/config.yaml" in names and "ollm_triton/conf/__init__.py" in names
    assert "ollm_triton/conf/model/tiny.yaml" in names and "ollm_triton/conf/debug/smoke.yaml" in names
    assert any(n.startswith("ollm_triton/assets/tiny-llama/") and n.endswith(".safetensors") for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_from_an_unrelated_directory(installed, started):
    site, _ = installed
    future, run_dir = started["module"]
    proc = future.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and record["plugins"]["cache"]["name"] == "int4"
    assert record["metrics"]["perplexity/ppl"] > 1  # the embedded model and corpus shipped too
    assert (run_dir / "resolved_config.yaml").exists() and not (REPO / "ollm_triton").samefile(site / "ollm_triton")


@pytest.mark.slow
def test_console_script_after_install(installed, started):
    """`ollm-triton` (pyproject's [project.scripts]) composes pkg://ollm_triton.conf: it needs conf/__init__.py."""
    site, _ = installed
    script = site / "bin" / "ollm-triton"
    assert script.exists(), sorted(p.name for p in (site / "bin").iterdir()) if (site / "bin").exists() else site
    helped = started["help"][0].result()
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "+cache=" in helped.stdout and "ollm_triton.plugins" in helped.stdout
    future, run_dir = started["console"]
    proc = future.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"

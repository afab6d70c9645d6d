"""Shared test setup.

Without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before triton is imported,
so it is set here, before anything else imports torch or triton.
"""

import os

# Decided before importing torch, from the driver's device file (torch.cuda would import triton first).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def train_script():
    """scripts/train_tiny_lm.py loaded as a module (the training and long-context evaluation tests share it)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "train_tiny_lm.py"
    spec = importlib.util.spec_from_file_location("train_tiny_lm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def _unfreeze_at_exit():
    yield
    gc.unfreeze()


@pytest.fixture(scope="module", autouse=True)
def frozen_heap(_unfreeze_at_exit):
    """Moves what is alive when a module starts (torch, triton, every test module, what earlier modules imported:
    ~560k objects) out of the garbage collector's reach: each gc.collect() (Engine.close calls one; ~220 in the suite)
    walked all of it, 0.1-0.3 s a call on the 2-core CI machine. Objects the module's tests create are collected as
    before; the heap is unfrozen at session end."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def poison():
    """poison(t) fills a freshly allocated output with NaN (or the integer minimum), so a kernel that leaves an
    element unwritten fails the comparison."""

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(torch.iinfo(t.dtype).min)

    return fill


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: a second intra-op thread only waits (6x slower on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

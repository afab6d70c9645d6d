"""Where a run computes and in what dtype: the one place that turns `device=` and `dtype=` settings into torch values.

The runner, `load_engine` and the scripts all resolve through here, so `auto` means one thing everywhere:
    device auto   CUDA when available (job k of a sweep over several GPUs takes GPU k mod count: Hydra assigns
                  none, and CUDA_VISIBLE_DEVICES set after CUDA started does nothing), else the CPU
    dtype auto    on CUDA the checkpoint's own dtype (bfloat16 when it names none), on the CPU float32:
                  half-precision matmuls on the CPU are slow and gain nothing
Bad values raise ValueError with one line naming what was wrong and what is accepted.
"""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DEVICE_FORMS = "auto, cpu, cuda, cuda:N"


def resolve_device(device: str | torch.device, job_num: int = 0) -> torch.device:
    """A concrete torch.device (cuda with its index) for `device` (see the module docstring)."""
    if isinstance(device, str) and device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", job_num % torch.cuda.device_count())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; accepted: {DEVICE_FORMS}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} requested but CUDA is not available (torch {torch.__version__}); "
                             "accepted here: auto, cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"device={str(device)!r} is not supported; accepted: {DEVICE_FORMS}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """A torch dtype for `dtype` (a torch dtype, a name in DTYPES, or auto) on `device`."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; accepted: float32, bfloat16, float16")
        return dtype
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        return DTYPES.get(checkpoint_dtype or "", torch.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not accepted; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


__all__ = ["DTYPES", "dtype_name", "resolve_device", "resolve_dtype"]

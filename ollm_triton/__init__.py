"""ollm-triton: a research toolkit for long-context LLM inference optimizations."""

__version__ = "0.1.0"

__all__ = ["OptimizedInference", "SystemMonitor"]


def __getattr__(name: str):
    # `import ollm_triton` stays cheap (no torch, no Hydra): the facade and the monitor load on first use
    if name == "OptimizedInference":
        from ollm_triton.facade import OptimizedInference

        return OptimizedInference
    if name == "SystemMonitor":
        from ollm_triton.monitor import SystemMonitor

        return SystemMonitor
    raise AttributeError(f"module 'ollm_triton' has no attribute {name!r}")

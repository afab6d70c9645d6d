"""ollm-triton: a research toolkit for long-context LLM inference optimizations."""

__version__ = "0.1.0"

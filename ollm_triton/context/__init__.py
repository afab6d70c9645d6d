"""Context-compression plugins: the prompt shortened before prefill. Every module in this folder registers its plugins
when imported (base.py: the interface)."""

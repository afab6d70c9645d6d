"""KV cache-codec plugins. Every module in this folder registers its plugins when imported (base.py: the interface)."""

"""KV cache-codec plugins. Every module in this folder registers its plugins when imported (base.py: the interface)."""

from ollm_triton._discover import import_submodules

import_submodules(__name__)

"""Serving: continuous batching over the engine (`scheduler.py`) behind an OpenAI-compatible HTTP server."""

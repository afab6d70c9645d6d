"""Offline data: the stdlib text corpus (corpus.py) and synthetic key-value retrieval documents (retrieval.py)."""

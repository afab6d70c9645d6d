"""Decoder-strategy plugins. The registry imports every module in this folder on first use (base.py holds the interface)."""

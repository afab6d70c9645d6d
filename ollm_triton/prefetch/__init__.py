"""Layer-prefetch policy plugins: the registry imports every module here on first use; base.py holds the interface."""

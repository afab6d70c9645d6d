"""`resident`: every weight on the device for the whole run (the baseline policy)."""

from __future__ import annotations

from ollm_triton.prefetch.base import PrefetchPolicy
from ollm_triton.registry import register


@register("prefetch", "resident")
class Resident(PrefetchPolicy):
    """All weights moved to the device once; nothing is streamed."""

    resident_weights = True

    def __init__(self, cfg=None):
        self.cfg = cfg

    def setup(self, model, device):
        model.to(device)

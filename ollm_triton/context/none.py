"""`none`: the prompt as given (the baseline every compressor is compared with)."""

from __future__ import annotations

from typing import Any

import torch

from ollm_triton.context.base import ContextCompressor, ContextParams
from ollm_triton.registry import register


@register("context", "none", ContextParams)
class NoCompression(ContextCompressor):
    """Keep every token of the prompt (the baseline)."""

    def select(self, ids: torch.Tensor, protected: torch.Tensor, query: tuple[int, int] | None,
               target: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.arange(ids.numel()), {}

"""`dense`: K/V kept as contiguous tensors in the model dtype (or a chosen one), the baseline cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheCodec, CacheLayer, LayerSpec, once_per_step
from ollm_triton.kernels.attention_decode_varlen import decode_varlen
from ollm_triton.kernels.rope import rope_write_kv
from ollm_triton.registry import register

DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class DenseConfig:
    dtype: str = "model"  # model | float16 | bfloat16 | float32
    preallocate: bool = True  # one buffer of max_len tokens up front (no re-allocation while decoding)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


class DenseLayer(CacheLayer):
    def __init__(self, spec: LayerSpec, dtype: torch.dtype, preallocate: bool):
        super().__init__(spec)
        self.dtype = dtype
        self._len = 0
        cap = spec.max_len if preallocate else 0
        shape = (spec.batch, spec.kv_heads, cap, spec.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=spec.device)
        self.v = torch.empty(shape, dtype=dtype, device=spec.device)

    @property
    def length(self) -> int:
        return self._len

    def append(self, k, v):
        new = self._len + k.shape[2]
        if new > self.k.shape[2]:  # grow geometrically so appends stay amortised O(1)
            cap = max(new, 2 * self.k.shape[2], 256)
            self.k = _grow(self.k, cap, self._len)
            self.v = _grow(self.v, cap, self._len)
        self.k[:, :, self._len : new] = k
        self.v[:, :, self._len : new] = v
        self._len = new
        self.appended = new

    def dense(self):
        k, v = self.k[:, :, : self._len], self.v[:, :, : self._len]
        if self.dtype != self.spec.dtype:  # a cache kept in another dtype is read back in the model dtype
            k, v = k.to(self.spec.dtype), v.to(self.spec.dtype)
        return k, v

    def truncate(self, length):
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot truncate a cache of {self._len} tokens to {length}")
        self._len = length
        self.appended = length

    def set_length(self, length: int) -> None:
        if not 0 <= length <= self.k.shape[2]:
            raise ValueError(f"fill level {length} is outside this layer's {self.k.shape[2]} slots")
        self._len = length
        self.appended = length

    static_kernel = "decode_varlen"

    def static_decode(self, q, k, v, cos, sin, pos, *, kernels: bool, shared: dict | None = None, window: int = 0,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE fused with the K/V write at each row's slot, then the varlen decode reading each row's length (over
        its last `window` keys, with the layer's `sinks`: gpt-oss' own rule, Dense.static_window_sinks)."""
        q_rot = rope_write_kv(q, k, v, cos, sin, self.k, self.v, pos, use_kernel=kernels)
        lengths = once_per_step(shared, ("lengths", self.scratch_from), lambda: self._lengths(pos))
        return decode_varlen(q_rot[:, :, 0], self.k, self.v, lengths, use_kernel=kernels, window=window,
                             sinks=sinks)[:, :, None]

    def _lengths(self, pos: torch.Tensor) -> torch.Tensor:
        """Keys each row attends after the step: pos + 1; idle rows (CacheLayer.scratch_from) one."""
        if self.scratch_from is None:
            return pos + 1
        return torch.where(pos >= self.scratch_from, 1, pos + 1)

    def row_view(self, start: int, stop: int) -> DenseLayer:
        s = self.spec
        spec = LayerSpec(batch=stop - start, kv_heads=s.kv_heads, head_dim=s.head_dim, dtype=s.dtype,
                         device=s.device, max_len=self.k.shape[2])
        view = DenseLayer(spec, self.dtype, preallocate=False)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        view.scratch_from = self.scratch_from
        return view

    def zero_storage(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def stored_bytes(self):
        return 2 * self.spec.batch * self.spec.kv_heads * self.spec.head_dim * self._len * self.k.element_size()


def _grow(buf: torch.Tensor, cap: int, used: int) -> torch.Tensor:
    out = torch.empty(*buf.shape[:2], cap, buf.shape[3], dtype=buf.dtype, device=buf.device)
    out[:, :, :used] = buf[:, :, :used]
    return out


@register("cache", "dense", DenseConfig)
class Dense(CacheCodec):
    """Contiguous K/V buffers (pre-allocated to the run's maximum context, or growing), no compression."""

    def __init__(self, cfg: DenseConfig | None = None):
        self.cfg = cfg or DenseConfig()

    @property
    def static_buffers(self) -> bool:
        """Pre-allocated buffers in the model dtype: the engine's static step writes and attends them in place."""
        return self.cfg.dtype == "model" and self.cfg.preallocate

    @property
    def static_decode(self) -> bool:
        """The static step writes and attends the buffers in place (DenseLayer.static_decode)."""
        return self.static_buffers

    @property
    def static_window_sinks(self) -> bool:
        """DenseLayer.static_decode attends over a layer's sliding window with its sinks (the varlen kernel)."""
        return self.static_buffers

    def bytes_per_token(self, spec: LayerSpec) -> float:
        dtype = DTYPES[self.cfg.dtype] or spec.dtype
        return 2.0 * spec.batch * spec.kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        return DenseLayer(spec, DTYPES[self.cfg.dtype] or spec.dtype, self.cfg.preallocate)

"""The full-precision window of recent tokens that the encoding codecs (quant, cluster) keep before encoding."""

from __future__ import annotations

import torch


class ResidualWindow:
    """Mixin for a CacheLayer with residual buffers `k_res`, `v_res` ([B, Hkv, >= residual + block, D]), a count
    `n_res`, and `_encode(k, v)` that appends whole blocks to the codec's encoded store.

    Tokens wait in full precision until more than `residual + block` are held; then the oldest whole blocks are
    encoded at once, so the newest `residual` (at least) stay exact and the encoder always sees full blocks.
    """

    k_res: torch.Tensor
    v_res: torch.Tensor
    n_res: int

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def _append_through_residual(self, k: torch.Tensor, v: torch.Tensor, residual: int, block: int) -> None:
        total = self.n_res + k.shape[2]
        n_flush = (total - residual) // block * block if total >= residual + block else 0
        if n_flush == 0:
            self.k_res[:, :, self.n_res : total] = k
            self.v_res[:, :, self.n_res : total] = v
            self.n_res = total
            return
        src_k, src_v = k, v
        if self.n_res:
            src_k = torch.cat((self.k_res[:, :, : self.n_res], k), dim=2)
            src_v = torch.cat((self.v_res[:, :, : self.n_res], v), dim=2)
        self._encode(src_k[:, :, :n_flush], src_v[:, :, :n_flush])
        keep = total - n_flush
        self.k_res[:, :, :keep] = src_k[:, :, n_flush:]
        self.v_res[:, :, :keep] = src_v[:, :, n_flush:]
        self.n_res = keep

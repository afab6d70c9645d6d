"""`cluster`: k-means vector quantization of keys and values per (layer, KV head), with a full-precision window.

Each (sequence, KV head) of a layer has two codebooks of `num_clusters` centroids (keys, values) in the model
dtype, and every coded token is one integer per K and per V (uint8 up to 256 clusters, int16 beyond): at
head_dim 128 in bf16, 256 bytes of K/V become 2 bytes plus the codebooks' share.

The codebooks are fitted (Lloyd's k-means, `iters` rounds, kernels/cluster.py) on the first tokens that leave
the recent window (typically the prompt) and then stay fixed: later tokens are only assigned to their nearest
centroid (the Triton assignment kernel on CUDA). The newest `residual` tokens (up to `residual + 64`) stay in the
model dtype; tokens leave the window in blocks of 64.

Truncation is exact: codes are per token, so rolling back drops codes or window tokens, and every kept token
reads as before (the codebooks keep what they learned from the rolled-back tokens, if they were fitted on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheCodec, CacheLayer, LayerSpec
from ollm_triton.cache.residual import ResidualWindow
from ollm_triton.cache.storage import StoredCodec, StoreParams, wrap_store
from ollm_triton.kernels.cluster import assign, assign_ref, kmeans
from ollm_triton.registry import register

FLUSH_BLOCK = 64  # tokens leave the window in blocks of this many (amortizes the assignment launches)


@dataclass
class ClusterConfig(StoreParams):
    num_clusters: int = 256  # centroids per (layer, KV head), for keys and for values
    iters: int = 10  # Lloyd rounds of the fit
    residual: int = 128  # newest tokens kept in the model dtype
    seed: int = 0

    def check(self) -> None:
        super().check()
        if not 2 <= self.num_clusters <= 32767:
            raise ValueError(f"num_clusters must be in [2, 32767], got {self.num_clusters}")
        if self.iters < 0 or self.residual < 0:
            raise ValueError(f"iters and residual must be >= 0, got {self.iters}, {self.residual}")


class ClusterLayer(ResidualWindow, CacheLayer):
    def __init__(self, spec: LayerSpec, cfg: ClusterConfig):
        super().__init__(spec)
        self.cfg = cfg
        b, h, d = spec.batch, spec.kv_heads, spec.head_dim
        self.code_dtype = torch.uint8 if cfg.num_clusters <= 256 else torch.int16
        self.k_codes = torch.empty(b, h, 0, dtype=self.code_dtype, device=spec.device)
        self.v_codes = torch.empty_like(self.k_codes)
        self.k_book: torch.Tensor | None = None  # [B, H, C, D] in the model dtype, after the first flush
        self.v_book: torch.Tensor | None = None
        self.k_res = torch.empty(b, h, cfg.residual + FLUSH_BLOCK, d, dtype=spec.dtype, device=spec.device)
        self.v_res = torch.empty_like(self.k_res)
        self.n_coded = 0
        self.n_res = 0
        self.last_path = "torch.dense"

    @property
    def length(self) -> int:
        return self.n_coded + self.n_res

    @property
    def compressed_tokens(self) -> int:
        return self.n_coded

    def _codes_for(self, x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        xf, bf = x.reshape(b * h, n, d), book.reshape(b * h, -1, d)
        codes = assign(xf, bf) if x.is_cuda else assign_ref(xf, bf)
        return codes.reshape(b, h, n).to(self.code_dtype)

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, n, d = k.shape
        with self.encode_timer.region():
            if self.k_book is None:
                c = self.cfg
                self.k_book = kmeans(k.reshape(b * h, n, d), c.num_clusters, c.iters, c.seed).reshape(b, h, -1, d)
                self.v_book = kmeans(v.reshape(b * h, n, d), c.num_clusters, c.iters, c.seed + 1).reshape(b, h, -1, d)
                self.k_book, self.v_book = self.k_book.to(self.spec.dtype), self.v_book.to(self.spec.dtype)
            new_k, new_v = self._codes_for(k, self.k_book), self._codes_for(v, self.v_book)
        if self.n_coded + n > self.k_codes.shape[2]:
            cap = max(self.n_coded + n, 2 * self.k_codes.shape[2], 256)
            for name in ("k_codes", "v_codes"):
                old = getattr(self, name)
                buf = torch.empty(b, h, cap, dtype=self.code_dtype, device=old.device)
                buf[:, :, : self.n_coded] = old[:, :, : self.n_coded]
                setattr(self, name, buf)
        self.k_codes[:, :, self.n_coded : self.n_coded + n] = new_k
        self.v_codes[:, :, self.n_coded : self.n_coded + n] = new_v
        self.n_coded += n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        self._append_through_residual(k, v, self.cfg.residual, FLUSH_BLOCK)
        self.appended += t

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        k_res, v_res = self.k_res[:, :, : self.n_res], self.v_res[:, :, : self.n_res]
        if self.n_coded == 0:
            return k_res, v_res
        d = self.spec.head_dim
        out = []
        for book, codes, res in ((self.k_book, self.k_codes, k_res), (self.v_book, self.v_codes, v_res)):
            idx = codes[:, :, : self.n_coded].long()[..., None].expand(-1, -1, -1, d)
            out.append(torch.cat((torch.gather(book, 2, idx), res), dim=2))
        return out[0], out[1]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if length >= self.n_coded:
            self.n_res = length - self.n_coded
        else:
            self.n_coded, self.n_res = length, 0
        self.appended = length

    def stored_bytes(self) -> int:
        s = self.spec
        bh, d = s.batch * s.kv_heads, s.head_dim
        elt = self.k_res.element_size()
        codes = 2 * self.n_coded * self.k_codes.element_size()
        books = 0 if self.k_book is None else 2 * self.k_book.shape[2] * d * elt
        return bh * (codes + books + 2 * self.n_res * d * elt)


@register("cache", "cluster", ClusterConfig)
class Cluster(StoredCodec, CacheCodec):
    """k-means vector quantization of K and V per (layer, KV head): integer codes, fixed codebooks, recent window."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        return wrap_store(ClusterLayer(spec, self.cfg), self.cfg, self)

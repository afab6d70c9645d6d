"""`int8`, `int4`, `int2`, `quant`: KIVI-style asymmetric low-bit KV cache with a full-precision recent window.

Layout of one layer (B batch, H KV heads, D head_dim, P = 8 // bits codes per byte, G = group_size,
Gv = value group, see kernels/quant.py):

    tokens [0, n_quant)              quantized: k_codes/v_codes uint8 [B, H, cap, D/P]
                                     k_scale/k_zero [B, H, cap/G, D]  (per channel, per group of G tokens)
                                     v_scale/v_zero [B, H, cap, D/Gv] (per token, per group of Gv channels)
    tokens [n_quant, length)         residual: k_res/v_res [B, H, residual + G, D] in the model dtype

Appends go to the residual window; once it holds `residual + G` tokens or more, its oldest whole groups of G
tokens are quantized (keys need G tokens to form a per-channel group), so between `residual` and
`residual + G - 1` of the most recent tokens stay exact (fewer only right after a truncation, and all of them
before the first G + residual tokens). A prompt is attended at full precision by the engine's prefill and
quantized once when it is appended. A decode-sized append (up to DEFER tokens: a decode step, a verify block) is
quantized after it attended (`observe`), so the step that fills the window still sees it exact: the rule the static
decode step follows, whose host side quantizes a full window after the step (`set_length`).

Truncation (speculative-decoding rollback), `truncate(length)`:
- inside the residual window (length >= n_quant): exact, the dropped tokens are simply forgotten;
- inside the quantized region: values are per token, so their codes are cut at `length`; keys share scales in
  groups of G tokens, so the partially kept group [G*floor(length/G), length) is dequantized back into the
  residual window. Every kept token reads exactly as before (attention sees the same numbers); when those tokens
  are later quantized again with the new group's range they pick up a second rounding.

On CUDA, `attend` runs the fused decode (kernels/kv_quant_decode.py: the Gluon MMA kernel of kv_quant_decode_mma.py
where it applies, the Triton-language kernel otherwise) over the packed codes along the attention backend's decode
schedule; on the CPU it returns None and the backend attends over `dense()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheCodec, CacheLayer, LayerSpec, once_per_step
from ollm_triton.cache.residual import ResidualWindow
from ollm_triton.cache.storage import StoredCodec, StoreParams, wrap_store
from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.attention_schedule import DecodeSchedule
from ollm_triton.kernels.kv_quant_decode import quant_decode, quant_decode_varlen, quant_decode_varlen_ref
from ollm_triton.kernels.rope import rope_write_kv
from ollm_triton.registry import register
from ollm_triton.timing import Timer

DEFER = 16  # appends of up to this many tokens (decode steps, verify blocks) are quantized after they attended
# dense() decodes the quantized tokens this many at a time (rounded down to whole key groups) into its output: the
# reference dequantization's int32 / float32 intermediates (~13 bytes an element) then span one slice, not the whole
# cache (a later prompt chunk reads the cache back through dense(): at 128k tokens on Llama-3-8B shapes ~1.7 GB a layer)
DENSE_SLICE = 8192


@dataclass
class QuantParams(StoreParams):
    group_size: int = 128  # tokens per key group = channels per value group (capped at head_dim)
    residual: int = 128  # most recent tokens kept in the model dtype
    symmetric: bool = False  # scale only (code - 2**(bits-1)) * scale, no zero point
    preallocate: bool = True  # codes and scales for max_len tokens up front

    def check(self) -> None:
        super().check()
        g = self.group_size
        if g < 16 or g > 4096 or g & (g - 1):
            raise ValueError(f"group_size must be a power of two in [16, 4096], got {g}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")


@dataclass
class QuantConfig(QuantParams):
    bits: int = 4  # 8 | 4 | 2

    def check(self) -> None:
        super().check()
        if self.bits not in Q.BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, Q.BITS))}, got {self.bits}")


class QuantLayer(ResidualWindow, CacheLayer):
    # key tokens per block of the fused kernel (divides group_size): 128 was the fastest of 32/64/128 for int8 and
    # int4 at 128k tokens on the H200 (int8 0.187 ms vs 0.271 ms at 64; scripts/bench_kv_cache.py --sweep)
    block_k = 128
    kernel_options: dict = {}  # launch overrides for the fused kernels (benchmarks); VARLEN_ONLY: the static step's
    VARLEN_ONLY = ("min_blocks", "res_chunk")

    def __init__(self, spec: LayerSpec, bits: int, cfg: QuantParams):
        super().__init__(spec)
        d = spec.head_dim
        self.bits, self.p = bits, Q.codes_per_byte(bits)
        if d % self.p:
            raise ValueError(f"{bits}-bit packing needs head_dim divisible by {self.p}, got {d}")
        self.group, self.residual, self.symmetric = cfg.group_size, cfg.residual, cfg.symmetric
        self.value_group = Q.value_group_size(cfg.group_size, d)
        self.sdtype = Q.scale_dtype_for(spec.dtype)
        self.block_k = min(type(self).block_k, self.group)
        self.n_quant = 0
        self.n_res = 0
        self.last_path = "none"
        cap = -(-spec.max_len // self.group) * self.group if cfg.preallocate else 0
        self._alloc_quant(cap)
        b, h = spec.batch, spec.kv_heads
        # a deferred decode block (DEFER tokens) on top of a window one short of full; slot residual + group is
        # the static step's spare slot for idle rows (scratch_from), which its rows never reach
        res_cap = self.residual + self.group - 1 + DEFER
        self.k_res = torch.empty(b, h, res_cap, d, dtype=spec.dtype, device=spec.device)
        self.v_res = torch.empty_like(self.k_res)

    # -- storage -------------------------------------------------------------------------------------------------

    def _alloc_quant(self, cap: int, old: QuantLayer | None = None) -> None:
        s = self.spec
        b, h, d = s.batch, s.kv_heads, s.head_dim
        new = lambda *shape, dtype: torch.empty(b, h, *shape, dtype=dtype, device=s.device)  # noqa: E731
        bufs = {
            "k_codes": new(cap, d // self.p, dtype=torch.uint8),
            "v_codes": new(cap, d // self.p, dtype=torch.uint8),
            "k_scale": new(cap // self.group, d, dtype=self.sdtype),
            "v_scale": new(cap, d // self.value_group, dtype=self.sdtype),
            "k_zero": None if self.symmetric else new(cap // self.group, d, dtype=self.sdtype),
            "v_zero": None if self.symmetric else new(cap, d // self.value_group, dtype=self.sdtype),
        }
        for name, buf in bufs.items():
            if old is not None and buf is not None:  # keep what is held when growing
                n = self.n_quant // self.group if name == "k_scale" or name == "k_zero" else self.n_quant
                buf[:, :, :n] = getattr(self, name)[:, :, :n]
            setattr(self, name, buf)
        self.cap = cap

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize n (a multiple of G) tokens k, v: [B, H, n, D] into the slots after n_quant."""
        n = k.shape[2]
        lo, hi = self.n_quant, self.n_quant + n
        if hi > self.cap and self.shared:
            raise ValueError(f"a row of static buffers holds at most {self.cap} quantized tokens, asked for {hi}")
        if hi > self.cap:  # grow geometrically, in whole groups
            self._alloc_quant(max(hi, 2 * self.cap, 4 * self.group), old=self)
        g0, g1 = lo // self.group, hi // self.group
        k_out = (self.k_codes[:, :, lo:hi], self.k_scale[:, :, g0:g1],
                 None if self.symmetric else self.k_zero[:, :, g0:g1])
        v_out = (self.v_codes[:, :, lo:hi], self.v_scale[:, :, lo:hi],
                 None if self.symmetric else self.v_zero[:, :, lo:hi])
        with self.encode_timer.region():
            if k.is_cuda:
                Q.quantize_keys(k, self.bits, self.group, self.symmetric, self.sdtype, out=k_out)
                Q.quantize_values(v, self.bits, self.value_group, self.symmetric, self.sdtype, out=v_out)
            else:
                for dst, src in ((k_out, Q.quantize_keys_ref(k, self.bits, self.group, self.symmetric, self.sdtype)),
                                 (v_out, Q.quantize_values_ref(v, self.bits, self.value_group, self.symmetric,
                                                               self.sdtype))):
                    for d_t, s_t in zip(dst, src, strict=True):
                        if d_t is not None:
                            d_t.copy_(s_t)
        self.n_quant = hi

    # -- CacheLayer ----------------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self.n_quant + self.n_res

    @property
    def compressed_tokens(self) -> int:
        return self.n_quant

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        if t == 0:
            return
        if t <= DEFER and self.n_res + t <= self.residual + self.group - 1 + DEFER:
            # a decode-sized block waits in the window until it has attended (`observe` quantizes), exactly as the
            # static decode step, which quantizes a full window after the step
            self.k_res[:, :, self.n_res : self.n_res + t] = k
            self.v_res[:, :, self.n_res : self.n_res + t] = v
            self.n_res += t
        else:
            self._append_through_residual(k, v, self.residual, self.group)
        self.appended += t

    def observe(self, q: torch.Tensor) -> None:
        """After the step attended: quantize the window's oldest whole groups once it holds residual + group."""
        if self.n_res >= self.residual + self.group:
            self._append_through_residual(self.k_res[:, :, :0], self.v_res[:, :, :0], self.residual, self.group)

    def _dequant(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values of the quantized tokens [lo, hi) (lo a multiple of G)."""
        d, dt, g = self.spec.head_dim, self.spec.dtype, self.group
        g0, g1 = lo // g, -(-hi // g)
        kz = None if self.symmetric else self.k_zero[:, :, g0:g1]
        k = Q.dequantize_keys_ref(self.k_codes[:, :, g0 * g : g1 * g], self.k_scale[:, :, g0:g1], kz, self.bits, g, d,
                                  self.symmetric, dt)[:, :, : hi - lo]
        vz = None if self.symmetric else self.v_zero[:, :, lo:hi]
        v = Q.dequantize_values_ref(self.v_codes[:, :, lo:hi], self.v_scale[:, :, lo:hi], vz, self.bits,
                                    self.value_group, d, self.symmetric, dt)
        return k, v

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token in the model dtype; beyond one slice (DENSE_SLICE) written slice by slice into one output
        per K and V."""
        k_res, v_res = self.k_res[:, :, : self.n_res], self.v_res[:, :, : self.n_res]
        nq = self.n_quant
        if nq == 0:
            return k_res, v_res
        step = max(DENSE_SLICE // self.group, 1) * self.group
        if nq <= step:  # one slice: decoded whole, then joined with the window (the fewest bytes held at once)
            k, v = self._dequant(0, nq)
            return torch.cat((k, k_res), dim=2), torch.cat((v, v_res), dim=2)
        s = self.spec
        k = torch.empty(s.batch, s.kv_heads, nq + self.n_res, s.head_dim, dtype=s.dtype, device=s.device)
        v = torch.empty_like(k)
        for lo in range(0, nq, step):
            hi = min(lo + step, nq)
            k[:, :, lo:hi], v[:, :, lo:hi] = self._dequant(lo, hi)
        k[:, :, nq:], v[:, :, nq:] = k_res, v_res
        return k, v

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if length >= self.n_quant:
            self.n_res = length - self.n_quant
        else:
            g0 = length // self.group * self.group
            keep = length - g0
            if keep:  # the partly kept key group goes back to full precision (see the module docstring)
                k, v = self._dequant(g0, length)
                self.k_res[:, :, :keep] = k
                self.v_res[:, :, :keep] = v
            self.n_quant, self.n_res = g0, keep
        self.appended = length

    def attend(self, q: torch.Tensor, backend) -> torch.Tensor | None:
        if not q.is_cuda:
            self.last_path = "torch.dense"
            return None
        kv_len = self.length
        sched = decode_schedule(backend, kv_len, self.block_k, q.shape[2])
        if sched is None:
            self.last_path = "torch.dense"
            return None
        self.last_path = "triton.quant_decode"
        return quant_decode(
            q, self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.k_res,
            self.v_res, n_quant=self.n_quant, kv_len=kv_len, bits=self.bits, key_group=self.group,
            value_group=self.value_group, block_ids=sched.block_ids, window=sched.window, sink=sched.sink,
            block_k=self.block_k, **{k: v for k, v in self.kernel_options.items() if k not in self.VARLEN_ONLY},
        )

    # -- the static decode step (Quant.static_decode) ----------------------------------------------------------------
    # Appends quantize the oldest whole groups once the residual window holds residual + group tokens, whatever the
    # chunking, so a layer that was never truncated holds exactly `quantized_for(length)` quantized tokens: the step
    # computes each row's split point from its position on the device, and `set_length` quantizes a group on the
    # host when a row's window fills (`sync_due`: once every `group` steps a row; the other steps need no host call).
    static_kernel = "quant_decode_varlen"
    shared = False  # a row view of another layer's buffers: it must never re-allocate them

    def quantized_for(self, length):
        """Quantized tokens of a layer holding `length` tokens (an int, or a tensor of lengths)."""
        r, g = self.residual, self.group
        if isinstance(length, torch.Tensor):
            return (torch.div(length - r, g, rounding_mode="floor") * g).clamp_min(0)
        return max((length - r) // g * g, 0)

    def static_decode(self, q, k, v, cos, sin, pos, *, kernels: bool, shared: dict | None = None, window: int = 0,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
        """The new token of row b goes to the residual window at pos[b] - quantized_for(pos[b]); the fused decode
        attends the row's codes and window with the row's lengths read on the device (over its last `window` keys,
        with the layer's `sinks`: gpt-oss' own rule, Quant.static_window_sinks). The split points, slots and
        lengths are the same for every layer of a step: computed by the first (`shared`)."""
        n_quant, slot, lengths = once_per_step(shared, ("quant", self.residual, self.group, self.scratch_from),
                                       lambda: self._split(pos))
        q_rot = rope_write_kv(q, k, v, cos, sin, self.k_res, self.v_res, slot, use_kernel=kernels)
        store = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.k_res,
                 self.v_res)
        kw = dict(bits=self.bits, key_group=self.group, value_group=self.value_group, window=window, sinks=sinks)
        if kernels:
            opts = {k: v for k, v in self.kernel_options.items()
                    if k in ("num_splits", "num_warps", "num_stages", "kernel", "mma_block_n", "mma_maxnreg",
                             "mma_stages", "programs_per_sm", *self.VARLEN_ONLY)}
            return quant_decode_varlen(q_rot, *store, n_quant, lengths, block_k=self.block_k, **kw, **opts)
        return quant_decode_varlen_ref(q_rot, *store, n_quant.tolist(), lengths.tolist(), **kw)

    def _split(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized tokens, residual slot of the new token, lengths after it) of rows at `pos`."""
        n_quant = self.quantized_for(pos)
        slot, lengths = pos - n_quant, pos + 1
        if self.scratch_from is not None:  # idle rows write to the spare slot, never into a row being prefilled,
            idle = pos >= self.scratch_from  # and attend one key of their window (see CacheLayer.scratch_from)
            slot = torch.where(idle, self.residual + self.group, slot)
            n_quant, lengths = torch.where(idle, 0, n_quant), torch.where(idle, 1, lengths)
        return n_quant, slot, lengths

    def sync_due(self, length: int) -> bool:
        """The step that brought the row to `length` filled its window: the oldest group must be quantized now."""
        return length - self.n_quant >= self.residual + self.group

    def set_length(self, length: int) -> None:
        """The static step wrote tokens into the residual window up to `length`: take that as the fill level, and
        quantize the window's oldest group once it is full. Lengths between two due ones (`sync_due`) may be
        skipped: the window only fills up until then."""
        n_res = length - self.n_quant
        if not 0 <= n_res <= self.residual + self.group or self.n_quant != self.quantized_for(length - 1):
            raise ValueError(f"fill level {length} does not follow {self.length} tokens with {self.n_quant} quantized "
                             "(a quantized layer must be told each length its sync_due flags, once, and not after "
                             "truncation)")
        self.n_res, self.appended = n_res, length
        if n_res >= self.residual + self.group:
            self.observe(None)

    def row_view(self, start: int, stop: int) -> QuantLayer:
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        s = self.spec
        view.spec = LayerSpec(batch=stop - start, kv_heads=s.kv_heads, head_dim=s.head_dim, dtype=s.dtype,
                              device=s.device, max_len=s.max_len)
        for name in ("k_codes", "v_codes", "k_scale", "v_scale", "k_zero", "v_zero", "k_res", "v_res"):
            buf = getattr(self, name)
            setattr(view, name, None if buf is None else buf[start:stop])
        view.n_quant = view.n_res = view.appended = 0
        view.encode_timer = Timer(s.device)
        view.shared = True
        return view

    def zero_storage(self) -> None:
        for name in ("k_codes", "v_codes", "k_scale", "v_scale", "k_zero", "v_zero", "k_res", "v_res"):
            buf = getattr(self, name)
            if buf is not None:
                buf.zero_()

    def stored_bytes(self) -> int:
        s = self.spec
        bh, d, n = s.batch * s.kv_heads, s.head_dim, self.n_quant
        sb = torch.empty((), dtype=self.sdtype).element_size()
        per_scale = 1 if self.symmetric else 2  # scale (+ zero point)
        codes = 2 * n * (d // self.p)
        scales = per_scale * sb * (n // self.group * d + n * (d // self.value_group))
        residual = 2 * self.n_res * d * self.k_res.element_size()
        return bh * (codes + scales + residual)


def decode_schedule(backend, kv_len: int, block_k: int, t: int) -> DecodeSchedule | None:
    """The backend's schedule for the T newest queries, or None when a fused kernel cannot follow it (the backend
    has none for codec kernels, or its queries span rows of a sparse pattern). Block ids stay on the host: the
    kernel launcher counts its quantized blocks without a device sync."""
    try:
        return backend.decode_schedule(kv_len, block_k, num_queries=t, device=None)
    except ValueError:  # queries spanning two pattern rows: no one block list serves them all
        return None


@register("cache", "quant", QuantConfig)
class Quant(StoredCodec, CacheCodec):
    """KIVI-style K/V quantization (keys per channel, values per token) to `bits`, full-precision recent window."""

    bits: int | None = None  # fixed by the int8/int4/int2 names

    static_sync = True  # QuantLayer.set_length quantizes a full residual window after a static step

    def __init__(self, cfg: QuantParams):
        self.cfg = cfg

    @property
    def static_decode(self) -> bool:
        """Pre-allocated codes on the device: the static step writes the residual window and runs the fused
        decode in place (QuantLayer.static_decode)."""
        return self.cfg.preallocate and self.cfg.store == "device"

    @property
    def static_window_sinks(self) -> bool:
        """QuantLayer.static_decode attends over a layer's sliding window (quantized blocks wholly before it are
        skipped) with its sinks (the split merge's sink term)."""
        return self.static_decode

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        return wrap_store(QuantLayer(spec, self._bits(), self.cfg), self.cfg, self)

    def _bits(self) -> int:
        return self.bits if self.bits is not None else self.cfg.bits

    def bytes_per_token(self, spec: LayerSpec) -> float:
        """Codes plus each token's share of the key (per group) and value (per token) scales and zero points."""
        d, bits = spec.head_dim, self._bits()
        sb = torch.empty((), dtype=Q.scale_dtype_for(spec.dtype)).element_size()
        per_scale = 1 if self.cfg.symmetric else 2
        group = self.cfg.group_size
        scales = per_scale * sb * (d / group + d / Q.value_group_size(group, d))
        return spec.batch * spec.kv_heads * (2 * d * bits / 8 + scales)

    def bytes_for(self, spec: LayerSpec, tokens: int) -> float:
        """Up to residual + group - 1 newest tokens stay in the model dtype; the rest are codes."""
        exact = min(tokens, self.cfg.residual + self.cfg.group_size - 1)
        dense = 2.0 * spec.batch * spec.kv_heads * spec.head_dim * torch.empty((), dtype=spec.dtype).element_size()
        return exact * dense + (tokens - exact) * self.bytes_per_token(spec)


@register("cache", "int8", QuantParams)
class Int8(Quant):
    """8-bit KIVI K/V cache (keys per channel, values per token, groups of group_size) with a full-precision window."""

    bits = 8


@register("cache", "int4", QuantParams)
class Int4(Quant):
    """4-bit KIVI K/V cache (two codes a byte) with scale/zero per group and a full-precision recent window."""

    bits = 4


@register("cache", "int2", QuantParams)
class Int2(Quant):
    """2-bit KIVI K/V cache (four codes a byte) with scale/zero per group and a full-precision recent window."""

    bits = 2

"""Prefill flash attention driven by a block schedule, and its PyTorch reference.

    q: [B, Hq, T, D]   k, v: [B, Hkv, S, D]   out: [B, Hq, T, D]   (Hq % Hkv == 0; D a power of two 16..128)

One program computes one query tile (BLOCK_M absolute positions) of one query head. Query heads of one KV head
read the same K/V rows (no repeated K/V in memory; the programs of a group run next to each other so the second
to fourth reads come from L2). The program walks the tiles its schedule row lists: the fully visible ones without
any mask, then the boundary ones with the element rules (causal, window + sink, tree). Softmax runs online in
fp32 in the exp2 domain; P is cast to the input dtype for the PV product as every flash kernel does.

Per-head sink logits (gpt-oss: `sinks` [Hq], natural-log units) are one more term of each row's softmax
denominator, exp(sinks[h]), that takes probability mass and adds nothing to the numerator: the epilogue folds
sinks[h] * log2(e) into the running max and l before the division (the kernel's own scaled exp2 domain), so a row
costs one load and two exp2 more. With the model's per-layer sliding window as the schedule's window (sink 0), the
kernel computes gpt-oss attention exactly, without the float32 score matrices of the PyTorch path.

Multi-scale attention adds "summary keys" (mean-pooled K/V of whole blocks, see attention_multiscale.py): extra
keys with a per-key rule, visited after the exact tiles in the same online softmax.

Variants of the same kernel (constexpr switches chosen by `PrefillConfig`; every schedule, window, sink, tree and
summary case runs on each of them, the element rules are per row, so none needs its own path):
    kv_desc          K/V tiles through host-side tensor descriptors (TMA on sm_90; `triton.tools.tensor_descriptor`,
                     Triton >= 3.4). The pointer path stays for older GPUs and for views TMA cannot describe.
                     Summary keys keep pointer loads (a short tail loop, not the hot path).
    pack_gqa         one program takes the GROUP query heads of one KV head: its M rows are GROUP x (block_m of the
                     schedule) positions, so a K/V tile is loaded once for the whole group.
Not here: `tl.range(..., warp_specialize=True)`. Triton 3.6 runs its Hopper warp-specialization pass on such
loops for sm_90, but compiling this kernel for sm_90 (bundled ptxas, no GPU) left the 8-warp kernel unchanged (no
warp_specialize region in the TTGIR) and crashed the pass at 4 warps (an MLIR dominance assertion in
NVGPUWarpSpecialization), with or without the schedule's index load; on sm_100 it needs Triton >= 3.4.
Nor a counted range for rows whose full tiles are contiguous (no index load per tile): a run-time choice between
two pipelined loops took 288 KB of shared memory on sm_90 (each loop keeps its own buffers), past the 227 KB limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton keeps the pointer path
    TensorDescriptor = None

from ollm_triton.kernels.attention_schedule import BlockSchedule, window_start

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class SummaryKeys:
    """Extra keys attended after the exact ones (multi-scale summaries).

    k, v: [B, Hkv, N, D]. Per summary key e: pool size f[e], the next coarser pool size f_next[e] (2**30 for the
    coarsest), block index j[e] (the summary covers keys [j*f, (j+1)*f)). meta: int32 [3, N] = (f, f_next, j).
    A summary is visible to the query at position p iff, with E = max(p - window + 1, 0),
    floor(E / f_next) * f_next <= j * f and (j + 1) * f <= floor(E / f) * f. Its logit gets + ln(f) so that a
    block of identical keys weighs as much as its f exact copies.
    """

    k: torch.Tensor
    v: torch.Tensor
    meta: torch.Tensor

    @property
    def count(self) -> int:
        return self.k.shape[2]


# --------------------------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _online_softmax_step(acc, l_i, m_i, b_s, b_v, qk_scale):
    """One tile of the online softmax: b_s [BM, BN] raw scores q.k (masked ones -inf), b_v [BN, D]; m_i, l_i
    in log2 units. Scaling inside exp2's argument makes it one FMA per score (the softmax, not the dots, bounds
    flash attention on Hopper)."""
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    b_p = tl.exp2(b_s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)  # [BM, BN] @ [BN, D] -> [BM, D]
    return acc, l_i, m_new


@triton.jit
def _attn_tile(
    acc, l_i, m_i, b_q, i_k, K, V, base_k, base_v, stride_ks, stride_vs,
    o_p, o_t, m_t, lo, T, S, sink, qk_scale, TREE, stride_tree,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_TREE: tl.constexpr, DOT_PREC: tl.constexpr, KV_DESC: tl.constexpr,
):
    """KV tile i_k of one row of the schedule. base_k/base_v: the head's first row (descriptors) or pointer."""
    o_n = tl.arange(0, BLOCK_N)
    o_s = i_k * BLOCK_N + o_n
    m_s = o_s < S
    if KV_DESC:
        # Rows past S belong to the next head (or are zero padding past the view): the scores of those keys are
        # masked below, and their V rows are zeroed so that non-finite bytes there cannot reach 0 * V.
        b_k = K.load([base_k + i_k * BLOCK_N, 0])
        b_v = V.load([base_v + i_k * BLOCK_N, 0])
        if MASKED:
            b_v = tl.where(m_s[:, None], b_v, 0.0)
    else:
        o_d = tl.arange(0, HEAD_DIM)
        b_k = tl.load(base_k + o_s[:, None] * stride_ks + o_d[None, :], mask=m_s[:, None], other=0.0)
        b_v = tl.load(base_v + o_s[:, None] * stride_vs + o_d[None, :], mask=m_s[:, None], other=0.0)
    b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)  # [BM, D] @ [D, BN] -> [BM, BN]
    if MASKED:
        m_vis = m_s[None, :]
        if CAUSAL:
            m_causal = o_s[None, :] <= o_p[:, None]
            if HAS_TREE:
                # The trailing T keys follow the tree mask instead of the causal triangle.
                tail = S - T
                m_tail = o_s >= tail
                b_tree = tl.load(TREE + o_t[:, None] * stride_tree + (o_s - tail)[None, :],
                                 mask=m_t[:, None] & (m_tail & m_s)[None, :], other=0)
                m_causal = tl.where(m_tail[None, :], b_tree != 0, m_causal)
            m_vis = m_vis & m_causal
        if HAS_WINDOW:
            m_vis = m_vis & ((o_s[None, :] < sink) | (o_s[None, :] >= lo[:, None]))
        b_qk = tl.where(m_vis, b_qk, float("-inf"))
    return _online_softmax_step(acc, l_i, m_i, b_qk, b_v, qk_scale)


@triton.jit
def _attn_list(
    acc, l_i, m_i, b_q, p_list, j_start, j_end, K, V, base_k, base_v, stride_ks, stride_vs,
    o_p, o_t, m_t, lo, T, S, sink, qk_scale, TREE, stride_tree,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_TREE: tl.constexpr, DOT_PREC: tl.constexpr, KV_DESC: tl.constexpr,
):
    """The tiles listed in p_list[j_start:j_end]."""
    for j in range(j_start, j_end):
        i_k = tl.load(p_list + j)
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, b_q, i_k, K, V, base_k, base_v, stride_ks, stride_vs,
            o_p, o_t, m_t, lo, T, S, sink, qk_scale, TREE, stride_tree,
            BLOCK_N, HEAD_DIM, MASKED, CAUSAL, HAS_WINDOW, HAS_TREE, DOT_PREC, KV_DESC)
    return acc, l_i, m_i


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, b_q, p_list, j_start, j_end, K, V, base_k, base_v, stride_ks, stride_vs,
    o_p, o_t, m_t, T, S, window, sink, window_align, qk_scale, TREE, stride_tree,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_TREE: tl.constexpr, DOT_PREC: tl.constexpr, KV_DESC: tl.constexpr,
):
    lo = o_p
    if HAS_WINDOW:
        # First key of each row's window; sinks stay visible below it.
        lo = (tl.maximum(o_p - window + 1, 0) // window_align) * window_align
    return _attn_list(
        acc, l_i, m_i, b_q, p_list, j_start, j_end, K, V, base_k, base_v, stride_ks, stride_vs,
        o_p, o_t, m_t, lo, T, S, sink, qk_scale, TREE, stride_tree,
        BLOCK_N, HEAD_DIM, MASKED, CAUSAL, HAS_WINDOW, HAS_TREE, DOT_PREC, KV_DESC)


@triton.jit(do_not_specialize=["T", "S", "q_offset", "window", "sink", "window_align", "n_sum", "max_visits"])
def _attn_prefill_kernel(
    Q, K, V, O, KV_BLOCKS, KV_FULL, KV_TOTAL, TREE, KS, VS, SUM_META, SINKS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ot, stride_ksb, stride_ksh, stride_kss, stride_vsb, stride_vsh, stride_vss,
    stride_tree, Hq, T, S, q_offset, window, sink, window_align, n_sum, max_visits, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TREE: tl.constexpr, HAS_SUMMARY: tl.constexpr,
    DOT_PREC: tl.constexpr, KV_DESC: tl.constexpr = False,
    PACK_GQA: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
):
    """KV_DESC: K and V are 2-D tensor descriptors over rows of D, and stride_k*/stride_v* (b, h) count rows.
    PACK_GQA: program axis 0 is (batch, KV head) and row r of the tile is head GROUP * kvh + r // POS at the
    r % POS-th position of schedule tile i_m (POS = BLOCK_M // GROUP = the schedule's block_m).
    HAS_SINKS: SINKS [Hq] logits (natural-log units), one more denominator term per head."""
    i_bh = tl.program_id(0)
    # Heaviest (last) query tiles first: under causal masking they have the most KV tiles, so the tail of the
    # grid is made of short programs.
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    o_r = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        POS: tl.constexpr = BLOCK_M // GROUP
        n_kvh = Hq // GROUP
        i_b = i_bh // n_kvh
        i_kvh = i_bh % n_kvh
        o_h = i_kvh * GROUP + o_r // POS  # [BM] query head of each row
        o_p = (q_offset // POS + i_m) * POS + o_r % POS  # absolute query positions
    else:
        i_b = i_bh // Hq
        o_h = i_bh % Hq
        i_kvh = o_h // GROUP
        o_p = (q_offset // BLOCK_M + i_m) * BLOCK_M + o_r
    o_t = o_p - q_offset  # query index within this call
    m_t = (o_t >= 0) & (o_t < T)
    o_d = tl.arange(0, HEAD_DIM)
    o_q = i_b.to(tl.int64) * stride_qb + o_h.to(tl.int64) * stride_qh + o_t.to(tl.int64) * stride_qt  # [BM]
    b_q = tl.load(Q + o_q[:, None] + o_d[None, :], mask=m_t[:, None], other=0.0)
    if KV_DESC:
        base_k = i_b * stride_kb + i_kvh * stride_kh
        base_v = i_b * stride_vb + i_kvh * stride_vh
    else:
        base_k = K + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh
        base_v = V + i_b.to(tl.int64) * stride_vb + i_kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # A finite start keeps exp2(m_old - m_new) at 1 (not NaN) for rows that have seen only masked keys.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    p_list = KV_BLOCKS + i_m.to(tl.int64) * max_visits
    n_full = tl.load(KV_FULL + i_m)
    n_total = tl.load(KV_TOTAL + i_m)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, b_q, p_list, 0, n_full, K, V, base_k, base_v, stride_ks, stride_vs,
        o_p, o_t, m_t, T, S, window, sink, window_align, qk_scale, TREE, stride_tree,
        BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_TREE, DOT_PREC, KV_DESC)
    # The boundary tiles (one or two a row for dense causal) are not worth a second specialized pipeline.
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, b_q, p_list, n_full, n_total, K, V, base_k, base_v, stride_ks, stride_vs,
        o_p, o_t, m_t, T, S, window, sink, window_align, qk_scale, TREE, stride_tree,
        BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_TREE, DOT_PREC, KV_DESC)

    if HAS_SUMMARY:
        o_n = tl.arange(0, BLOCK_N)
        p_ks = KS + i_b.to(tl.int64) * stride_ksb + i_kvh.to(tl.int64) * stride_ksh
        p_vs = VS + i_b.to(tl.int64) * stride_vsb + i_kvh.to(tl.int64) * stride_vsh
        b_e = tl.maximum(o_p - window + 1, 0)  # start of each row's exact window before alignment
        for j in range(0, tl.cdiv(n_sum, BLOCK_N)):
            o_e = j * BLOCK_N + o_n
            m_e = o_e < n_sum
            b_k = tl.load(p_ks + o_e[:, None] * stride_kss + o_d[None, :], mask=m_e[:, None], other=0.0)
            b_v = tl.load(p_vs + o_e[:, None] * stride_vss + o_d[None, :], mask=m_e[:, None], other=0.0)
            b_f = tl.load(SUM_META + o_e, mask=m_e, other=1)
            b_fn = tl.load(SUM_META + n_sum + o_e, mask=m_e, other=1)
            b_j = tl.load(SUM_META + 2 * n_sum + o_e, mask=m_e, other=0)
            b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)  # [BM, D] @ [D, BN] -> [BM, BN]
            b_qk += (tl.log2(b_f.to(tl.float32)) / qk_scale)[None, :]  # a summary stands for f keys
            m_vis = m_e[None, :] & (b_j[None, :] < b_e[:, None] // b_f[None, :])
            m_vis = m_vis & (b_j[None, :] * b_f[None, :] >= (b_e[:, None] // b_fn[None, :]) * b_fn[None, :])
            b_qk = tl.where(m_vis, b_qk, float("-inf"))
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, b_qk, b_v, qk_scale)

    if HAS_SINKS:
        # The sink as one more key of score sinks[h] and value 0, in the log2 domain of m_i (scores * qk_scale).
        # Raising the max to it first keeps exp2 finite whatever the sign and size of the logit.
        b_sink = tl.load(SINKS + o_h + tl.zeros([BLOCK_M], tl.int32)).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, b_sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(b_sink - m_new)
        acc = acc * alpha[:, None]
    # A row with no visible key (an all-False tree row; under a sink only the sink) outputs zeros, like the
    # reference.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    o_o = i_b.to(tl.int64) * stride_ob + o_h.to(tl.int64) * stride_oh + o_t.to(tl.int64) * stride_ot  # [BM]
    tl.store(O + o_o[:, None] + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_t[:, None])


# --------------------------------------------------------------------------------------------------------------
# Launcher


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles, launch and kernel variant of one call. block_m: query positions per schedule tile (with pack_gqa the
    kernel's M is block_m x the GQA group); the flags are the variants of the module docstring."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kv_desc: bool = False
    pack_gqa: bool = False


# The long-call candidates that scripts/bench_prefill.py times side by side (bf16/fp16, head_dim 128, sm_90).
# "base" is the configuration measured on the H200 before these variants existed (425 / 438 TFLOP/s at 8k / 32k,
# experiments/attention/README.md); the rest are untimed on a GPU when written. pack_gqa entries give block_m per
# head for a group of 4 (32 x 4 = 128 rows); prefill_config rescales it to the call's group.
PREFILL_VARIANTS: dict[str, PrefillConfig] = {
    "base": PrefillConfig(128, 128, 8, 2),
    "base_s3": PrefillConfig(128, 128, 8, 3),
    "tma": PrefillConfig(128, 128, 8, 2, kv_desc=True),
    "tma_s3": PrefillConfig(128, 128, 8, 3, kv_desc=True),
    "pack": PrefillConfig(32, 128, 8, 2, pack_gqa=True),
    "pack_tma": PrefillConfig(32, 128, 8, 2, kv_desc=True, pack_gqa=True),
    "pack_tma_s3": PrefillConfig(32, 128, 8, 3, kv_desc=True, pack_gqa=True),
}
# The one edit that picks the winner for long fp16/bf16 calls on sm_90+ (a name in PREFILL_VARIANTS): tensor-
# descriptor K/V with 3 stages was the fastest at 8k and 32k on the H100, 464 / 485 TFLOP/s against base's 428 / 445
# (experiments/attention/README.md, "Prefill variants").
LONG_PREFILL_VARIANT = "tma_s3"
PACKED_ROWS = 128  # kernel M of a packed tile; 256 rows of fp32 accumulator would not fit the register file


def prefill_config(head_dim: int, dtype: torch.dtype, q_len: int = 1 << 20, device: torch.device | str | None = None,
                   group: int = 1) -> PrefillConfig:
    """Tile sizes and variant for a call. fp16/bf16: 128x128 tiles, 8 warps, 2 stages. Measured on the H200 (bf16,
    d=128, 32/8 heads, causal; experiments/attention/README.md): 425 TFLOP/s at 8k and 438 at 32k, against 369/367
    for 128x64 tiles with 3 stages (434/449 with 3 stages at 128x128: 229 KB of shared memory, at the limit); on
    sm_90 it compiles to wgmma with 250 registers, no spills, 160 KB of shared memory (aot_compile.py beside the
    README). fp32 (3xTF32 dots) uses 64x32 tiles; calls of few queries use 64- or 16-row tiles (64 rows with 4 warps
    spill, with 8 they take 139 registers). Long fp16/bf16 calls on a GPU of compute capability >= 9 take
    LONG_PREFILL_VARIANT (tensor descriptors need sm_90); `group` (query heads per KV head) sizes packed tiles."""
    if dtype == torch.float32:
        return PrefillConfig(64 if q_len > 16 else 16, 32, 4, 2)
    if q_len <= 16:
        return PrefillConfig(16, 64, 4, 3)
    if q_len <= 64:
        return PrefillConfig(64, 64, 8, 3)
    cfg = PREFILL_VARIANTS["base"]
    if _capability(device) >= 9:
        cfg = PREFILL_VARIANTS[LONG_PREFILL_VARIANT]
    if cfg.pack_gqa:
        if group > 1 and PACKED_ROWS % group == 0:
            return replace(cfg, block_m=PACKED_ROWS // group)
        return replace(cfg, block_m=PACKED_ROWS, pack_gqa=False)
    return cfg


def _capability(device) -> int:
    """Major compute capability of a CUDA device, 0 for anything else (the CPU interpreter)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_capability(torch.device(device))[0]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use 3xTF32 (fp32-accurate on tensor cores; plain "ieee" fp32 dots spill thousands of bytes)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One-line ValueErrors for shapes the kernels do not take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")


def check_sinks(sinks: torch.Tensor | None, heads: int, device) -> torch.Tensor | None:
    """sinks as the kernels read them (a contiguous [Hq] on the device), or a one-line ValueError."""
    if sinks is None:
        return None
    if sinks.shape != (heads,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be floating-point [Hq] = [{heads}] logits, got {sinks.dtype} "
                         f"{tuple(sinks.shape)}")
    return sinks.detach().to(device).contiguous()


def kernel_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the Triton path takes these tensors (head_dim a power of two 16..128; fp16/bf16/fp32)."""
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32) \
        and k.dtype == q.dtype


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _describable(x: torch.Tensor, block_n: int) -> bool:
    """Whether [B, H, S, D] x is one 2-D TMA descriptor over rows of D: rows equally spaced (head and batch strides
    multiples of the row stride), 16-byte aligned base and rows, tile dims within TMA's 256."""
    if TensorDescriptor is None or x.stride(3) != 1 or x.shape[2] < 2:
        return False
    rs = x.stride(2)
    spaced = all(n == 1 or st % rs == 0 for n, st in zip(x.shape[:2], x.stride()[:2], strict=True))
    return rs > 0 and spaced and (rs * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0 \
        and block_n <= 256 and x.shape[3] <= 256


def _row_descriptor(x: torch.Tensor, block_n: int):
    """A descriptor over the rows x spans (row (b, h, s) = b * sb + h * sh + s) and the row strides (sb, sh)."""
    b, h, s, d = x.shape
    rs = x.stride(2)
    sb = x.stride(0) // rs if b > 1 else 0  # the stride of a size-1 dim is arbitrary and never used
    sh = x.stride(1) // rs if h > 1 else 0
    n_rows = (b - 1) * sb + (h - 1) * sh + s
    return TensorDescriptor(x, [n_rows, d], [rs, 1], [block_n, d]), (sb, sh)


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: BlockSchedule,
    *,
    tree_mask: torch.Tensor | None = None,
    summaries: SummaryKeys | None = None,
    scale: float | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q over k, v following `schedule` (built for T = q.shape[2], S = k.shape[2]).

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; tree_mask: bool [T, T] if the schedule has tree=True;
    summaries: extra multi-scale keys; sinks: [Hq] logits, exp(sinks[h]) one more term of head h's softmax
    denominator (gpt-oss). Returns [B, Hq, T, D] in q's dtype (or writes `out`).
    config: the variant to run (default `prefill_config` of the call); its block_m/block_n must be the schedule's.
    A variant the call cannot take falls back quietly: kv_desc without a describable K/V (or before sm_90),
    pack_gqa when block_m x group is not 16..128 rows.
    """
    check_qkv(q, k, v)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if not kernel_supports(q, k):
        raise ValueError(f"the Triton prefill takes head_dim in {SUPPORTED_HEAD_DIMS} and fp16/bf16/fp32, "
                         f"got head_dim={d}, dtypes {q.dtype}/{k.dtype}")
    if (schedule.q_len, schedule.kv_len) != (t, s):
        raise ValueError(f"schedule built for T={schedule.q_len}, S={schedule.kv_len}; called with T={t}, S={s}")
    if schedule.tree != (tree_mask is not None):
        raise ValueError("pass tree_mask exactly when the schedule was built with tree=True")
    sinks = check_sinks(sinks, hq, q.device)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    if out is None:
        out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    tree = tree_mask.to(device=q.device, dtype=torch.int8).contiguous() if tree_mask is not None else q
    has_sum = summaries is not None and summaries.count > 0
    ks = _last_dim_contiguous(summaries.k) if has_sum else k
    vs = _last_dim_contiguous(summaries.v) if has_sum else v
    meta = summaries.meta.to(device=q.device, dtype=torch.int32).contiguous() if has_sum else schedule.kv_total
    group = hq // hkv
    cfg = config or prefill_config(d, q.dtype, t, q.device, group)
    if (cfg.block_m, cfg.block_n) != (schedule.block_m, schedule.block_n):
        if config is not None:
            raise ValueError(f"config tiles {cfg.block_m}x{cfg.block_n} differ from the schedule's "
                             f"{schedule.block_m}x{schedule.block_n}; build the schedule with the config's tiles")
        # A schedule built for other tiles: the plain variant at those tiles.
        cfg = PrefillConfig(schedule.block_m, schedule.block_n, 8 if schedule.block_m >= 64 else 4,
                            2 if schedule.block_n >= 128 or q.dtype == torch.float32 else 3)
    pack = cfg.pack_gqa and group > 1 and 16 <= schedule.block_m * group <= PACKED_ROWS
    rows = schedule.block_m * group if pack else schedule.block_m
    kk, vv, kv_strides = k, v, (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    if cfg.kv_desc and _describable(k, schedule.block_n) and _describable(v, schedule.block_n) \
            and (not q.is_cuda or _capability(q.device) >= 9):
        kk, kr = _row_descriptor(k, schedule.block_n)
        vv, vr = _row_descriptor(v, schedule.block_n)
        kv_strides = (*kr, 1, *vr, 1)
    grid = (b * (hkv if pack else hq), schedule.n_q_tiles)
    _attn_prefill_kernel[grid](
        q, kk, vv, out, schedule.kv_blocks, schedule.kv_full, schedule.kv_total, tree, ks, vs, meta,
        meta if sinks is None else sinks,  # no sinks: any pointer, HAS_SINKS off
        q.stride(0), q.stride(1), q.stride(2), *kv_strides, out.stride(0), out.stride(1), out.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        tree.stride(0) if tree_mask is not None else 0,
        hq, t, s, schedule.q_offset, schedule.window, schedule.sink, schedule.window_align,
        summaries.count if has_sum else 0, schedule.kv_blocks.shape[1], scale * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_M=rows, BLOCK_N=schedule.block_n,
        CAUSAL=schedule.causal, HAS_WINDOW=schedule.window > 0, HAS_TREE=tree_mask is not None,
        HAS_SUMMARY=has_sum, DOT_PREC=dot_precision(q.dtype), KV_DESC=kk is not k,
        PACK_GQA=pack, HAS_SINKS=sinks is not None,
        num_warps=num_warps or cfg.num_warps, num_stages=num_stages or cfg.num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# PyTorch reference


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | Callable[[slice], torch.Tensor],
    *,
    summaries: tuple[torch.Tensor, torch.Tensor, Callable[[slice], torch.Tensor], torch.Tensor] | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    max_scores: int = 1 << 25,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in `compute_dtype` (float64 for tests), returned in q's dtype.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; mask: bool [T, S] (True = visible) or a function of a row slice
    returning that slice of the mask (so a long call is built in pieces of at most `max_scores` scores).
    summaries: (k_sum [B, Hkv, N, D], v_sum, mask function rows -> bool [rows, N], logit bias [N]).
    sinks: [Hq] logits: head h's softmax gets one more column, sinks[h], dropped before the values.
    Rows without a visible key give zeros.
    """
    check_qkv(q, k, v)
    b, hq, t, d = q.shape
    sinks = check_sinks(sinks, hq, q.device)
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask_fn = mask if callable(mask) else (lambda rows: mask[rows])
    # Grouped queries against their KV head, [B, Hkv, G, rows, S]: query head h reads KV head h // G (the
    # repeat_interleave convention) without a G-fold copy of K and V, the largest cost of a CPU decode step here
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)
    if summaries is not None:
        k_sum, v_sum, sum_mask_fn, bias = summaries
        kc = torch.cat((kc, k_sum.to(compute_dtype)), dim=2)
        vc = torch.cat((vc, v_sum.to(compute_dtype)), dim=2)
        bias = torch.cat((torch.zeros(s, dtype=compute_dtype, device=q.device), bias.to(q.device, compute_dtype)))
    qg = q.view(b, hkv, group, t, d)
    out = torch.empty(b, hkv, group, t, d, dtype=compute_dtype, device=q.device)
    step = max(1, max_scores // max(1, b * hq * kc.shape[2]))
    for start in range(0, t, step):
        rows = slice(start, min(t, start + step))
        m = mask_fn(rows).to(q.device)
        if summaries is not None:
            m = torch.cat((m, sum_mask_fn(rows).to(q.device)), dim=1)
        n = rows.stop - rows.start
        qr = qg[:, :, :, rows].to(compute_dtype).reshape(b, hkv, group * n, d)
        scores = (torch.matmul(qr, kc.transpose(-1, -2)) * scale).view(b, hkv, group, n, -1)
        if summaries is not None:
            scores = scores + bias
        scores = scores.masked_fill(~m, float("-inf"))
        if sinks is not None:  # the sink column takes its share of the softmax and is dropped
            sink = sinks.to(compute_dtype).view(1, hkv, group, 1, 1).expand(b, hkv, group, n, 1)
            scores = torch.cat((scores, sink), dim=-1)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
        if sinks is not None:
            weights = weights[..., :-1]
        out[:, :, :, rows] = torch.matmul(weights.reshape(b, hkv, group * n, -1), vc).view(b, hkv, group, n, d)
    out = out.view(b, hq, t, d)
    return out.to(q.dtype)


__all__ = ["flash_prefill", "attention_reference", "prefill_config", "PrefillConfig", "PREFILL_VARIANTS", "SummaryKeys",
           "kernel_supports", "check_qkv", "check_sinks", "dot_precision", "SUPPORTED_HEAD_DIMS", "window_start"]

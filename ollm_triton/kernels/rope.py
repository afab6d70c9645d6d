"""Rotary position embedding fused with the layout change to head-major and (optionally) the KV-cache write.

    q: [B, T, Hq, D]   k, v: [B, T, Hkv, D]   (token-major, as views of the projection outputs)
    cos, sin: [T, D] (shared positions) or [B, T, D] (per-sequence positions), rotate-half layout
    rope_qk(q, k, cos, sin)                         -> q_rot [B, Hq, T, D], k_rot [B, Hkv, T, D]
    rope_write_kv(q, k, v, cos, sin, kc, vc, slots) -> q_rot; writes k_rot and v into kc, vc: [B, Hkv, cap, D]
                                                       at sequence index slots[b] + t

Eager RoPE is ~8 elementwise kernels per tensor (two half slices, a negation, a cat, two products, a sum, then
the transpose copy) plus the cache's copy of K and V: at decode every one of them is a launch for a few KB. The
fused kernel reads q, k, v once and writes q_rot, and K/V straight into the cache, one program per token.

Rounding follows the engine's eager `apply_rope` (x * cos + rotate_half(x) * sin in the input dtype): each product
and the sum are rounded to the input dtype, so bf16 results equal the eager ones bit for bit up to FMA contraction.
Writes at sequence indices >= cap are dropped (the caller sizes the cache; a graph-captured step cannot check).
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "CAP"])
def _rope_kernel(
    Q, K, V, COS, SIN, QO, KO, VO, SLOTS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ct,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kos, stride_vob, stride_voh, stride_vos,
    T, CAP, HQ, HKV, HALF,
    HAS_V: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    i_bt = tl.program_id(0)
    i_b = (i_bt // T).to(tl.int64)
    i_t = i_bt % T
    o_j = tl.arange(0, BLOCK_J)  # index within one half of the head dimension
    m_j = o_j < HALF
    p_c = COS + i_b * stride_cb + i_t * stride_ct
    p_s = SIN + i_b * stride_cb + i_t * stride_ct
    b_c1 = tl.load(p_c + o_j, mask=m_j, other=0.0).to(tl.float32)
    b_c2 = tl.load(p_c + HALF + o_j, mask=m_j, other=0.0).to(tl.float32)
    b_s1 = tl.load(p_s + o_j, mask=m_j, other=0.0).to(tl.float32)
    b_s2 = tl.load(p_s + HALF + o_j, mask=m_j, other=0.0).to(tl.float32)

    # Every load comes before the first store: a store may alias a later load as far as the compiler knows, so
    # loads after it would wait for it and then pay their own memory latency, one after the other.
    o_hq = tl.arange(0, BLOCK_HQ)
    m_q = (o_hq < HQ)[:, None] & m_j[None, :]
    p_q = Q + i_b * stride_qb + i_t * stride_qt + o_hq[:, None] * stride_qh + o_j[None, :]
    b_q1 = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
    b_q2 = tl.load(p_q + HALF, mask=m_q, other=0.0).to(tl.float32)
    if HAS_SLOTS:
        i_s = tl.load(SLOTS + i_b) + i_t
    else:
        i_s = i_t
    o_hk = tl.arange(0, BLOCK_HKV)
    m_k = ((o_hk < HKV) & (o_hk * 0 + i_s < CAP))[:, None] & m_j[None, :]
    p_k = K + i_b * stride_kb + i_t * stride_kt + o_hk[:, None] * stride_kh + o_j[None, :]
    b_k1 = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
    b_k2 = tl.load(p_k + HALF, mask=m_k, other=0.0).to(tl.float32)
    if HAS_V:
        p_v = V + i_b * stride_vb + i_t * stride_vt + o_hk[:, None] * stride_vh + o_j[None, :]
        b_v1 = tl.load(p_v, mask=m_k, other=0.0)
        b_v2 = tl.load(p_v + HALF, mask=m_k, other=0.0)

    # queries: rotate, write head-major
    # each product and the sum rounded to the input dtype, as the eager x * cos + rotate_half(x) * sin
    b_y1 = ((b_q1 * b_c1[None, :]).to(Q.dtype.element_ty).to(tl.float32)
            + (-b_q2 * b_s1[None, :]).to(Q.dtype.element_ty).to(tl.float32)).to(Q.dtype.element_ty)
    b_y2 = ((b_q2 * b_c2[None, :]).to(Q.dtype.element_ty).to(tl.float32)
            + (b_q1 * b_s2[None, :]).to(Q.dtype.element_ty).to(tl.float32)).to(Q.dtype.element_ty)
    p_y = QO + i_b * stride_qob + o_hq[:, None] * stride_qoh + i_t * stride_qot + o_j[None, :]
    tl.store(p_y, b_y1.to(QO.dtype.element_ty), mask=m_q)
    tl.store(p_y + HALF, b_y2.to(QO.dtype.element_ty), mask=m_q)

    # keys (and values): rotate k, write both at their sequence index in the output / cache
    b_y1 = ((b_k1 * b_c1[None, :]).to(K.dtype.element_ty).to(tl.float32)
            + (-b_k2 * b_s1[None, :]).to(K.dtype.element_ty).to(tl.float32)).to(K.dtype.element_ty)
    b_y2 = ((b_k2 * b_c2[None, :]).to(K.dtype.element_ty).to(tl.float32)
            + (b_k1 * b_s2[None, :]).to(K.dtype.element_ty).to(tl.float32)).to(K.dtype.element_ty)
    p_y = KO + i_b * stride_kob + o_hk[:, None] * stride_koh + i_s.to(tl.int64) * stride_kos + o_j[None, :]
    tl.store(p_y, b_y1.to(KO.dtype.element_ty), mask=m_k)
    tl.store(p_y + HALF, b_y2.to(KO.dtype.element_ty), mask=m_k)
    if HAS_V:
        p_y = VO + i_b * stride_vob + o_hk[:, None] * stride_voh + i_s.to(tl.int64) * stride_vos + o_j[None, :]
        tl.store(p_y, b_v1.to(VO.dtype.element_ty), mask=m_k)
        tl.store(p_y + HALF, b_v2.to(VO.dtype.element_ty), mask=m_k)


# ---- checks and the launcher ------------------------------------------------------------------------------------


def _check(q, k, cos, sin, v=None):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope takes token-major q [B, T, Hq, D] and k [B, T, Hkv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    b, t, _, d = q.shape
    if d % 2:
        raise ValueError(f"rope needs an even head_dim (rotate-half pairs), got {d}")
    for name, c in (("cos", cos), ("sin", sin)):
        if tuple(c.shape) not in ((t, d), (b, t, d)):
            raise ValueError(f"rope {name} must be [T, D] = [{t}, {d}] or [B, T, D] = [{b}, {t}, {d}], "
                             f"got {tuple(c.shape)}")


def _tables(cos, sin, b):
    """cos, sin as [B, T, D] views (stride 0 over B for shared positions) with a contiguous last dim."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0).expand(b, -1, -1), sin.unsqueeze(0).expand(b, -1, -1)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _last_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_kernel(q, k, cos, sin, *, v=None, k_out=None, v_out=None, slots=None, q_out=None):
    """The Triton launcher behind `rope_qk` / `rope_write_kv` (the interpreter on the CPU)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q, k = _last_contiguous(q), _last_contiguous(k)
    cos, sin = _tables(cos, sin, b)
    if q_out is None:
        q_out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(b, hkv, t, d, dtype=k.dtype, device=k.device)
    if v is not None:
        v = _last_contiguous(v)
    vv, vo = (v, v_out) if v is not None else (k, k_out)  # unused pointers when there is no v
    cap = k_out.shape[2]
    if b * t:
        _rope_kernel[(b * t,)](
            q, k, vv, cos, sin, q_out, k_out, vo, slots if slots is not None else cos,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            vv.stride(0), vv.stride(1), vv.stride(2), cos.stride(0), cos.stride(1),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            vo.stride(0), vo.stride(1), vo.stride(2),
            t, cap, hq, hkv, d // 2,
            HAS_V=v is not None, HAS_SLOTS=slots is not None, BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HKV=triton.next_power_of_2(hkv), BLOCK_J=max(triton.next_power_of_2(d // 2), 2), num_warps=4,
        )
    return q_out, k_out


# ---- references ---------------------------------------------------------------------------------------------------


def rotate(x, cos, sin):
    """x: [B, H, T, D] rotated by cos, sin: [T, D] or [B, T, D] (the eager engine's formula)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_qk_reference(q, k, cos, sin, compute_dtype: torch.dtype | None = None):
    """q_rot [B, Hq, T, D], k_rot [B, Hkv, T, D] in PyTorch; compute_dtype (float64) for the test oracle."""
    if compute_dtype is not None:
        q, k, cos, sin = (x.to(compute_dtype) for x in (q, k, cos, sin))
    return rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)


def write_reference(cache, x, slots):
    """cache[b, :, slots[b] + t] = x[b, :, t] for x: [B, H, T, D] (an index_put: no host sync, capturable)."""
    b, _, t, _ = x.shape
    rows = torch.arange(b, device=cache.device)[:, None]
    index = slots.to(cache.device).long()[:, None] + torch.arange(t, device=cache.device)[None, :]
    cache[rows, :, index] = x.transpose(1, 2).to(cache.dtype)


# ---- public API -----------------------------------------------------------------------------------------------------


def rope_qk(q, k, cos, sin, *, use_kernel: bool | None = None):
    """Rotate q: [B, T, Hq, D] and k: [B, T, Hkv, D] by cos, sin ([T, D] or [B, T, D]).

    Returns q_rot [B, Hq, T, D], k_rot [B, Hkv, T, D], head-major (what attention and the cache take).
    use_kernel: None = Triton on CUDA tensors, the reference elsewhere; True/False force one path.
    """
    _check(q, k, cos, sin)
    if q.is_cuda if use_kernel is None else use_kernel:
        return rope_kernel(q, k, cos, sin)
    return rope_qk_reference(q, k, cos, sin)


def rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, *, use_kernel: bool | None = None):
    """Rotate q and k, and write k_rot and v into the cache at sequence index slots[b] + t.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; cos, sin: [T, D] or [B, T, D]; k_cache, v_cache: [B, Hkv, cap, D]
    (sequence stride arbitrary, last dim contiguous); slots: [B] long, each row's first free index.
    Returns q_rot [B, Hq, T, D].
    """
    _check(q, k, cos, sin, v)
    b, _, hkv, d = k.shape
    fits = k_cache.dim() == 4 and (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) == (b, hkv, d)
    if k_cache.shape != v_cache.shape or not fits:
        raise ValueError(f"k_cache, v_cache must be [B, Hkv, cap, D] = [{b}, {hkv}, cap, {d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if slots.shape != (b,):
        raise ValueError(f"slots must be [B] = [{b}], got {tuple(slots.shape)}")
    if (q.is_cuda if use_kernel is None else use_kernel) and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1:
        q_rot, _ = rope_kernel(q, k, cos, sin, v=v, k_out=k_cache, v_out=v_cache, slots=slots)
        return q_rot
    q_rot, k_rot = rope_qk_reference(q, k, cos, sin)
    write_reference(k_cache, k_rot, slots)
    write_reference(v_cache, v.transpose(1, 2), slots)
    return q_rot


# ---- torch.library ops --------------------------------------------------------------------------------------------


@torch.library.custom_op("ollm_triton::rope_qk", mutates_args=())
def rope_qk_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_qk` as a custom op."""
    q_rot, k_rot = rope_qk(q, k, cos, sin)
    return q_rot.contiguous(), k_rot.contiguous()


@rope_qk_op.register_fake
def _(q, k, cos, sin):
    b, t, hq, d = q.shape
    return q.new_empty(b, hq, t, d), k.new_empty(b, k.shape[2], t, d)


@torch.library.custom_op("ollm_triton::rope_write_kv", mutates_args=("k_cache", "v_cache"))
def rope_write_kv_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """`rope_write_kv` as a custom op (mutates the two cache buffers)."""
    return rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots).contiguous()


@rope_write_kv_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slots):
    b, t, hq, d = q.shape
    return q.new_empty(b, hq, t, d)


__all__ = ["rope_qk", "rope_write_kv", "rope_kernel", "rope_qk_reference", "write_reference", "rotate",
           "rope_qk_op", "rope_write_kv_op"]

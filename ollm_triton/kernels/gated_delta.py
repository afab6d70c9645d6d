"""The gated delta rule (Gated DeltaNet's token mixer) in two PyTorch forms, and flash-linear-attention's kernels.

    q, k: [B, T, H, Dk]   v: [B, T, HV, Dv]   g, beta: [B, T, HV]   state: [B, HV, Dk, Dv] (float32)
    gated_delta_recurrent(q, k, v, g, beta, state)  -> o [B, T, HV, Dv], final state    (token by token)
    gated_delta_chunked(q, k, v, g, beta, state)    -> o, final state                   (chunks of 64: prefill)
    gated_delta(q, k, v, g, beta, state)             -> fla's chunked / fused-recurrent kernel on CUDA when
                                                        `fla` is installed (the `linear` extra), else the above

Per token t of value head h (key head h // (HV / H): grouped value heads, as transformers' repeat_interleave), with
q, k L2-normalised (`qk_l2norm`) and q scaled by Dk^-1/2:

    S <- exp(g_t) S                        decay (g_t <= 0, log space)
    u_t = beta_t (v_t - S^T k_t)           the part of v_t the state does not already predict (the delta rule)
    S <- S + k_t u_t^T
    o_t = S^T q_t

Chunked form (my derivation, the WY trick of the DeltaNet papers): inside a chunk of C tokens with cumulative
log-decay c_t = g_1 + ... + g_t and the state S_0 at its start,

    (I + A) U = diag(beta) V - diag(beta e^c) K S_0,   A[t, s] = beta_t e^(c_t - c_s) k_t.k_s for s < t
    O   = diag(e^c) Q S_0 + (Q K^T * e^(c_t - c_s))[s <= t] U
    S_C = e^(c_C) S_0 + (K * e^(c_C - c))^T U

one unit-lower-triangular solve and a few matmuls per chunk instead of C rank-one updates. Both forms compute in
float32 (float64 when given float64: the tests' reference) and return o in the input dtype and the state in
float32. Padding the last chunk with k = 0, beta = 0, g = 0 leaves the state untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the eps placement of fla and transformers)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, state, scale, qk_l2norm):
    """-> head-major q, k (expanded to HV heads), v: [B, HV, T, D], g, beta: [B, HV, T], state: [B, HV, Dk, Dv] in
    the compute dtype (float64 stays float64, anything else float32)."""
    b, t, h, dk = k.shape
    hv, dv = v.shape[-2:]
    if hv % h:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({h})")
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    if hv != h:
        q, k = q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).to(ct) for x in (q, k, v, g, beta))
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (dk**-0.5 if scale is None else scale)
    s0 = torch.zeros(b, hv, dk, dv, dtype=ct, device=v.device) if state is None else state.to(ct)
    return q, k, v, g, beta, s0


def gated_delta_recurrent(q, k, v, g, beta, state=None, *, scale=None, qk_l2norm=True, all_states=False):
    """Token by token (the definition; the decode step). Returns (o [B, T, HV, Dv] in v's dtype, final state
    [B, HV, Dk, Dv] float32 (float64 for float64 inputs)); with `all_states` also the states after every token,
    [T, B, HV, Dk, Dv] (a speculative verify block keeps them to roll back to any accepted prefix)."""
    dtype = v.dtype
    q, k, v, g, beta, s = _prepare(q, k, v, g, beta, state, scale, qk_l2norm)
    out = torch.empty_like(v)
    states = []
    for t in range(v.shape[2]):
        s = s * g[:, :, t].exp()[..., None, None]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", s, k[:, :, t]))
        s = s + k[:, :, t, :, None] * u[:, :, None, :]
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", s, q[:, :, t])
        if all_states:
            states.append(s)
    o = out.transpose(1, 2).to(dtype)
    if all_states:
        return o, s, torch.stack(states) if states else s.new_empty(0, *s.shape)
    return o, s


def gated_delta_chunked(q, k, v, g, beta, state=None, *, scale=None, qk_l2norm=True, chunk: int = CHUNK):
    """The chunked form (this module's docstring), for prefill. Same arguments and results as
    `gated_delta_recurrent` (no per-token states)."""
    dtype = v.dtype
    q, k, v, g, beta, s = _prepare(q, k, v, g, beta, state, scale, qk_l2norm)
    b, hv, t, dv = v.shape
    pad = (-t) % chunk
    if pad:  # zero keys, beta and decay: padded tokens neither read nor change the state
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, hv, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(b, hv, n, chunk), beta.reshape(b, hv, n, chunk)
    c = g.cumsum(-1)  # [B, HV, N, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    # e^(c_t - c_s) for s <= t; the upper triangle is masked before exp (c_t - c_s > 0 there could overflow)
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, HV, N, C, C]
    kk = k @ k.transpose(-1, -2)
    strict = decay.tril(-1)  # s < t only
    eye = torch.eye(chunk, dtype=v.dtype, device=v.device)
    system = eye + beta[..., None] * kk * strict  # I + A, unit lower triangular
    # the two right-hand sides share the solve: [beta V | beta e^c K]
    rhs = torch.cat((beta[..., None] * v, (beta * c.exp())[..., None] * k), dim=-1)
    sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_v, u_k = sol[..., :dv], sol[..., dv:]  # U = u_v - u_k S_0
    qk = (q @ k.transpose(-1, -2)) * decay
    q_dec = q * c.exp()[..., None]
    k_dec = k * (c[..., -1:] - c).exp()[..., None]
    out = torch.empty_like(v)
    for i in range(n):
        u = u_v[:, :, i] - u_k[:, :, i] @ s  # [B, HV, C, Dk] @ [B, HV, Dk, Dv] -> [B, HV, C, Dv]
        out[:, :, i] = q_dec[:, :, i] @ s + qk[:, :, i] @ u
        s = s * c[:, :, i, -1].exp()[..., None, None] + k_dec[:, :, i].transpose(-1, -2) @ u
    o = out.reshape(b, hv, n * chunk, dv)[:, :, :t].transpose(1, 2).to(dtype)
    return o, s


def fla_available(device: torch.device) -> bool:
    """flash-linear-attention's kernels can run here: a CUDA device and `fla` importable."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError:
        return False
    return True


def gated_delta(q, k, v, g, beta, state=None, *, use_fla: bool | None = None, all_states: bool = False):
    """The engine's entry (q, k L2-normalised inside): fla's fused recurrent kernel for decode-sized blocks and its
    chunked kernel for longer ones when `use_fla` (None: when `fla_available`), else the recurrent reference up
    to 16 tokens and the chunked one above. `all_states` (per-token states for rollback) always takes the
    recurrent form. Returns (o [B, T, HV, Dv] in v's dtype, final state float32[, states [T, B, HV, Dk, Dv]])."""
    t = v.shape[1]
    if all_states:
        return gated_delta_recurrent(q, k, v, g, beta, state, all_states=True)
    if use_fla is None:
        use_fla = fla_available(v.device)
    if use_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        s0 = None if state is None else state.float().contiguous()
        # fla's kernels index with the strides of contiguous [B, T, H, D]; the layer hands views of one conv output
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        if t <= 16:
            o, s = fused_recurrent_gated_delta_rule(q, k, v, g=g.float(), beta=beta, initial_state=s0,
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
        else:
            o, s = chunk_gated_delta_rule(q, k, v, g.float(), beta, initial_state=s0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
        return o.to(v.dtype), s.float()
    if t <= 16:
        return gated_delta_recurrent(q, k, v, g, beta, state)
    return gated_delta_chunked(q, k, v, g, beta, state)


__all__ = ["CHUNK", "fla_available", "gated_delta", "gated_delta_chunked", "gated_delta_recurrent", "l2norm"]

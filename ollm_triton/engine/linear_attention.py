"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next, one module of the one model step.

A linear-attention layer replaces q/k/v -> attention with (shapes per token, H key heads, HV value heads):

    in_proj_qkvz(x) -> per key head [q (Dk), k (Dk), v (HV/H * Dv), z (HV/H * Dv)]      (transformers' grouping)
    in_proj_ba(x)   -> per key head [b (HV/H), a (HV/H)]
    q|k|v  -> causal depthwise conv1d (kernel K, its own state: the last K - 1 inputs) -> SiLU
    beta = sigmoid(b),  g = -exp(A_log) * softplus(a + dt_bias)          (per value head; g <= 0 is a log-decay)
    o = gated delta rule(q, k, v, g, beta; recurrent state [HV, Dk, Dv])  (kernels/gated_delta.py)
    out_proj(RMSNorm(o) * silu(z))                                         (the gated RMSNorm, per value head)

Its cache layer is a `StateLayer` (cache/state.py), not a codec's K/V: the conv state [B, C, K - 1] in the model
dtype and the recurrent state [B, HV, Dk, Dv] in float32, a fixed size whatever the context (`state_shapes`). A
block of 2..16 tokens after the prompt (a speculative verify block) runs the recurrent form and keeps the state
after every token, so `truncate` can roll back to any accepted prefix; a tree of drafts is refused (one recurrent
state cannot hold several branches).

Parameter names equal transformers' `Qwen3NextGatedDeltaNet` (`linear_attn.in_proj_qkvz.weight`, `conv1d.weight`
[C, 1, K], `dt_bias`, `A_log`, `norm.weight`, `out_proj.weight`), so a checkpoint loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.engine.config import ModelConfig
from ollm_triton.kernels.gated_delta import fla_available, gated_delta

ROLLBACK_MAX_TOKENS = 16  # blocks up to this long keep per-token states (the engine's decode_max_tokens)


def gated_delta_path(device: torch.device) -> str:
    """Which gated-delta implementation the layers run on `device` (metrics.json: `linear_attention_path`)."""
    use = GatedDeltaNet.use_fla
    fla = fla_available(device) if use is None else use
    if fla:
        return "fla (chunked prefill, fused recurrent decode)"
    return "torch reference (chunked prefill, recurrent decode)"


def state_shapes(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The fixed-size state of one linear-attention layer for `batch` sequences: name -> (shape, dtype)."""
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    channels = 2 * hk * dk + hv * dv
    return {"conv": ((batch, channels, cfg.linear_conv_kernel_dim - 1), dtype),
            "recurrent": ((batch, hv, dk, dv), torch.float32)}


def state_bytes(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    """Bytes of one linear-attention layer's state (the memory check counts it beside the attention layers' KV)."""
    total = 0
    for shape, dt in state_shapes(cfg, batch, dtype).values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dt).element_size()
    return total


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) * silu(gate) over the last dim: normalised in float32, weight applied in the input dtype, the
    gate in float32 (transformers' Qwen3NextRMSNormGated)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    # None: flash-linear-attention's kernels where they can run (CUDA, `fla` installed), else the PyTorch reference;
    # True/False force one (scripts/bench_qwen3_next.py times both in one process)
    use_fla: bool | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if self.hv % self.hk:
            raise ValueError(f"linear_num_value_heads ({self.hv}) must be a multiple of linear_num_key_heads "
                             f"({self.hk})")
        key_dim, value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        self.in_proj_qkvz = nn.Linear(h, 2 * key_dim + 2 * value_dim, bias=False)
        self.in_proj_ba = nn.Linear(h, 2 * self.hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False,
                                padding=self.kernel_size - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, h, bias=False)

    def split(self, qkvz: torch.Tensor, ba: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Undo transformers' per-key-head grouping: qkvz [B, T, H*(2Dk + 2r Dv)], ba [B, T, 2 HV] (r = HV/H) ->
        q, k [B, T, H, Dk], v, z [B, T, HV, Dv], b, a [B, T, HV]."""
        bsz, t, _ = qkvz.shape
        r = self.hv // self.hk
        qkvz = qkvz.view(bsz, t, self.hk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = qkvz.split((self.dk, self.dk, r * self.dv, r * self.dv), dim=-1)
        b, a = ba.view(bsz, t, self.hk, 2 * r).split((r, r), dim=-1)
        return (q, k, v.reshape(bsz, t, self.hv, self.dv), z.reshape(bsz, t, self.hv, self.dv),
                b.reshape(bsz, t, self.hv), a.reshape(bsz, t, self.hv))

    def forward(self, x: torch.Tensor, state, linear=F.linear) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]. `state`: the layer's StateLayer (or rows of them), read and
        advanced by T tokens."""
        bsz, t, _ = x.shape
        qkvz, ba = linear(x, self.in_proj_qkvz.weight, None), linear(x, self.in_proj_ba.weight, None)
        q, k, v, z, b, a = self.split(qkvz, ba)
        mixed = torch.cat((q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1)), dim=-1)
        # causal depthwise conv over [the previous K - 1 inputs | this block]: zeros before the first token
        held = state.state
        window = torch.cat((held["conv"], mixed.transpose(1, 2).to(held["conv"].dtype)), dim=-1)  # [B, C, K-1+T]
        conv = F.silu(F.conv1d(window, self.conv1d.weight, groups=self.conv_dim)).to(x.dtype)  # [B, C, T]
        q, k, v = conv.transpose(1, 2).split((self.hk * self.dk, self.hk * self.dk, self.hv * self.dv), dim=-1)
        q, k = q.reshape(bsz, t, self.hk, self.dk), k.reshape(bsz, t, self.hk, self.dk)
        v = v.reshape(bsz, t, self.hv, self.dv)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # float32: fp16 A_log.exp() overflows
        # a verify block (tokens after a prompt, few enough) keeps every token's state for `truncate`
        keep = state.length > 0 and 1 < t <= ROLLBACK_MAX_TOKENS
        result = gated_delta(q, k, v, g, beta, held["recurrent"], use_fla=self.use_fla, all_states=keep)
        o, recurrent = result[0], result[1]
        k1 = self.kernel_size - 1
        new = {"conv": window[..., window.shape[-1] - k1 :], "recurrent": recurrent}
        history = None
        if keep:  # the conv state after token j is window[..., j + 1 : j + K]: views, no copy
            history = {"conv": window.unfold(-1, k1, 1)[..., 1:, :].permute(2, 0, 1, 3), "recurrent": result[2]}
        state.update(new, t, history)
        o = self.norm(o, z)  # [B, T, HV, Dv]
        return linear(o.reshape(bsz, t, self.hv * self.dv), self.out_proj.weight, None)


__all__ = ["GatedDeltaNet", "GatedRMSNorm", "ROLLBACK_MAX_TOKENS", "gated_delta_path", "state_bytes", "state_shapes"]

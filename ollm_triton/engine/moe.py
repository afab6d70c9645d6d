"""The mixture-of-experts MLP of the one model step (engine/model.py): a router, E experts stacked as [E, ...]
tensors, and an optional shared expert.

    moe = MoE(cfg, shared_expert=None)          # cfg: a ModelConfig with num_experts > 0
    out = moe(x, kernels, linear)               # x: [B, T, hidden] -> [B, T, hidden]

Routing (`Router`), per token, from router logits [N, E] = linear(x, weight, bias):
- "softmax_topk" (qwen3_moe, qwen3_next): softmax over every expert in float32, the top-k probabilities, divided by
  their sum when `norm_topk_prob`, cast back to the model dtype;
- "topk_softmax" (gpt-oss): the top-k logits, then a softmax over those k in the model dtype.

Experts. Parameter names are transformers 5's (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, with
`_bias` for gpt-oss), so a transformers 5 state dict loads as it is; engine/checkpoint.py stacks the per-expert
tensors of official Qwen3-MoE checkpoints (`mlp.experts.{e}.gate_proj.weight`) into them and dequantizes the MXFP4
blocks of official gpt-oss ones, or keeps them as they are (`expert_format` "mxfp4", load_engine's `experts`: the
parameters `gate_up_proj_blocks` / `_scales` and `down_proj_blocks` / `_scales`, uint8, row = output; the kernels read
the codes, the eager paths dequantize one expert at a time). Two layouts (`expert_layout`):
- "concat": gate_up_proj [E, 2I, H] (the gate's I rows first, then up's), down_proj [E, H, I] (qwen);
- "interleaved_t": gate_up_proj [E, H, 2I] with gate in the even columns and up in the odd ones, down_proj [E, I, H],
  and biases [E, 2I], [E, H] (gpt-oss).
Activation: "silu" = silu(gate) * up; "clamped_swiglu" (gpt-oss) = (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)
with g = clamp(gate, max=l).

Three paths compute the same sum over each token's k experts of weight * expert(x):
- `naive` (the reference): for each expert hit, gather its tokens, run it, index_add into the output (what
  transformers does);
- `grouped` (the eager default): the N*k (token, slot) pairs sorted by expert, one matmul pair per expert over its
  contiguous run, the outputs written back per pair and summed over k. Only experts that received a token are read,
  so a batch-1 decode step reads k experts' weights, not E. It syncs once for the run lengths (not capturable);
- `kernel` (`kernels` on): the Triton grouped kernels (ollm_triton/kernels/moe.py): one launch for every expert's
  gate/up + activation, one for down with the routing weight folded in; sized from N*k alone, so no host value is
  read and a CUDA graph can capture the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.engine.config import ModelConfig
from ollm_triton.kernels.moe import expert_forward, moe_experts, moe_experts_torch
from ollm_triton.kernels.mxfp4 import GROUP, MXFP4

MOE_PATHS = ("auto", "grouped", "naive", "kernel")


class Router(nn.Module):
    """weight: [E, hidden] (+ bias [E]); forward(x [N, hidden]) -> routing weights [N, k] in x.dtype, experts
    [N, k] long."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        self.top_k, self.scoring, self.renormalise = cfg.num_experts_per_tok, cfg.router, cfg.norm_topk_prob

    def forward(self, x: torch.Tensor, linear=F.linear) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x, self.weight, self.bias)  # [N, E]
        if self.scoring == "topk_softmax":
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            return torch.softmax(top, dim=-1), experts
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), experts


class Experts(nn.Module):
    """E SwiGLU experts stacked along dim 0 (the layouts are in the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.layout, self.act = cfg.expert_layout, cfg.expert_act
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        # the routing's shape, fixed when the parameters are rebound to a cache of some experts (prefetch/experts.py):
        # the Triton kernels tile by it, so a streamed call computes each pair as the resident one does
        self.routing = (e, cfg.num_experts_per_tok)
        self.mxfp4 = cfg.expert_format == "mxfp4"
        if self.mxfp4:  # the checkpoint's names and shapes: row n = output n of gate_up (in the layout's order) or down
            def codes(rows, k):
                return nn.Parameter(torch.empty(e, rows, k // GROUP, 16, dtype=torch.uint8), requires_grad=False)

            def scales(rows, k):
                return nn.Parameter(torch.empty(e, rows, k // GROUP, dtype=torch.uint8), requires_grad=False)

            self.gate_up_proj_blocks, self.gate_up_proj_scales = codes(2 * m, h), scales(2 * m, h)
            self.down_proj_blocks, self.down_proj_scales = codes(h, m), scales(h, m)
        elif self.layout == "concat":
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * m, h))
            self.down_proj = nn.Parameter(torch.empty(e, h, m))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * m))
            self.down_proj = nn.Parameter(torch.empty(e, m, h))
        if cfg.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * m))
            self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None

    @property
    def num_experts(self) -> int:
        return (self.gate_up_proj_blocks if self.mxfp4 else self.gate_up_proj).shape[0]

    def _tensors(self) -> tuple:
        if self.mxfp4:
            return (MXFP4(self.gate_up_proj_blocks, self.gate_up_proj_scales),
                    MXFP4(self.down_proj_blocks, self.down_proj_scales), self.gate_up_proj_bias, self.down_proj_bias)
        return self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias

    def _options(self) -> dict:
        return dict(layout=self.layout, act=self.act, alpha=self.alpha, limit=self.limit)

    def run(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens h: [n, hidden] -> [n, hidden] (PyTorch; MXFP4 experts dequantized one at a time)."""
        w_gu, w_d, b_gu, b_d = self._tensors()
        if self.mxfp4:
            t = self.layout == "interleaved_t"
            w_gu, w_d = (MXFP4(w.blocks[e : e + 1], w.scales[e : e + 1]).dense(h.dtype, t) for w in (w_gu, w_d))
            b_gu, b_d = (None if b is None else b[e : e + 1] for b in (b_gu, b_d))
            e = 0
        return expert_forward(h, e, w_gu, w_d, b_gu, b_d, **self._options())

    def naive(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The reference: x [N, hidden], weights, experts [N, k] -> [N, hidden], expert by expert."""
        return moe_experts_torch(x, weights, experts, *self._tensors(), **self._options())

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """(token, slot) pairs sorted by expert, one call per expert over its run: x [N, hidden], weights, experts
        [N, k] -> [N, hidden]. Experts no token chose are never read."""
        n, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pair ids grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync of this path
        rows = torch.empty(n * k, x.shape[-1], device=x.device, dtype=x.dtype)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            pairs = order[start : start + c]
            rows[pairs] = self.run(e, x[pairs // k])
            start += c
        rows = rows * weights.reshape(-1, 1)
        return rows.view(n, k, -1).sum(dim=1)

    def kernel(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The Triton grouped kernels (kernels/moe.py): x [N, hidden], weights, experts [N, k] -> [N, hidden]."""
        return moe_experts(x, weights, experts, *self._tensors(), **self._options(), use_kernel=True,
                           routing=self.routing)


class MoE(nn.Module):
    """Router + experts (+ a sigmoid-gated shared expert: out += sigmoid(shared_expert_gate(x)) * shared_expert(x),
    qwen3_next). The router's attribute name is the checkpoint's: `gate` (qwen) or `router` (gpt-oss)."""

    # "auto": the Triton kernels when the step runs its kernels, else grouped; or one path forced (tests, benchmarks)
    path = "auto"
    # a prefetch policy that acts on experts sets itself here (prefetch/base.py `run_experts`): the routed experts then
    # run through it, which may first bring them to the device and rebind the stacked parameters to its cache
    expert_hooks = None

    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.router_name = "router" if cfg.router == "topk_softmax" else "gate"
        setattr(self, self.router_name, Router(cfg))
        self.experts = Experts(cfg)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared_expert is not None else None

    def forward(self, x: torch.Tensor, kernels: bool, linear=F.linear) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = getattr(self, self.router_name)(flat, linear)
        path = ("kernel" if kernels else "grouped") if self.path == "auto" else self.path
        compute = getattr(self.experts, path)  # (x, weights, experts) -> [N, hidden] over the experts as bound now
        if self.expert_hooks is None:
            out = compute(flat, weights, experts)
        else:
            out = self.expert_hooks.run_experts(flat, weights, experts, lambda w, ids: compute(flat, w, ids))
        if self.shared_expert is not None:
            gate = torch.sigmoid(linear(flat, self.shared_expert_gate.weight, None))
            out = out + gate * self.shared_expert(flat, kernels, linear)
        return out.view(shape)


__all__ = ["MOE_PATHS", "MoE", "Router", "Experts"]

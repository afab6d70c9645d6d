"""y = x W^T (+ b) for a few rows of x: the matrix-vector products of batch-1 decode, and their reference.

    x: [B, K] (B small)   W: [N, K] row-major   b: [N] or None   ->   y: [B, N] in x's dtype, fp32 accumulation

Decode at batch 1 is a chain of matrix-vector products, each reading its whole weight once. cuBLAS runs the large
ones at the bandwidth, but on the H200 its kernels for llama3_8b's qkv (6144 x 4096) and o_proj (4096 x 4096)
read at 3.6 and 3.1 TB/s (experiments/engine/README.md, section 5), and o_proj adds a split-K reduction kernel.
Here each program owns BLOCK_N output rows and walks all of K in BLOCK_K steps, so there is no split-K pass: with
N / BLOCK_N programs (several per SM) and a [BLOCK_N, BLOCK_K] tile in flight per program (two with PREFETCH), the
loads keep the memory busy. Each step's products are summed in fp32 into BLOCK_N accumulators.

`GemvPlan` decides per weight shape whether this kernel or cuBLAS runs, by timing both on the device once as
CUDA-graph replays (the fast decode path builds one before capturing its graph); anything it has not timed, any
batch above MAX_ROWS, and any shape whose timing failed goes to `F.linear`.

Status (H200, 2026-11-30): every config matches a float64 reference in bf16 at llama3_8b's shapes. The first plan
timed with `do_bench` (launch cost included) and picked cuBLAS for qkv and o_proj (call 7 of
experiments/h200-2026-11-30b); whether a config beats cuBLAS in graph time has not been measured yet.
"""

# No `from __future__ import annotations`: kept like the other kernel modules (custom ops read annotations).
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 4  # rows of x per launch: each program reads its weight rows once per row of x
# (BLOCK_N, BLOCK_K, warps, PREFETCH) to time. sm_90 registers (Triton 3.9 AOT compile): 121, 107, 64, 153, 127,
# so 4, 4, 8, 3 and 2 programs an SM, with 16, 16, 8, 32 and 32 KB of weight loads in flight per program.
CONFIGS = ((8, 1024, 4, False), (4, 2048, 4, False), (8, 512, 4, False), (8, 1024, 4, True), (16, 1024, 8, False))


@triton.jit(do_not_specialize=["N", "K"])
def _gemv_kernel(
    X, W, B, Y, N, K, stride_xb, stride_wn, stride_yb,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_k = tl.arange(0, BLOCK_K)
    p_w = W + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :]
    p_x = X + i_b.to(tl.int64) * stride_xb + o_k
    b_acc = tl.zeros([BLOCK_N], tl.float32)
    if PREFETCH:
        # by hand, one tile ahead: the next tile's loads are in flight while this one is multiplied (Triton's
        # pipeliner only stages loads that feed a tl.dot)
        b_w = tl.load(p_w, mask=m_n[:, None] & (o_k < K)[None, :], other=0.0)
        for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
            m_k = k0 + o_k < K
            b_w_next = tl.load(p_w + k0, mask=m_n[:, None] & m_k[None, :], other=0.0)
            b_x = tl.load(p_x + k0 - BLOCK_K, mask=k0 - BLOCK_K + o_k < K, other=0.0)
            b_acc += tl.sum(b_w.to(tl.float32) * b_x.to(tl.float32)[None, :], 1)
            b_w = b_w_next
    else:
        for k0 in range(0, K, BLOCK_K):
            m_k = k0 + o_k < K
            b_w = tl.load(p_w + k0, mask=m_n[:, None] & m_k[None, :], other=0.0)
            b_x = tl.load(p_x + k0, mask=m_k, other=0.0)
            b_acc += tl.sum(b_w.to(tl.float32) * b_x.to(tl.float32)[None, :], 1)
    if HAS_BIAS:
        b_acc += tl.load(B + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(Y + i_b.to(tl.int64) * stride_yb + o_n, b_acc.to(Y.dtype.element_ty), mask=m_n)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, block_n: int = 8, block_k: int = 1024,
         num_warps: int = 4, prefetch: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows in all) times w [N, K]^T (+ b) -> [..., N], through the Triton kernel."""
    k = x.shape[-1]
    n = w.shape[0]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if w.shape[1] != k or w.stride(1) != 1 or rows > MAX_ROWS or (b is not None and b.shape != (n,)):
        raise ValueError(f"gemv takes x [<= {MAX_ROWS} rows, K], w [N, K] with a contiguous last dim and b [N]; got "
                         f"x {tuple(x.shape)}, w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device) if out is None else out.view(rows, n)
    if rows:
        _gemv_kernel[(triton.cdiv(n, block_n), rows)](
            x2, w, b if b is not None else w, y, n, k, x2.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=b is not None, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
            PREFETCH=prefetch, num_warps=num_warps,
        )
    return y.view(*x.shape[:-1], n)


def gemv_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ w^T + b computed in compute_dtype (float64 for tests), returned in compute_dtype."""
    y = x.to(compute_dtype) @ w.to(compute_dtype).T
    return y + b.to(compute_dtype) if b is not None else y


class GemvPlan:
    """Which matmul each (rows, N, K, dtype) of a decode step runs: cuBLAS (`F.linear`) or the Triton GEMV with one
    of CONFIGS, whichever the device timed fastest. Call it like F.linear; untimed shapes go to F.linear."""

    def __init__(self):
        self.choice: dict[tuple, tuple | None] = {}  # key -> a CONFIGS entry, or None for cuBLAS
        self.timings: dict[tuple, dict[str, float]] = {}  # key -> {"cublas": us, "8x1024w4": us, ...}

    @staticmethod
    def key(rows: int, w: torch.Tensor) -> tuple:
        return rows, w.shape[0], w.shape[1], w.dtype

    def tune(self, w: torch.Tensor, b: torch.Tensor | None, rows: int = 1) -> None:
        """Time cuBLAS and each config on the device for this weight at `rows` rows; keep the fastest. Outside a
        CUDA graph capture (it synchronizes)."""
        key = self.key(rows, w)
        if key in self.choice or rows > MAX_ROWS or w.device.type != "cuda":
            return
        from triton.testing import do_bench_cudagraph

        def us(fn) -> float:  # replayed from a CUDA graph, as in the decode step: GPU time, no launch cost
            with torch.cuda.stream(torch.cuda.Stream(device=w.device)):
                return 1000 * do_bench_cudagraph(fn, rep=30, return_mode="median")

        x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
        ref = F.linear(x, w, b).float()
        best, times = None, {}
        try:
            times["cublas"] = us(lambda: F.linear(x, w, b))
            best_us = times["cublas"]
            for cfg in CONFIGS:
                fn = lambda: self._run(cfg, x, w, b)  # noqa: E731,B023
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:  # a config that computes something else never gets picked
                    continue
                times[self.name(cfg)] = us(fn)
                if times[self.name(cfg)] < best_us:
                    best, best_us = cfg, times[self.name(cfg)]
        except Exception as e:  # timing failed: keep cuBLAS, and say why in the plan's description
            best, times["error"] = None, f"{type(e).__name__}: {str(e)[:120]}"
        self.choice[key] = best
        self.timings[key] = times

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        cfg = self.choice.get(self.key(rows, w))
        return F.linear(x, w, b) if cfg is None else self._run(cfg, x, w, b)

    @staticmethod
    def _run(cfg: tuple, x, w, b):
        bn, bk, warps, prefetch = cfg
        return gemv(x, w, b, block_n=bn, block_k=bk, num_warps=warps, prefetch=prefetch)

    @staticmethod
    def name(cfg: tuple | None) -> str:
        return "cublas" if cfg is None else f"{cfg[0]}x{cfg[1]}w{cfg[2]}{'p' if cfg[3] else ''}"

    def describe(self) -> dict[str, dict]:
        """{"rows x N x K": {"choice": "cublas" or a config name, <each candidate>: us}} for metrics."""
        return {f"{k[0]}x{k[1]}x{k[2]}": {"choice": self.name(self.choice[k]),
                                          **{n: round(t, 2) if isinstance(t, float) else t for n, t in times.items()}}
                for k, times in self.timings.items()}


__all__ = ["gemv", "gemv_reference", "GemvPlan", "CONFIGS", "MAX_ROWS"]

"""k-means vector quantization of K/V rows: nearest-centroid assignment (Triton + reference) and Lloyd's fit.

Nearest centroid by squared distance ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, so the argmin over c is the argmax
of x.c - ||c||^2 / 2: one matmul per (rows x centroids) tile, no distance matrix in memory. The kernel streams
centroid blocks past a block of rows and keeps a running (best score, best index) per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def assign_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x: [G, N, D], centroids: [G, C, D] -> int64 [G, N], the nearest centroid of each row (float32 math)."""
    x, c = x.float(), centroids.float()
    score = x @ c.transpose(-1, -2) - 0.5 * c.pow(2).sum(-1)[:, None, :]
    return score.argmax(-1)


@triton.jit(do_not_specialize=["n_rows", "n_clusters"])
def _assign_kernel(
    X, C, OUT,
    stride_x_g, stride_x_n, stride_c_g, stride_c_k, stride_o_g,
    n_rows, n_clusters,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr,
):
    i_g, i_n = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < n_rows, o_d < D
    b_x = tl.load(X + i_g * stride_x_g + o_n[:, None] * stride_x_n + o_d[None, :],
                  mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    b_arg = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, n_clusters, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < n_clusters
        b_c = tl.load(C + i_g * stride_c_g + o_c[:, None] * stride_c_k + o_d[None, :],
                      mask=m_c[:, None] & m_d[None, :], other=0.0)
        b_cf = b_c.to(tl.float32)
        b_s = tl.dot(b_x.to(DOT), tl.trans(b_c.to(DOT)))  # [BN, BD] @ [BD, BC] -> [BN, BC]
        b_s = b_s - 0.5 * tl.sum(b_cf * b_cf, 1)[None, :]
        b_s = tl.where(m_c[None, :], b_s, float("-inf"))
        b_blk_best = tl.max(b_s, 1)
        b_blk_arg = tl.argmax(b_s, 1).to(tl.int32) + c0
        b_better = b_blk_best > b_best  # strict: ties keep the lower index, as argmax does
        b_arg = tl.where(b_better, b_blk_arg, b_arg)
        b_best = tl.where(b_better, b_blk_best, b_best)
    tl.store(OUT + i_g * stride_o_g + o_n, b_arg, mask=m_n)


def assign(x: torch.Tensor, centroids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of assign_ref. x: [G, N, D], centroids: [G, C, D] -> int32 [G, N] (into `out` if given)."""
    g, n, d = x.shape
    c = centroids.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    centroids = centroids if centroids.stride(-1) == 1 else centroids.contiguous()
    out = torch.empty(g, n, dtype=torch.int32, device=x.device) if out is None else out
    if n == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    block_c = min(64, max(16, triton.next_power_of_2(c)))
    dot = tl.float32 if x.dtype == torch.float32 else tl.float16 if x.dtype == torch.float16 else tl.bfloat16
    _assign_kernel[(g, triton.cdiv(n, block_n))](
        x, centroids, out, x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1), out.stride(0),
        n, c, D=d, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_C=block_c, DOT=dot,
    )
    return out


def kmeans(x: torch.Tensor, num_clusters: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means per group. x: [G, N, D] -> float32 centroids [G, num_clusters, D].

    Initial centroids by k-means++ (each next one drawn with probability ~ squared distance to the nearest one
    so far), which avoids the merged-cluster minima that a uniform draw falls into; with N <= num_clusters every
    row is a centroid (repeated). A cluster that loses all its rows keeps its centroid. Assignment runs the
    Triton kernel on CUDA, the reference elsewhere.
    """
    g, n, d = x.shape
    xf = x.float()
    if n <= num_clusters:
        pick = torch.arange(num_clusters, device=x.device) % n
        return xf[:, pick].clone()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    rows = torch.arange(g, device=x.device)
    first = torch.randint(0, n, (g,), generator=gen, device=x.device)
    cent = torch.empty(g, num_clusters, d, device=x.device)
    cent[:, 0] = xf[rows, first]
    d2 = (xf - cent[:, :1]).pow(2).sum(-1)  # [G, N] squared distance to the nearest centroid so far
    for j in range(1, num_clusters):
        nxt = torch.multinomial(d2 + 1e-12, 1, generator=gen).squeeze(1)
        cent[:, j] = xf[rows, nxt]
        d2 = torch.minimum(d2, (xf - cent[:, j : j + 1]).pow(2).sum(-1))
    ones = torch.ones(g, n, device=x.device)
    for _ in range(iters):
        codes = (assign(xf, cent) if x.is_cuda else assign_ref(xf, cent)).long()
        sums = torch.zeros_like(cent).scatter_add_(1, codes[..., None].expand(-1, -1, d), xf)
        counts = torch.zeros(g, num_clusters, device=x.device).scatter_add_(1, codes, ones)
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], cent)
    return cent

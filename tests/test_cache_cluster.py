"""The cluster codec: Triton nearest-centroid assignment against the reference, k-means, the cache layer."""

import pytest
import torch

from ollm_triton.cache.base import LayerSpec
from ollm_triton.kernels.cluster import assign, assign_ref, kmeans
from ollm_triton.registry import PluginError, registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dist(x, c, codes):
    nearest = torch.gather(c.double(), 1, codes.long()[..., None].expand(-1, -1, x.shape[-1]))
    return (x.double() - nearest).pow(2).sum(-1)


@pytest.mark.interpreter
@pytest.mark.parametrize("n,c", [(1, 5), (63, 16), (129, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_assign_triton_matches_reference(n, c, dtype, poison):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 24, generator=g).to(dtype).to(DEVICE)
    cent = torch.randn(3, c, 24, generator=g).to(dtype).to(DEVICE)
    out = poison(torch.empty(3, n, dtype=torch.int32, device=DEVICE))
    assign(x, cent, out=out)
    ref = assign_ref(x, cent)
    assert out.min() >= 0 and out.max() < c
    # identical codes except where two centroids are equally near within rounding
    d_tri, d_ref = _dist(x, cent, out), _dist(x, cent, ref)
    tol = {torch.float32: 1e-4 if DEVICE == "cpu" else 0.05, torch.float16: 5e-2}[dtype]  # GPU float32: tf32 dots
    assert torch.all(d_tri <= d_ref + tol)
    assert (out.long() == ref).float().mean() > 0.95


def test_assign_ref_is_nearest_against_float64_brute_force():
    x, c = torch.randn(2, 50, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    brute = torch.cdist(x, c).argmin(-1)
    assert torch.equal(assign_ref(x, c), brute)


def test_kmeans_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(1, 4, 8, generator=g) * 10
    x = (centers.repeat_interleave(50, dim=1) + 0.1 * torch.randn(1, 200, 8, generator=g))
    cent = kmeans(x, 4, iters=20, seed=1)
    # every planted center has a centroid within the noise
    assert torch.cdist(centers, cent).min(-1).values.max() < 0.5


def spec(d=16, h=2):
    return LayerSpec(batch=1, kv_heads=h, head_dim=d, dtype=torch.float32, device=torch.device("cpu"), max_len=1024)


def test_cluster_layer_codes_window_bytes_and_truncate():
    lay = registry.build("cache", "cluster", {"num_clusters": 16, "residual": 32, "iters": 5}).new_layer(spec())
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    lay.append(k[:, :, :150], v[:, :, :150])
    assert (lay.n_coded, lay.n_res) == (64, 86)  # the window flushes in blocks of 64
    for i in range(150, 200):
        lay.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert lay.length == 200 and lay.n_res >= 32
    kd, vd = lay.dense()
    n = lay.n_coded
    assert torch.equal(kd[:, :, n:], k[:, :, n:])  # the window is exact
    # coded rows are centroids: the nearest ones of their codebook
    assert torch.equal(lay.k_codes[:, :, :n].long(), assign_ref(k[0, :, :n], lay.k_book[0])[None])
    err = ((kd[:, :, :n] - k[:, :, :n]).pow(2).mean() / k[:, :, :n].pow(2).mean()).item()
    assert 0 < err < 1.0
    # what the layer's own tensors hold for these tokens: codes, codebooks, the window's rows; below dense K/V
    held = [lay.k_codes[:, :, :n], lay.v_codes[:, :, :n], lay.k_book, lay.v_book, lay.k_res[:, :, : lay.n_res],
            lay.v_res[:, :, : lay.n_res]]
    assert lay.stored_bytes() == sum(t.numel() * t.element_size() for t in held)
    assert lay.stored_bytes() < (kd.numel() * kd.element_size() + vd.numel() * vd.element_size()) / 2
    before = [x.clone() for x in lay.dense()]
    lay.truncate(100)  # inside the coded region: exact
    for a, b in zip(lay.dense(), before, strict=True):
        assert torch.equal(a, b[:, :, :100])
    assert lay.compress_seconds > 0


def test_cluster_bad_parameters():
    with pytest.raises(PluginError, match="num_clusters must be in"):
        registry.build("cache", "cluster", {"num_clusters": 1})


@pytest.mark.gpu
def test_assign_bf16_gpu():
    x = torch.randn(16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(16, 256, 128, device="cuda", dtype=torch.bfloat16)
    out = assign(x, c)
    ref = assign_ref(x, c)
    assert torch.all(_dist(x, c, out) <= _dist(x, c, ref) + 0.5)
    assert (out.long() == ref).float().mean() > 0.95

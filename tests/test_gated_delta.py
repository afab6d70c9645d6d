"""The gated delta rule: the chunked form against the token-by-token definition in float64 on odd lengths, both
against transformers' own PyTorch implementation, state hand-off between chunks, the per-token states a verify
block rolls back to, and (GPU) flash-linear-attention's kernels against the reference."""

import pytest
import torch

from ollm_triton.kernels.gated_delta import (
    fla_available,
    gated_delta,
    gated_delta_chunked,
    gated_delta_recurrent,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(t, *, b=2, h=2, hv=4, dk=16, dv=8, dtype=torch.float64, device="cpu", seed=0, state=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = rnd(b, t, h, dk), rnd(b, t, h, dk), rnd(b, t, hv, dv)
    # decays spread from ~1 to e^-3 per token, betas over (0, 1): both extremes of the rule are exercised
    g = (-3 * torch.rand(b, t, hv, generator=gen, dtype=torch.float64)).to(device=device, dtype=torch.float32
                                                                            if dtype != torch.float64 else dtype)
    beta = torch.rand(b, t, hv, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    s0 = rnd(b, hv, dk, dv).float() if dtype != torch.float64 else rnd(b, hv, dk, dv)
    return q, k, v, g, beta, (s0 if state else None)


@pytest.mark.parametrize("t", [1, 63, 129])
@pytest.mark.parametrize("state", [False, True])
def test_chunked_equals_recurrent_float64(t, state):
    q, k, v, g, beta, s0 = inputs(t, state=state)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, s0)
    o, s = gated_delta_chunked(q, k, v, g, beta, s0)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [1, 63, 129])
def test_recurrent_matches_transformers(t):
    """transformers' torch_recurrent_gated_delta_rule (independent code) on the same float32 inputs."""
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, s0 = inputs(t, dtype=torch.float32)
    o_hf, s_hf = mod.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    o, s = gated_delta_chunked(q, k, v, g, beta, s0)
    torch.testing.assert_close(o, o_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_hf, rtol=1e-5, atol=1e-5)


def test_state_hand_off_between_chunks():
    """A prompt in two pieces (the second starting from the first's state) equals the prompt at once."""
    q, k, v, g, beta, _ = inputs(129, state=False)
    o_all, s_all = gated_delta_chunked(q, k, v, g, beta)
    cut = 70
    o1, s1 = gated_delta_chunked(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut])
    o2, s2 = gated_delta_recurrent(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], s1)
    torch.testing.assert_close(torch.cat((o1, o2), 1), o_all, rtol=0, atol=1e-12)
    torch.testing.assert_close(s2, s_all, rtol=0, atol=1e-12)


def test_all_states_are_each_prefix_final_state():
    q, k, v, g, beta, s0 = inputs(7)
    _, s_last, states = gated_delta_recurrent(q, k, v, g, beta, s0, all_states=True)
    assert states.shape == (7, *s0.shape)
    for t in range(7):
        _, s_t = gated_delta_chunked(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], g[:, : t + 1], beta[:, : t + 1], s0)
        torch.testing.assert_close(states[t], s_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(states[-1], s_last, rtol=0, atol=0)


def test_dispatch_without_fla_is_the_reference():
    q, k, v, g, beta, s0 = inputs(40)
    assert not fla_available(torch.device("cpu"))
    o, s = gated_delta(q, k, v, g, beta, s0)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, s0)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)


def test_value_heads_must_group_key_heads():
    q, k, v, g, beta, _ = inputs(3, h=3, hv=4, state=False)
    with pytest.raises(ValueError, match="multiple of key heads"):
        gated_delta_recurrent(q, k, v, g, beta)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 63, 129, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_matches_reference(t, dtype):
    if not fla_available(torch.device("cuda")):
        pytest.skip("flash-linear-attention (the `linear` extra) is not installed")
    q, k, v, g, beta, s0 = inputs(t, h=4, hv=8, dk=128, dv=128, dtype=dtype, device="cuda")
    o, s = gated_delta(q, k, v, g, beta, s0, use_fla=True)
    o_ref, s_ref = gated_delta(q.double(), k.double(), v.double(), g.double(), beta.double(), s0.double(),
                               use_fla=False)

    def rel_rms(x, ref):
        return ((x.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()

    limit = 2e-3 if dtype == torch.float32 else 2e-2  # fla may run its fp32 dots in tf32
    assert rel_rms(o, o_ref) < limit and rel_rms(s, s_ref) < limit

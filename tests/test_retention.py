"""strawberry.retention: causal, factored, recurrent and differentiable (notebook 05)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from strawberry.layers import rms_norm
from strawberry.retention import Retention, batch_mean, fourier_features, prefix_mean

torch.set_num_threads(1)


class BatchGlobalRetention(nn.Module):
    """Tiny reference of the original (c6344fd): one delta from all B*T tokens of the batch."""

    def __init__(self, n_embd, n_qkv):
        super().__init__()
        self.n_qkv, self.rank, self.f = n_qkv, n_embd // 8, n_qkv // n_embd
        self.uv = nn.Linear(n_embd, 2 * self.rank, bias=False)
        self.proj = nn.Linear(self.rank, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        r = self.rank
        u, v = self.uv(rms_norm(x)).reshape(B * T, 2 * r).chunk(2, dim=-1)
        S = u.T @ v / math.sqrt(B * T)
        k = torch.arange(1, 2 * self.f).view(-1, 1, 1)
        feats = torch.cat([torch.ones(1, r, r), torch.sigmoid(S)[None],
                           torch.sin(3.14 * torch.tanh(k * S)), torch.cos(3.14 * torch.tanh(k * S))])
        w = self.proj(feats).repeat_interleave(C // r, dim=1).reshape(4 * self.n_qkv, C)
        return F.normalize(w[: 3 * self.n_qkv], dim=1) * C ** -0.5


@torch.no_grad()
def causality_report(fn, x, t_cut):
    """Largest change of fn(x) where causality and batch independence forbid any."""
    g = torch.Generator().manual_seed(1)
    y = fn(x)
    future, other = x.clone(), x.clone()
    future[:, t_cut:] = torch.randn(future[:, t_cut:].shape, generator=g)
    other[1:] = torch.randn(other[1:].shape, generator=g)
    return {"future": (fn(future) - y)[:, :t_cut].abs().max().item(),
            "other sequence": (fn(other) - y)[0].abs().max().item(),
            "batch size": (fn(x[:1]) - y[:1]).abs().max().item(),
            "prefix": (fn(x[:, :t_cut]) - y[:, :t_cut]).abs().max().item()}


def explicit_delta_weight(m, down, up):
    return torch.einsum("or,btrs,si->btoi", up.weight, m, down.weight)


@pytest.fixture
def retention():
    torch.manual_seed(0)
    return Retention(n_embd=32, d_qkv=96, d_out=32, rank=4, n_freq=3)


def test_original_batch_global_version_fails_all_four_causality_tests():
    torch.manual_seed(0)
    original = BatchGlobalRetention(64, 128)
    report = causality_report(lambda x: F.linear(rms_norm(x), original(x)), torch.randn(4, 32, 64), t_cut=16)
    assert all(change > 1e-3 for change in report.values()), report


def test_causal_version_passes_all_four_causality_tests(retention):
    report = causality_report(lambda x: retention.delta_qkv(retention(x), x), torch.randn(4, 32, 32), t_cut=16)
    assert all(change <= 1e-6 for change in report.values()), report
    report = causality_report(lambda x: retention.delta_out(retention(x), x), torch.randn(4, 32, 32), t_cut=16)
    assert all(change <= 1e-6 for change in report.values()), report


def test_batch_global_option_leaks_like_the_original_and_refuses_a_cache(retention):
    leaky = Retention(n_embd=32, d_qkv=96, d_out=32, rank=4, n_freq=3, batch_global=True)
    leaky.load_state_dict(retention.state_dict())
    x = torch.randn(4, 32, 32)
    report = causality_report(lambda x: leaky.delta_qkv(leaky(x), x), x, t_cut=16)
    assert all(change > 1e-3 for change in report.values()), report
    u, v = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    s = batch_mean(u, v)
    assert s.shape == (2, 5, 3, 3) and torch.allclose(s[1, 4], prefix_mean(u.reshape(1, 10, 3), v.reshape(1, 10, 3))[0, -1])
    with pytest.raises(ValueError, match="no causal state to cache"):
        leaky(x, cache={})


def test_no_gradient_flows_from_future_inputs(retention):
    x = torch.randn(1, 12, 32, requires_grad=True)
    retention.delta_qkv(retention(x), x)[0, 5].sum().backward()
    assert x.grad[0, 6:].abs().max() == 0 and x.grad[0, :6].abs().max() > 0


def test_prefix_mean_matches_a_loop_over_positions():
    u, v = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    S = prefix_mean(u, v)
    for b in range(2):
        for t in range(7):
            ref = sum(torch.outer(u[b, i], v[b, i]) for i in range(t + 1)) / (t + 1)
            assert torch.allclose(S[b, t], ref, atol=1e-6)


def test_fourier_features_are_the_true_basis_plus_a_ramp():
    s = torch.randn(2, 4, 4) * 3
    phi = fourier_features(s, 3)
    theta = math.pi * torch.tanh(s)
    assert phi.shape == (2, 7, 4, 4)
    assert torch.allclose(phi[:, 0], torch.tanh(s))
    for k in range(1, 4):
        assert torch.allclose(phi[:, k], torch.sin(k * theta), atol=1e-6)
        assert torch.allclose(phi[:, 3 + k], torch.cos(k * theta), atol=1e-6)
    assert torch.allclose((phi[:, 1:] ** 2).sum(1), torch.full_like(s, 3.0), atol=1e-5)


def test_factored_application_equals_explicit_per_token_weight(retention):
    x, h = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    m = retention(x)
    dW_qkv = explicit_delta_weight(m, retention.qkv_down, retention.qkv_up)
    dW_out = explicit_delta_weight(m, retention.out_down, retention.out_up)
    assert dW_qkv.shape == (2, 9, 96, 32)
    assert (torch.einsum("btoi,bti->bto", dW_qkv, x) - retention.delta_qkv(m, x)).abs().max() <= 1e-5
    assert (torch.einsum("btoi,bti->bto", dW_out, h) - retention.delta_out(m, h)).abs().max() <= 1e-5


def test_recurrent_decoding_equals_parallel_pass(retention):
    x = torch.randn(3, 20, 32)
    parallel = retention.delta_qkv(retention(x), x)
    cache, chunks = {}, []
    for start, stop in [(0, 7), (7, 8), (8, 9), (9, 15)] + [(t, t + 1) for t in range(15, 20)]:
        xs = x[:, start:stop]
        chunks.append(retention.delta_qkv(retention(xs, cache), xs))
    assert cache["count"] == 20 and cache["sum"].shape == (3, 4, 4)
    assert (torch.cat(chunks, dim=1) - parallel).abs().max() <= 1e-5


def test_retention_matrix_is_bounded_for_any_input(retention):
    for scale in (1e-4, 1.0, 1e4):
        m = retention(scale * torch.randn(2, 8, 32))
        assert m.flatten(2).norm(dim=-1).max() <= retention.coef.norm() / retention.rank + 1e-6


def test_gradcheck_float64():
    s = (torch.randn(2, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: fourier_features(s, 3), (s,))
    u = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(prefix_mean, (u, v))
    torch.manual_seed(0)
    small = Retention(8, 12, 4, rank=2, n_freq=2).double()
    x, h = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)

    def path(uv_weight, coef, h):
        m = torch.func.functional_call(small, {"uv.weight": uv_weight, "coef": coef}, (x,))
        return small.delta_qkv(m, x), small.delta_out(m, h)

    inputs = [t.detach().clone().requires_grad_() for t in (small.uv.weight, small.coef, h)]
    assert torch.autograd.gradcheck(path, inputs)


def test_dtypes_and_devices(retention):
    x = torch.randn(2, 5, 32)
    ref = retention.delta_qkv(retention(x), x)
    double = Retention(32, 96, 32, rank=4, n_freq=3)
    double.load_state_dict(retention.state_dict())
    double = double.double()
    out = double.delta_qkv(double(x.double()), x.double())
    assert out.dtype == torch.float64 and torch.allclose(out.float(), ref, atol=1e-5)
    bf16 = Retention(32, 96, 32).to(torch.bfloat16)
    assert bf16.delta_out(bf16(x.bfloat16()), x.bfloat16()).dtype == torch.bfloat16
    meta = Retention(32, 96, 32).to("meta")
    assert meta.delta_qkv(meta(x.to("meta")), x.to("meta")).shape == (2, 5, 96)
    assert not list(retention.buffers())          # nothing that could be left behind by .to()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(retention):
    x = torch.randn(2, 6, 32)
    ref = retention.delta_qkv(retention(x), x)
    gpu = retention.to("cuda")
    cache = {}
    out = gpu.delta_qkv(gpu(x.cuda(), cache), x.cuda())
    assert cache["sum"].device.type == "cuda"
    assert torch.allclose(out.cpu(), ref, atol=1e-4)


def test_bad_input_raises_clear_errors(retention):
    with pytest.raises(ValueError, match=r"expects x of shape \(B, T, 32\)"):
        retention(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="start a new cache"):
        retention(torch.randn(2, 5, 32), {"sum": torch.zeros(3, 4, 4), "count": 5})
    with pytest.raises(ValueError, match="n_freq"):
        Retention(32, 96, 32, n_freq=0)
    with pytest.raises(ValueError, match="n_freq must be >= 1"):
        fourier_features(torch.zeros(2, 2), 0)
    m = retention(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="to match"):
        retention.delta_qkv(m, torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="to match"):
        retention.delta_out(m, torch.randn(2, 5, 16))

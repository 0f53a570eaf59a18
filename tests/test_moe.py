"""Tests for strawberry.moe: the sparse SwiGLU FFN, its balancing losses, and local MoE attention."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from strawberry.layers import SwiGLU, causal_attention
from strawberry.moe import (MOE_AUX_WEIGHTS, LocalMoEAttention, MoESwiGLU, collect_aux_losses, cv_squared,
                            grouped_apply, prob_in_top_k, weighted_aux_loss)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_router(moe: MoESwiGLU, std: float = 0.5) -> MoESwiGLU:
    with torch.no_grad():
        moe.w_gate.normal_(std=std)
        if moe.w_noise is not None:
            moe.w_noise.normal_(std=std)
    return moe


def dense_mixture(moe: MoESwiGLU, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_i G_i E_i(x) with every expert run on every token, from the stacked weights."""
    h = F.silu(torch.einsum("nc,ehc->neh", x, moe.w1)) * torch.einsum("nc,ehc->neh", x, moe.w3)
    return torch.einsum("ne,neh,ech->nc", gates, h, moe.w2)


# ---------------------------------------------------------------- dispatch and gates

def test_grouped_apply_keeps_row_order_and_skips_empty_groups():
    x = torch.arange(7.0).unsqueeze(1)
    group = torch.tensor([3, 0, 3, 1, 0, 3, 1])          # group 2 is empty
    calls = []

    def fn(g, rows):
        calls.append(g)
        return rows * 0 + g
    y = grouped_apply(x, group, 4, fn)
    assert torch.equal(y.squeeze(1), group.float())
    assert calls == [0, 1, 3]


@pytest.mark.parametrize("train", [False, True])
def test_sparse_dispatch_equals_dense_sum(train):
    moe = random_router(MoESwiGLU(24, n_experts=5, top_k=2, hidden=40)).train(train)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        torch.manual_seed(1)
        y = moe(x)
        torch.manual_seed(1)                              # the same noise for the reference
        gates, _, _ = moe.route(x.reshape(-1, 24))
    assert torch.allclose(y.reshape(-1, 24), dense_mixture(moe, x.reshape(-1, 24), gates), atol=1e-6)


@pytest.mark.parametrize("n_experts,top_k,gating", [(4, 1, "topk"), (6, 2, "noisy_topk"), (5, 3, "topk"), (3, 3, "noisy_topk")])
def test_gate_rows_have_k_nonzeros_summing_to_one(n_experts, top_k, gating):
    moe = random_router(MoESwiGLU(16, n_experts, top_k, gating=gating, hidden=16)).train()
    gates, chosen, _ = moe.route(torch.randn(50, 16))
    assert gates.dtype == torch.float32 and chosen.shape == (50, top_k)
    assert ((gates > 0).sum(1) == top_k).all()
    assert torch.allclose(gates.sum(1), torch.ones(50))
    assert torch.equal(gates.gather(1, chosen) > 0, torch.ones(50, top_k, dtype=torch.bool))


def test_single_expert_equals_dense_swiglu():
    dense = SwiGLU(32, hidden=48)
    moe = MoESwiGLU(32, n_experts=1, top_k=1, hidden=48)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(moe, name)[0] = getattr(dense, name).weight
    x = torch.randn(2, 9, 32)
    for mode in (True, False):
        moe.train(mode)
        assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_default_hidden_and_parameter_count():
    moe = MoESwiGLU(64, n_experts=4, top_k=2)
    dense = SwiGLU(64)
    expert_params = moe.w1.numel() + moe.w2.numel() + moe.w3.numel()
    assert expert_params == 4 * sum(p.numel() for p in dense.parameters())


def test_moe_output_depends_only_on_its_own_token():
    moe = random_router(MoESwiGLU(16, 4, 2, hidden=16)).eval()
    x = torch.randn(2, 10, 16)
    x2 = x.clone()
    x2[0, 5:] = torch.randn(5, 16)
    x2[1] = torch.randn(10, 16)
    with torch.no_grad():
        assert (moe(x)[0, :5] - moe(x2)[0, :5]).abs().max() <= 1e-6


def test_gradients_reach_experts_and_router():
    moe = random_router(MoESwiGLU(16, 4, 2, hidden=16, balance="shazeer")).train()
    y = moe(torch.randn(32, 16))
    (y.pow(2).mean() + weighted_aux_loss(moe.aux_losses, MOE_AUX_WEIGHTS)).backward()
    for p in (moe.w1, moe.w2, moe.w3, moe.w_gate, moe.w_noise):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_router_runs_in_fp32_under_autocast():
    moe = random_router(MoESwiGLU(16, 4, 2, hidden=16))
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, _, aux = moe.route(x)
        y = moe(x)
    assert gates.dtype == torch.float32 and aux["moe_z"].dtype == torch.float32
    assert y.shape == x.shape


@pytest.mark.parametrize("kwargs", [dict(n_experts=0), dict(top_k=0), dict(top_k=5), dict(gating="soft"),
                                    dict(balance="none")])
def test_moe_bad_config_raises(kwargs):
    config = dict(n_embd=16, n_experts=4, top_k=2) | kwargs
    with pytest.raises(ValueError):
        MoESwiGLU(**config)


def test_moe_wrong_width_raises():
    with pytest.raises(ValueError, match="last dimension"):
        MoESwiGLU(16, 4, 2)(torch.randn(3, 8))


# ---------------------------------------------------------------- balancing losses

def test_prob_in_top_k_matches_monte_carlo():
    n, e, k, draws = 5, 4, 2, 100_000
    clean = torch.randn(n, e)
    std = torch.rand(n, e) + 0.3
    noisy = clean + torch.randn(n, e) * std
    exact = prob_in_top_k(clean, noisy, std, k)
    for i in range(e):
        h = noisy.expand(draws, n, e).clone()
        h[:, :, i] = clean[:, i] + torch.randn(draws, n) * std[:, i]
        freq = (h.topk(k, dim=-1).indices == i).any(-1).float().mean(0)
        assert (freq - exact[:, i]).abs().max() < 0.01
    assert torch.equal(prob_in_top_k(clean, noisy, std, e), torch.ones(n, e))


def test_cv_squared():
    assert cv_squared(torch.full((5,), 3.0)) == 0
    assert math.isclose(cv_squared(torch.tensor([1.0, 3.0])).item(), 0.25, rel_tol=1e-6)   # var 1, mean 2
    assert cv_squared(torch.tensor([7.0])) == 0                                             # E = 1


def test_switch_loss_is_one_at_uniform_routing_and_z_loss_is_log_e_squared():
    moe = MoESwiGLU(16, n_experts=4, top_k=2).train()        # zero router: uniform probabilities
    moe(torch.randn(64, 16))
    assert torch.allclose(moe.aux_losses["moe_balance"], torch.tensor(1.0))
    assert torch.allclose(moe.aux_losses["moe_z"], torch.tensor(math.log(4) ** 2))
    assert math.isclose(MOE_AUX_WEIGHTS["moe_balance"] * moe.aux_losses["moe_balance"].item(), 1e-2, rel_tol=1e-6)


def test_switch_loss_is_one_when_assignments_are_uniform():
    # two tokens, two experts, k = 1: each expert gets one token, whatever the probabilities
    moe = MoESwiGLU(2, n_experts=2, top_k=1, gating="topk", hidden=4)
    with torch.no_grad():
        moe.w_gate.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    moe(torch.eye(2))
    assert torch.allclose(moe.aux_losses["moe_balance"], torch.tensor(1.0))


def test_shazeer_losses_are_reported_and_load_is_differentiable_with_noise():
    moe = random_router(MoESwiGLU(16, 4, 2, balance="shazeer", hidden=16)).train()
    moe(torch.randn(40, 16))
    assert set(moe.aux_losses) == {"moe_importance", "moe_load", "moe_z"}
    moe.aux_losses["moe_load"].backward()
    assert moe.w_noise.grad.abs().sum() > 0 and moe.w_gate.grad.abs().sum() > 0


def test_balance_loss_moves_expert_fractions_toward_uniform():
    n_experts, k, c = 8, 2, 16
    moe = MoESwiGLU(c, n_experts, k, hidden=32, gating="topk")
    offset = torch.randn(c)
    with torch.no_grad():
        moe.w_gate.normal_(std=0.3)                            # a skewed router to start from
    probe = torch.randn(1024, c) + offset

    def fractions():
        with torch.no_grad():
            chosen = moe.route(probe)[1]
        return torch.bincount(chosen.flatten(), minlength=n_experts).float() / chosen.numel()
    before = cv_squared(fractions())
    for _ in range(60):                                       # plain gradient descent on the Switch loss alone
        moe(torch.randn(256, c) + offset)
        grad, = torch.autograd.grad(moe.aux_losses["moe_balance"], moe.w_gate)
        with torch.no_grad():
            moe.w_gate -= 0.3 * grad
    after = cv_squared(fractions())
    assert before > 0.3 and after < before / 4


def test_collect_and_weight_aux_losses():
    model = nn.Sequential(MoESwiGLU(16, 4, 2, hidden=16), nn.Linear(16, 16), MoESwiGLU(16, 4, 2, hidden=16)).train()
    model(torch.randn(8, 16))
    aux = collect_aux_losses(model)
    assert set(aux) == {"moe_balance", "moe_z"}
    assert torch.allclose(aux["moe_z"], model[0].aux_losses["moe_z"] + model[2].aux_losses["moe_z"])
    total = weighted_aux_loss(aux, {"moe_balance": 0.5, "moe_z": 0.0})
    assert torch.allclose(total, 0.5 * aux["moe_balance"])
    with pytest.raises(ValueError, match="moe_z"):
        weighted_aux_loss(aux, {"moe_balance": 1.0})
    assert collect_aux_losses(nn.Linear(2, 2)) == {}


# ---------------------------------------------------------------- local MoE attention

def attention_loop(layer: LocalMoEAttention, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token, head and chosen expert at a time."""
    B, T, C = x.shape
    H, d, E, w = layer.n_head, layer.head_dim, layer.n_experts, layer.window
    q = layer.q_proj(x).view(B, T, H, d).transpose(1, 2)
    key = layer.k_proj(x).view(B, T, H, d).transpose(1, 2)
    q, key = layer.qk_norm(q, key)
    q, key = layer.rope(q), layer.rope(key)
    out = torch.zeros(B, T, C)
    for b in range(B):
        v = torch.zeros(H, T, d)
        for t in range(T):
            for h in range(H):
                s = torch.sigmoid(layer.router_v[h * E:(h + 1) * E] @ x[b, t])
                for e in s.topk(layer.top_k).indices.tolist():
                    v[h, t] += s[e] * (layer.w_v[h * E + e] @ x[b, t])
        for t in range(T):
            lo = max(0, t - w + 1)
            for h in range(H):
                a = torch.softmax(key[b, h, lo:t + 1] @ q[b, h, t] / math.sqrt(d), dim=0) @ v[h, lo:t + 1]
                s = torch.sigmoid(layer.router_o[h * E:(h + 1) * E] @ x[b, t])
                for e in s.topk(layer.top_k).indices.tolist():
                    out[b, t] += s[e] * (layer.w_o[h * E + e] @ a)
    return out


@pytest.mark.parametrize("window,n_experts,top_k,head_dim", [(3, 4, 2, None), (20, 3, 1, 8), (1, 2, 2, None)])
def test_local_moe_attention_equals_per_token_loop(window, n_experts, top_k, head_dim):
    layer = LocalMoEAttention(24, n_head=3, window=window, n_experts=n_experts, top_k=top_k, head_dim=head_dim)
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        assert torch.allclose(layer(x), attention_loop(layer, x), atol=1e-5)


def test_local_moe_attention_is_causal_and_batch_independent():
    layer = LocalMoEAttention(32, n_head=2, window=4, n_experts=4, top_k=2)
    x = torch.randn(3, 12, 32)
    x2 = x.clone()
    x2[0, 6:] = torch.randn(6, 32)                            # the future of sequence 0
    x2[1:] = torch.randn(2, 12, 32)                           # the other sequences
    with torch.no_grad():
        assert (layer(x)[0, :6] - layer(x2)[0, :6]).abs().max() <= 1e-6


@pytest.mark.parametrize("prompt,window", [(5, 4), (2, 6), (1, 1), (9, 3)])
def test_cached_decoding_equals_full_forward(prompt, window):
    layer = LocalMoEAttention(32, n_head=2, window=window, n_experts=3, top_k=2)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        full = layer(x)
        cache: dict = {}
        outs = [layer(x[:, :prompt], cache)]
        for t in range(prompt, 13):
            outs.append(layer(x[:, t:t + 1], cache))
            assert cache["k"].shape[2] <= window and cache["v"].shape[2] <= window
        assert cache["offset"] == 13
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
        chunked: dict = {}                                    # chunks of 4 tokens give the same
        outs = [layer(x[:, i:i + 4], chunked) for i in range(0, 13, 4)]
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_window_at_least_t_equals_full_causal_attention():
    layer = LocalMoEAttention(32, n_head=2, window=10, n_experts=3, top_k=2)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        y = layer(x)
        layer.window = 10_000
        assert torch.allclose(layer(x), y, atol=1e-6)
        layer.window = 9                                      # a shorter window does change the last output
        assert not torch.allclose(layer(x)[:, -1], y[:, -1], atol=1e-4)


def test_single_expert_is_dense_attention_with_sigmoid_gates():
    layer = LocalMoEAttention(32, n_head=2, window=4, n_experts=1, top_k=1)
    x = torch.randn(2, 9, 32)
    B, T, H, d = 2, 9, 2, 16
    with torch.no_grad():
        q = layer.q_proj(x).view(B, T, H, d).transpose(1, 2)
        key = layer.k_proj(x).view(B, T, H, d).transpose(1, 2)
        q, key = layer.qk_norm(q, key)
        q, key = layer.rope(q), layer.rope(key)
        gate_v = torch.sigmoid(x @ layer.router_v.T).transpose(1, 2).unsqueeze(-1)   # (B, H, T, 1)
        gate_o = torch.sigmoid(x @ layer.router_o.T).transpose(1, 2).unsqueeze(-1)
        v = torch.einsum("hdc,btc->bhtd", layer.w_v, x) * gate_v
        heads = causal_attention(q, key, v, window=4) * gate_o
        expected = heads.transpose(1, 2).reshape(B, T, H * d) @ layer.w_o.transpose(1, 2).reshape(H * d, 32)
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_attention_gradients_reach_every_part():
    layer = LocalMoEAttention(16, n_head=2, window=3, n_experts=3, top_k=2)
    layer(torch.randn(2, 8, 16)).pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_under_bf16_autocast():
    layer = LocalMoEAttention(16, n_head=2, window=3, n_experts=3, top_k=2)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        scores, _ = layer.select(x.reshape(-1, 16), layer.router_v)
    assert scores.dtype == torch.float32
    assert torch.allclose(y.float(), layer(x), atol=0.1)


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(n_experts=0), dict(top_k=3), dict(n_head=5),
                                    dict(head_dim=7)])
def test_attention_bad_config_raises(kwargs):
    config = dict(n_embd=32, n_head=2, window=4, n_experts=2, top_k=1) | kwargs
    with pytest.raises(ValueError):
        LocalMoEAttention(**config)


def test_attention_wrong_input_shape_raises():
    layer = LocalMoEAttention(32, n_head=2, window=4, n_experts=2, top_k=1)
    with pytest.raises(ValueError, match="expected x"):
        layer(torch.randn(5, 32))

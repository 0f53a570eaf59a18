"""Unit tests for strawberry.layers (notebook 02): RMSNorm, RoPE, QK-norm, attention, SwiGLU."""
import math

import pytest
import torch
import torch.nn.functional as F

from strawberry.layers import (QKNorm, RMSNorm, RotaryEmbedding, SwiGLU, causal_attention, rms_norm,
                               swiglu_hidden)


def naive_attention(q, k, v, window=None):
    """Per-query masked softmax; query i sits at absolute position Tk - Tq + i."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    out = torch.zeros_like(q)
    for i in range(Tq):
        p = Tk - Tq + i
        lo = 0 if window is None else max(0, p - window + 1)
        s = q[..., i : i + 1, :] @ k[..., lo : p + 1, :].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[..., i, :] = (s.softmax(-1) @ v[..., lo : p + 1, :])[..., 0, :]
    return out


def interleaved_rope(x, offset=0, base=10000.0):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(offset, offset + x.shape[-2], dtype=torch.float64)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    z = z * torch.polar(torch.ones(()), torch.outer(pos, theta).double().float()).to(z.dtype)
    return torch.view_as_real(z).reshape(x.shape).to(x.dtype)


# --- RMSNorm -----------------------------------------------------------------------------------

def test_rms_norm_unit_rms_and_dtype():
    x = 5 * torch.randn(3, 4, 32)
    y = rms_norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 4), atol=1e-4)
    assert rms_norm(x.bfloat16()).dtype == torch.bfloat16


def test_rmsnorm_gain_and_errors():
    norm = RMSNorm(8)
    assert torch.equal(norm.weight, torch.ones(8))
    x = torch.randn(2, 8)
    with torch.no_grad():
        norm.weight.fill_(3.0)
    assert torch.allclose(norm(x), 3 * rms_norm(x))
    with pytest.raises(ValueError, match="last dimension of 8"):
        norm(torch.randn(2, 7))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        RMSNorm(0)


# --- RoPE --------------------------------------------------------------------------------------

def test_rope_preserves_norms():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 10, 16)
    assert torch.allclose(rope(x, offset=5).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rope_relative_position_property():
    rope, d = RotaryEmbedding(32), 32
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(m, n):
        return (rope(q, offset=m) * rope(k, offset=n)).sum().item()

    for delta in [0, 1, 7]:
        ref = score(delta, 0)
        for n in [3, 50, 400]:
            assert abs(score(n + delta, n) - ref) < 1e-3


def test_rope_half_split_equals_interleaved_under_permutation():
    d = 8
    rope = RotaryEmbedding(d)
    x = torch.randn(1, 2, 6, d)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    got = rope(x[..., perm], offset=2)[..., torch.argsort(perm)]
    assert torch.allclose(got, interleaved_rope(x, offset=2), atol=1e-5)


def test_rope_offset_and_growth():
    rope = RotaryEmbedding(8, max_seq_len=4)
    x = torch.randn(1, 1, 10, 8)
    full = rope(x)                                      # longer than max_seq_len: tables grow
    assert rope.cos.shape[0] == 10
    assert torch.allclose(rope(x[:, :, 6:], offset=6), full[:, :, 6:], atol=1e-6)


def test_rope_buffers_follow_device_and_dtype_and_are_not_saved():
    rope = RotaryEmbedding(8)
    assert set(rope.state_dict()) == set()
    meta = RotaryEmbedding(8).to("meta")                    # (a forward on meta costs seconds of imports)
    assert meta.cos.is_meta and meta.sin.is_meta and meta.cos.dtype == torch.float32
    half = RotaryEmbedding(8).to(torch.bfloat16)
    x = torch.randn(1, 1, 300, 8)
    y = half(x.bfloat16(), offset=1000)
    assert y.dtype == torch.bfloat16 and half.cos.dtype == torch.float32   # tables rebuilt in fp32
    assert torch.allclose(y.float(), rope(x.bfloat16().float(), offset=1000), atol=3e-2)


def test_rope_bad_arguments():
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"\(B, H, T, 8\)"):
        rope(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="offset"):
        rope(torch.randn(1, 1, 2, 8), offset=-1)


# --- QK-norm -----------------------------------------------------------------------------------

def test_qknorm_per_head_and_bounds_logits():
    d = 16
    qk = QKNorm(d)
    q, k = 100 * torch.randn(2, 4, 5, d), 100 * torch.randn(2, 4, 5, d)
    qn, kn = qk(q, k)
    assert torch.allclose(qn.pow(2).mean(-1), torch.ones(2, 4, 5), atol=1e-4)   # per head, per token
    assert (qn @ kn.transpose(-1, -2)).abs().max() <= d + 1e-3
    assert sum(p.numel() for p in qk.parameters()) == 2 * d


# --- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 1, 2, 4, 9, 16])
def test_windowed_attention_matches_naive(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    assert torch.allclose(causal_attention(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize("T, window", [(33, 16), (64, 16), (65, 16), (100, 7), (129, 64)])
def test_blocked_window_attention_equals_the_band_mask_with_gradients(T, window):
    """T > 2 * window takes the O(T * window) blocked path; it must equal a band mask on full attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3))
    pos, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = F.scaled_dot_product_attention(q, k, v, attn_mask=(key <= pos) & (key > pos - window))
    blocked = causal_attention(q, k, v, window)
    assert torch.allclose(blocked, band, atol=1e-5)
    grads = torch.autograd.grad((blocked * torch.arange(T).view(1, 1, T, 1)).sum(), (q, k, v))
    expected = torch.autograd.grad((band * torch.arange(T).view(1, 1, T, 1)).sum(), (q, k, v))
    assert all(torch.allclose(g, e, atol=1e-4) for g, e in zip(grads, expected))


def test_window_at_least_T_is_full_causal():
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
    full = causal_attention(q, k, v)
    for w in [7, 8, 1000]:
        assert torch.allclose(causal_attention(q, k, v, w), full, atol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("Tq", [1, 3])
def test_cached_queries_are_the_last_positions(Tq, window):
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    got = causal_attention(q[:, :, -Tq:], k, v, window)
    assert torch.allclose(got, causal_attention(q, k, v, window)[:, :, -Tq:], atol=1e-6)
    assert torch.allclose(got, naive_attention(q[:, :, -Tq:], k, v, window), atol=1e-5)


def test_attention_bad_arguments():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_attention(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(ValueError, match="window must be >= 1"):
        causal_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="expects q"):
        causal_attention(q[0], q, q)


# --- SwiGLU ------------------------------------------------------------------------------------

def test_swiglu_hidden_rounding():
    assert swiglu_hidden(128) == 384            # 341.3 -> 384
    assert swiglu_hidden(96) == 256             # 256 exactly
    assert swiglu_hidden(96, multiple_of=1) == 256
    assert swiglu_hidden(100, multiple_of=1) == 267
    assert swiglu_hidden(4096, multiple_of=256) == 11008   # LLaMA-7B
    with pytest.raises(ValueError):
        swiglu_hidden(0)


def test_swiglu_formula_and_parameter_count():
    ffn = SwiGLU(32, hidden=48)
    x = torch.randn(3, 32)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    assert torch.allclose(ffn(x), (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T, atol=1e-6)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 32 * 48
    assert sum(p.numel() for p in SwiGLU(32).parameters()) == 3 * 32 * swiglu_hidden(32)

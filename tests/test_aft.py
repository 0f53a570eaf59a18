"""Unit tests for strawberry.aft (notebook 03): causal AFT-simple and AFT-local, naive = parallel =
recurrent, stability for extreme keys and bf16, causality, gradients and the cache protocol."""
import pytest
import torch

from strawberry.aft import (AFT, aft_attention_weights, aft_local, aft_local_step, aft_naive, aft_simple,
                            aft_step, prefix_scan, token_states)

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
SHAPES = [(1, 1, 1), (2, 7, 3), (3, 50, 5), (2, 131, 4)]


def reference(q, k, v, bias=None):
    """Independent fp64 reference: for each t, a softmax over keys s <= t (+ bias[t - s] in the window)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for t in range(q.shape[1]):
        logits = k[:, : t + 1].clone()
        if bias is not None:
            near = min(len(bias), t + 1)
            logits[:, t + 1 - near:] += bias.double()[:near].flip(0)[:, None]
        out[:, t] = torch.sigmoid(q[:, t]) * (logits.softmax(1) * v[:, : t + 1]).sum(1)
    return out


def random_qkv(B, T, D, key_scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, B, T, D, generator=g, dtype=dtype).unbind(0)
    return q, k * key_scale, v


def run_steps(step, q, k, v, *extra):
    state = {}
    return torch.stack([step(state, q[:, t], k[:, t], v[:, t], *extra) for t in range(q.shape[1])], 1)


def run_chunks(fn, q, k, v, sizes, *extra):
    cache, outs, pos = {}, [], 0
    for size in sizes:
        outs.append(fn(q[:, pos:pos + size], k[:, pos:pos + size], v[:, pos:pos + size], *extra, cache))
        pos += size
    assert pos == q.shape[1]
    return torch.cat(outs, 1), cache


# --- agreement of the forms -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("key_scale", [1.0, 80.0])
def test_simple_naive_parallel_recurrent_agree(dtype, key_scale):
    for seed, shape in enumerate(SHAPES):
        q, k, v = random_qkv(*shape, key_scale, dtype, seed)
        ref = reference(q, k, v)
        for got in (aft_naive(q, k, v), aft_simple(q, k, v), run_steps(aft_step, q, k, v)):
            assert got.dtype == dtype
            assert (got.double() - ref).abs().max() <= TOL[dtype], shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("key_scale", [1.0, 80.0])
def test_local_naive_parallel_recurrent_agree(dtype, key_scale):
    for seed, shape in enumerate(SHAPES[:3]):
        q, k, v = random_qkv(*shape, key_scale, dtype, seed)
        for window in (1, 3, 8, 64):
            bias = 2 * torch.randn(window, generator=torch.Generator().manual_seed(window), dtype=dtype)
            ref = reference(q, k, v, bias)
            for got in (aft_naive(q, k, v, bias), aft_local(q, k, v, bias), run_steps(aft_local_step, q, k, v, bias)):
                assert got.dtype == dtype
                assert (got.double() - ref).abs().max() <= TOL[dtype], (shape, window)


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_prefix_scan_any_chunk_size(chunk):
    q, k, v = random_qkv(2, 37, 3, key_scale=80.0)
    m, n, d = prefix_scan(token_states(k, v), chunk=chunk)
    assert (torch.sigmoid(q) * n / d - reference(q, k, v)).abs().max() <= 1e-6
    assert torch.equal(m, k.cummax(1).values) and (d >= 1).all()


def test_zero_bias_is_aft_simple():
    q, k, v = random_qkv(2, 40, 4, key_scale=80.0)
    assert (aft_local(q, k, v, torch.zeros(6, dtype=torch.float64)) - aft_simple(q, k, v)).abs().max() <= 1e-12


def test_attention_weights_are_causal_rows_of_a_softmax():
    _, k, _ = random_qkv(2, 9, 3)
    w = aft_attention_weights(k, torch.ones(3, dtype=torch.float64))
    assert w.shape == (2, 9, 9, 3)
    assert torch.allclose(w.sum(2), torch.ones(2, 9, 3, dtype=torch.float64))
    assert (w[:, torch.ones(9, 9, dtype=torch.bool).triu(1)] == 0).all()


# --- exactness and stability ------------------------------------------------------------------

def original_aft(q, k, v):
    """The original Strawberry formula (c6344fd): bare exp and a 1e-6 in the denominator."""
    ek = torch.exp(k)
    return torch.sigmoid(q) * torch.cumsum(ek * v, 1) / (torch.cumsum(ek, 1) + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constant_values_give_sigmoid_q_times_c(dtype):
    q, k, _ = random_qkv(2, 100, 8, key_scale=80.0, dtype=dtype)
    c = -2.5
    v = torch.full_like(q, c)
    rel = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    bias = torch.randn(5, dtype=dtype)
    for y in (aft_simple(q, k, v), aft_local(q, k, v, bias), run_steps(aft_step, q, k, v)):
        assert (y - torch.sigmoid(q) * c).abs().max() <= rel * abs(c)
    # the original misses it badly for keys it can produce (RMS-normed over 256 channels: |k| <= 16)
    q0, k0, v0 = torch.zeros(1, 8, 1), torch.full((1, 8, 1), -16.0), torch.ones(1, 8, 1)
    assert (original_aft(q0, k0, v0) / 0.5 - 1).abs().max() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [80.0, 1e4, 1e30])
def test_extreme_keys_stay_finite(dtype, scale):
    q, k, v = random_qkv(2, 100, 8, dtype=torch.float32)
    k = (k * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    q, v = q.to(dtype), v.to(dtype)
    for y in (aft_simple(q, k, v), aft_local(q, k, v, 50 * torch.randn(4)), run_steps(aft_step, q, k, v)):
        assert y.dtype == dtype and torch.isfinite(y).all()


def test_original_overflows_where_ours_does_not():
    q, k, v = random_qkv(1, 64, 4, dtype=torch.float32)
    assert not torch.isfinite(original_aft(q.half(), (4 * k + 8).half(), v.half())).all()
    assert not torch.isfinite(original_aft(q, 80 * k, v)).all()
    assert torch.isfinite(aft_simple(q.half(), (4 * k + 8).half(), v.half())).all()


def test_bf16_autocast_matches_fp32_and_has_finite_grads():
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 96)
    x = torch.randn(2, 64, 32)
    model = AFT(window=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = proj(x).chunk(3, -1)
        k = 80 * k / k.abs().amax()
        y = model(q, k, v)
    assert q.dtype == y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(proj.weight.grad).all() and torch.isfinite(model.pos_bias.grad).all()
    ref = reference(q.float(), k.float(), v.float(), model.pos_bias.detach())
    assert ((y.double() - ref).abs() <= 1e-2 * ref.abs() + 1e-2).all()


# --- causality, gradients, cache --------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 1, 6])
def test_causal_and_batch_independent(window):
    q, k, v = random_qkv(3, 40, 8, dtype=torch.float32)
    model = AFT(window)
    if window:
        torch.nn.init.normal_(model.pos_bias, std=2.0)
    with torch.no_grad():
        y = model(q, k, v)
        k2, v2 = k.clone(), v.clone()
        k2[:, 25:] += 50
        v2[:, 25:] *= -3
        assert torch.equal(model(q, k2, v2)[:, :25], y[:, :25])
        assert torch.equal(model(q[1:2], k[1:2], v[1:2]), y[1:2])


def test_gradcheck_fp64():
    # T = 7: chunks of 2 with one padded token; the token-by-token forms use gradcheck's fast mode
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 7, 2, key_scale=3.0))
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(aft_simple, (q, k, v))
    assert torch.autograd.gradcheck(aft_local, (q, k, v, bias))
    assert torch.autograd.gradcheck(lambda *a: run_steps(aft_step, *a), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: run_steps(aft_local_step, *a), (q, k, v, bias), fast_mode=True)


@pytest.mark.parametrize("window", [None, 1, 4, 16])
@pytest.mark.parametrize("sizes", [(17, 1, 1, 1, 9, 1, 30), (1,) * 60, (2, 58)])
def test_chunked_cache_equals_one_parallel_pass(window, sizes):
    q, k, v = random_qkv(2, 60, 8, key_scale=80.0, dtype=torch.float32)
    model = AFT(window)
    if window:
        torch.nn.init.normal_(model.pos_bias, std=2.0)
    with torch.no_grad():
        full = model(q, k, v)
        got, cache = run_chunks(lambda q, k, v, c: model(q, k, v, cache=c), q, k, v, sizes)
    assert (got - full).abs().max() <= 1e-4
    assert cache["m"].shape == cache["num"].shape == cache["den"].shape == (2, 8)
    assert cache["m"].dtype == torch.float32
    if window:
        assert cache["keys"].shape == cache["values"].shape == (2, window - 1, 8)
    else:
        assert set(cache) == {"m", "num", "den"}


def test_cache_keeps_fp32_under_bf16():
    q, k, v = (x.bfloat16() for x in random_qkv(1, 10, 4, dtype=torch.float32))
    cache = {}
    aft_simple(q, k, v, cache)
    assert all(t.dtype == torch.float32 for t in cache.values())


# --- module and errors ------------------------------------------------------------------------

def test_module_parameters_and_repr():
    assert sum(p.numel() for p in AFT().parameters()) == 0
    local = AFT(window=12)
    assert local.pos_bias.shape == (12,) and torch.equal(local.pos_bias, torch.zeros(12))
    assert "window=12" in repr(local)


def test_clear_errors():
    q, k, v = random_qkv(2, 5, 3)
    with pytest.raises(ValueError, match="window must be a positive"):
        AFT(window=0)
    with pytest.raises(ValueError, match="same shape|one shape"):
        aft_simple(q, k[:, :4], v)
    with pytest.raises(ValueError, match="one shape"):
        aft_simple(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="1-D tensor"):
        aft_local(q, k, v, torch.zeros(2, 3, dtype=torch.float64))
    cache = {}
    aft_simple(q, k, v, cache)
    with pytest.raises(ValueError, match="start a new cache"):
        aft_simple(q[:1], k[:1], v[:1], cache)

"""strawberry.recursion: the global N:1 schedule, The Expert Abundance step, MoR routers, the recursive block."""
from dataclasses import replace

import pytest
import torch

from strawberry.moe import collect_aux_losses
from strawberry.recursion import (MOR_AUX_WEIGHTS, ExpertAbundance, RecursionConfig, RecursiveBlock,
                                  capacity_schedule, format_schedule, mixer_schedule, parse_ratio, top_k_active)

SMALL = RecursionConfig(n_embd=16, n_head=2, n_layer=1, r_layer=4, window=4, attn_experts=2, attn_top_k=1)


def block_for(**changes) -> RecursiveBlock:
    torch.manual_seed(0)
    config = replace(SMALL, **changes)
    return RecursiveBlock(config, config.schedule[0]).double()


def reference_schedule(n_layer, r_layer, n_aft):
    g, out = 0, []
    for _ in range(n_layer):
        out.append([])
        for _ in range(r_layer):
            out[-1].append("S" if (g + 1) % (n_aft + 1) == 0 else "A")
            g += 1
    return out


def test_schedule_counts_for_many_depths():
    for n_layer in range(1, 6):
        for r_layer in range(1, 7):
            for n_aft in range(0, 6):
                total = n_layer * r_layer
                if total < n_aft + 1:
                    continue
                schedule = mixer_schedule(n_layer, r_layer, f"{n_aft}:1")
                assert schedule == reference_schedule(n_layer, r_layer, n_aft)
                assert sum(b.count("S") for b in schedule) == total // (n_aft + 1)
                assert [len(b) for b in schedule] == [r_layer] * n_layer


def test_schedule_runs_on_a_global_counter():
    assert format_schedule(mixer_schedule(2, 4)) == "A A A S | A A A S"
    assert format_schedule(mixer_schedule(2, 2)) == "A A | A S"          # the original never ran SDPA here
    assert format_schedule(mixer_schedule(3, 3)) == "A A A | S A A | A S A"
    assert format_schedule(mixer_schedule(1, 3, "0:1")) == "S S S"
    assert format_schedule(mixer_schedule(1, 2, "1:0")) == "A A"


def test_schedule_rejects_sdpa_that_never_runs():
    with pytest.raises(ValueError, match="SDPA would never run"):
        mixer_schedule(1, 2, "3:1")
    with pytest.raises(ValueError, match="SDPA would never run"):
        RecursionConfig(n_layer=1, r_layer=3)
    assert parse_ratio("1:0") is None and parse_ratio("7:1") == 7
    for bad in ["3:2", "3", "a:1", "-1:1", 3, "0:0"]:
        with pytest.raises(ValueError, match="ratio must be"):
            parse_ratio(bad)
    with pytest.raises(ValueError, match="r_layer must be a positive integer"):
        mixer_schedule(2, 0)


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_embd=12, n_head=4), dict(window=0),
                                 dict(attn_top_k=3), dict(ffn_experts=2, ffn_top_k=3), dict(routing="bogus"),
                                 dict(routing="expert", r_layer=1, ratio="1:0"), dict(retention_rank=0),
                                 dict(aft_window=0), dict(rope_base=1.0), dict(n_layer=True), dict(r_layer=2.0),
                                 dict(retention=False, retention_batch_global=True)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        replace(SMALL, **bad)


def test_capacity_and_top_k_sets_are_nested_and_sized():
    assert capacity_schedule(4) == [1.0, 0.75, 0.5, 0.25]
    assert capacity_schedule(3) == [1.0, 2 / 3, 1 / 3]
    torch.manual_seed(0)
    T, R = 30, 3
    scores = torch.randn(R, 5, T)
    active = torch.ones(5, T, dtype=torch.bool)
    for r in range(R):
        k = (R - r) * T // R
        selected = top_k_active(scores[r], active, k)
        assert (selected.sum(1) == k).all() and not (selected & ~active).any()
        for b in range(5):   # the chosen ones beat every active token left out
            chosen, left = scores[r, b][selected[b]], scores[r, b][active[b] & ~selected[b]]
            assert left.numel() == 0 or chosen.min() > left.max()
        active = selected


def test_block_builds_only_the_mixers_its_steps_use():
    config = replace(SMALL, n_layer=3, r_layer=2, ratio="3:1")
    blocks = [RecursiveBlock(config, kinds) for kinds in config.schedule]
    assert [b.mixer.sdpa is not None for b in blocks] == [False, True, False]
    assert all(b.mixer.aft is not None for b in blocks)
    with pytest.raises(ValueError, match="no 'S' mixer"):
        blocks[0].mixer(torch.randn(1, 3, 16), "S")


def test_retention_deltas_are_per_token_weight_matrices():
    torch.manual_seed(0)
    step = ExpertAbundance(SMALL, {"A"}).double()
    h = torch.randn(2, 7, 16, dtype=torch.float64)
    ret = step.retention
    m = ret(h)
    dW = ret.qkv_up.weight @ m @ ret.qkv_down.weight                  # (B, T, C, C)
    W = step.aft.qkv.weight
    explicit = torch.einsum("btoc,btc->bto", W + W @ dW, h)
    assert torch.allclose(explicit, step.aft.qkv(h + ret.delta_qkv(m, h)), atol=1e-12)


def test_keeping_every_token_at_gate_one_equals_the_plain_loop():
    plain, routed = block_for(), block_for(routing="expert")
    routed.load_state_dict(plain.state_dict(), strict=False)
    routed.router.forward = lambda step, x, active: (active, torch.ones_like(x[..., 0]), None)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    assert torch.allclose(routed(x), plain(x), atol=1e-12)
    assert (routed.depth == SMALL.r_layer).all() and (plain.depth == SMALL.r_layer).all()


def _past_change(block, x, t_prime):
    changed = x.clone()
    changed[:, t_prime:] = torch.randn_like(changed[:, t_prime:])
    changed[1] = torch.randn_like(changed[1])                          # and another sequence entirely
    with torch.no_grad():
        a, b = block(x), block(changed)
    return (a[0, :t_prime] - b[0, :t_prime]).abs().max().item()


@pytest.mark.parametrize("routing", ["none", "expert", "token"])
def test_inference_routing_is_causal_and_batch_independent(routing):
    block = block_for(routing=routing).eval()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    assert _past_change(block, x, 9) < 1e-12
    block.train()                       # training: only expert-choice's top-k looks at the future
    gap = _past_change(block, x, 9)
    assert (gap > 1e-6) if routing == "expert" else (gap < 1e-12)


@pytest.mark.parametrize("changes", [dict(), dict(routing="expert"), dict(routing="token"), dict(ratio="1:1"),
                                     dict(ratio="0:1", window=3), dict(retention=False), dict(aft_window=3),
                                     dict(ffn_experts=3, ffn_top_k=2)])
def test_cached_steps_equal_the_parallel_pass(changes):
    block = block_for(**changes).eval()
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    cache = block.new_cache()
    with torch.no_grad():
        out = [block(x[:, :5], cache)] + [block(x[:, t:t + 1], cache) for t in range(5, 15)]
        assert torch.allclose(torch.cat(out, 1), block(x), atol=1e-10)
    assert len(cache) == SMALL.r_layer and all("mixer" in step for step in cache)
    if "S" in block.kinds:
        sdpa_state = cache[block.kinds.index("S")]["mixer"]
        assert sdpa_state["k"].shape[2] == block.mixer.sdpa.window       # only the last `window` keys


@pytest.mark.parametrize("routing,names", [("none", set()), ("expert", {"mor_bce"}), ("token", {"mor_balance", "mor_z"})])
def test_router_losses_and_gradients(routing, names):
    block = block_for(routing=routing).train()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    out = block(x)
    aux = collect_aux_losses(block)
    assert set(aux) == names and names <= set(MOR_AUX_WEIGHTS)
    (out.pow(2).mean() + sum(aux.values())).backward()
    silent = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent
    assert block.depth.shape == (2, 16) and block.depth.min() >= 1 and block.depth.max() <= SMALL.r_layer
    block.eval()
    block(x)
    assert collect_aux_losses(block) == {}


def test_ffn_residual_flag():
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    ours, original = block_for(), block_for(ffn_residual=False)
    original.load_state_dict(ours.state_dict())
    with torch.no_grad():
        stream = _stream(ours, x)
        ffn = ours.ffn(ours.norm_ffn(stream))
        assert torch.allclose(ours(x), stream + ffn, atol=1e-12)
        assert torch.allclose(original(x), ffn, atol=1e-12)      # the original drops the stream


def _stream(block, x):
    """The residual stream after the recursion steps (before the FFN), recomputed step by step."""
    for kind in block.kinds:
        x = x + block.mixer(x, kind)
    return x

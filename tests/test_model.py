"""strawberry.model: the complete Strawberry model, its config, cache, generation and accounting."""
import dataclasses
import io
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from strawberry.moe import MOE_AUX_WEIGHTS, collect_aux_losses, weighted_aux_loss
from strawberry.model import Strawberry, StrawberryConfig
from strawberry.recursion import MOR_AUX_WEIGHTS

V = 48
CONFIGS = {
    "default": dict(),
    "moe+expert": dict(ffn_experts=3, ffn_top_k=2, routing="expert"),
    "token 1:1 window 3": dict(routing="token", ratio="1:1", window=3),
    "aft-only local": dict(ratio="1:0", aft_window=3, retention=False),
    "sdpa-only dense": dict(ratio="0:1", attn_experts=1, attn_top_k=1, r_layer=2),
}


def small(**changes) -> Strawberry:
    torch.manual_seed(0)
    base = dict(vocab_size=V, block_size=16, n_embd=16, n_head=2, n_layer=2, r_layer=4, window=5,
                attn_experts=2, attn_top_k=1)
    return Strawberry(StrawberryConfig(**{**base, **changes}))


@pytest.mark.parametrize("bad", [dict(n_embd=130), dict(n_head=0), dict(n_layer=1, r_layer=3), dict(ratio="4"),
                                 dict(window=-1), dict(vocab_size=0), dict(block_size=2.5), dict(routing="x"),
                                 dict(ffn_experts=2, ffn_top_k=5)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        StrawberryConfig(**bad)


def test_config_is_a_plain_dataclass_for_the_trainer():
    config = StrawberryConfig()
    fields = {f.name for f in dataclasses.fields(StrawberryConfig)}
    assert {"vocab_size", "block_size", "n_layer", "r_layer", "ratio", "routing"} <= fields
    assert StrawberryConfig(**dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match="StrawberryConfig"):
        Strawberry(dataclasses.asdict(config))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_batch_independent_and_cached(name):
    model = small(**CONFIGS[name]).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, V, (3, 14))
    changed = idx.clone()
    changed[0, 8:] = torch.randint(0, V, (6,))
    changed[1] = torch.randint(0, V, (14,))
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
        assert (a[0, :8] - b[0, :8]).abs().max() <= 1e-6
        assert (a[2] - b[2]).abs().max() <= 1e-6
        cache = model.new_cache()
        steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 14)]
        assert (torch.cat(steps, 1) - a).abs().max() <= 1e-5
        assert cache["pos"] == 14
    prompt = idx[:2, :3]
    greedy = model.generate(prompt, 20, top_k=1)                  # 23 tokens > block_size: no limit
    assert greedy.shape == (2, 23) and torch.equal(greedy, model.generate(prompt, 20, top_k=1, use_cache=False))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(name):
    model = small(**CONFIGS[name]).train()
    idx = torch.randint(0, V, (4, 16))
    _, loss = model(idx, idx.roll(-1, 1))
    aux = collect_aux_losses(model)
    (loss + weighted_aux_loss(aux, {**MOE_AUX_WEIGHTS, **MOR_AUX_WEIGHTS})).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent


def test_aux_losses_are_reported_by_name():
    model = small(**CONFIGS["moe+expert"]).train()
    model(torch.randint(0, V, (2, 12)))
    assert set(collect_aux_losses(model)) == {"moe_balance", "moe_z", "mor_bce"}
    model = small(routing="token").train()
    model(torch.randint(0, V, (2, 12)))
    assert set(collect_aux_losses(model)) == {"mor_balance", "mor_z"}


def test_initial_loss_is_near_uniform_and_params_count():
    model = small(vocab_size=300, n_embd=32)
    _, loss = model(torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16)))
    assert abs(loss.item() - math.log(300)) < 0.1
    assert model.lm_head.weight is model.wte.weight
    assert model.get_num_params(non_embedding=False) == model.get_num_params() + 300 * 32
    untied = small(vocab_size=300, n_embd=32, tie_weights=False)
    assert untied.get_num_params() == model.get_num_params()


def test_state_dict_round_trip_and_moves():
    model = small(**CONFIGS["moe+expert"]).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = small(**CONFIGS["moe+expert"])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(idx)[0], model(idx)[0])
        assert torch.allclose(small().double().eval()(idx)[0].float(), small().eval()(idx)[0], atol=1e-5)
    meta = small().to("meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    assert any(True for _ in meta.buffers())                       # the RoPE tables moved too


def test_decoding_state_is_constant_size():
    model = small().eval()

    def state_bytes(context):
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, V, (1, context)), cache=cache)
        sizes = []
        for block in cache["blocks"]:
            for step in block:
                for part in step.values():
                    sizes += [t.numel() for t in part.values() if torch.is_tensor(t)]
        return sum(sizes)
    assert state_bytes(8) == state_bytes(40) and model.max_context is None


def test_flops_per_token_matches_the_counter():
    for changes in [dict(ffn_experts=3, ffn_top_k=2, routing="token")]:
        model = small(**changes).eval()
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, V, (1, 9)), cache=cache)
            with FlopCounterMode(display=False) as counter:
                model(torch.randint(0, V, (1, 1)), cache=cache)
        flops = model.flops_per_token(context=10)
        assert counter.get_total_flops() == sum(flops.values()) - flops["SDPA attention (window)"]
        assert flops["SDPA attention (window)"] == 2 * 4 * 5 * 16     # 2 SDPA steps, window 5, C 16


def test_forward_rejects_bad_input():
    model = small()
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="new_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=[{}])

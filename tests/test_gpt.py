"""Unit tests for strawberry.gpt (notebook 02): config checks, causality, cache, generation, sampling."""
import math

import pytest
import torch

from strawberry.gpt import GPT, GPTConfig, generate, sample_next_token
from strawberry.layers import swiglu_hidden

SMALL = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(n_embd=36, n_head=4), "odd"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(n_head=2.5), "n_head must be a positive integer"),
    (dict(window=0), "window must be None"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(rope_base=1.0), "rope_base must be > 1"),
])
def test_bad_configs_raise_useful_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **overrides})


# --- parameters --------------------------------------------------------------------------------

def test_parameter_counts_with_and_without_embeddings():
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg)
    C, V, L, d, h = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.head_dim, swiglu_hidden(cfg.n_embd)
    non_embedding = L * (4 * C * C + 3 * C * h + 2 * C + 2 * d) + C
    assert model.lm_head.weight is model.wte.weight
    assert model.get_num_params() == non_embedding
    assert model.get_num_params(non_embedding=False) == non_embedding + V * C
    untied = GPT(GPTConfig(**SMALL, tie_weights=False))
    assert untied.get_num_params() == non_embedding
    assert untied.get_num_params(non_embedding=False) == non_embedding + 2 * V * C
    no_qk = GPT(GPTConfig(**SMALL, qk_norm=False))
    assert no_qk.get_num_params() == non_embedding - L * 2 * d


def test_initialisation_and_initial_loss():
    model = make(n_layer=4)
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.002             # residual projections scaled by 1/sqrt(2L)
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    idx, targets = torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (8, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.2
    assert model(idx)[1] is None


def test_forward_errors():
    model = make()
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="new_cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=[{}])
    cache = model.new_cache()
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"cached 10 \+ new 7"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


# --- causality ---------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 4])
def test_causal_and_batch_independent(window):
    model = make(window=window)
    idx = torch.randint(0, 50, (3, 16))
    base, _ = model(idx)
    for t_prime in [1, 5, 15]:
        changed = idx.clone()
        changed[0, t_prime] = (changed[0, t_prime] + 7) % 50
        logits, _ = model(changed)
        assert (logits[0, :t_prime] - base[0, :t_prime]).abs().max().item() <= 1e-6
        assert (logits[1:] - base[1:]).abs().max().item() <= 1e-6
        assert (logits[0, t_prime:] - base[0, t_prime:]).abs().max().item() > 1e-4   # the change is seen


# --- cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_logits_equal_full_forward_at_each_step(window, prompt_len):
    model = make(window=window)
    seq = torch.randint(0, 50, (2, 16))
    cache = model.new_cache()
    with torch.no_grad():
        logits = [model(seq[:, :prompt_len], cache=cache)[0]]
        for t in range(prompt_len, 16):
            step, _ = model(seq[:, t : t + 1], cache=cache)
            full, _ = model(seq[:, : t + 1])
            assert (step[:, -1] - full[:, -1]).abs().max().item() < 1e-5
            logits.append(step)
        assert (torch.cat(logits, 1) - model(seq)[0]).abs().max().item() < 1e-5
    if window is not None:
        assert all(layer["k"].shape[2] == window for layer in cache)


def test_chunked_prefill_equals_parallel_pass():
    model = make(window=5)
    seq = torch.randint(0, 50, (1, 30))                      # a window model has no context limit
    assert model.max_context is None and make().max_context == 16
    cache = model.new_cache()
    with torch.no_grad():
        chunks = [model(seq[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 20), (20, 30)]]
        assert (torch.cat(chunks, 1) - model(seq)[0]).abs().max().item() < 1e-5


# --- generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 4])
def test_greedy_identical_with_and_without_cache_past_the_context(window):
    model = make(window=window)
    prompt = torch.randint(0, 50, (2, 5))
    a = model.generate(prompt, 30, top_k=1)                  # 35 tokens > block_size 16
    b = model.generate(prompt, 30, top_k=1, use_cache=False)
    assert a.shape == (2, 35) and torch.equal(a[:, :5], prompt) and torch.equal(a, b)
    assert torch.equal(generate(model, prompt, 30, temperature=0), a)   # temperature 0 is greedy too


def test_generate_steps_match_full_forward_greedy():
    model = make()
    prompt = torch.randint(0, 50, (1, 4))
    out = model.generate(prompt, 8, top_k=1)
    for t in range(4, 12):
        logits, _ = model(out[:, :t])
        assert out[0, t].item() == logits[0, -1].argmax().item()


def test_long_prompt_is_cropped_and_sampling_is_reproducible():
    model = make()
    prompt = torch.randint(0, 50, (1, 40))
    out = model.generate(prompt, 3, top_k=1)
    assert torch.equal(out[:, :40], prompt)
    assert torch.equal(out[:, 40:], model.generate(prompt[:, -16:], 3, top_k=1)[:, 16:])   # only the last 16 count
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(prompt[:, :5], 10, generator=g1), model.generate(prompt[:, :5], 10, generator=g2))


def test_generate_restores_training_mode():
    model = make(dropout=0.1).train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be None or an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be None or in \(0, 1\]"),
    (dict(top_p=1.01), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
])
def test_generate_bad_arguments(kwargs, message):
    model = make()
    args = dict(max_new_tokens=3, **kwargs) if "max_new_tokens" not in kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize("prompt, message", [
    (torch.zeros(1, 0, dtype=torch.long), "prompt is empty"),
    (torch.zeros(1, 3), "token ids"),
    (torch.zeros(3, dtype=torch.long), r"\(B, T\)"),
])
def test_generate_bad_prompts(prompt, message):
    with pytest.raises(ValueError, match=message):
        make().generate(prompt, 2)


# --- sampling ----------------------------------------------------------------------------------

def test_sample_next_token_filters():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]]).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, top_k=3, generator=gen).unique().tolist() == [0, 1, 2]
    # softmax: .445 .270 .164 .060 ...: the smallest set reaching 0.9 is the first four tokens
    assert sample_next_token(logits, top_p=0.9, generator=gen).unique().tolist() == [0, 1, 2, 3]
    assert sample_next_token(logits, top_p=0.4, generator=gen).unique().tolist() == [0]
    assert torch.equal(sample_next_token(logits[:2], top_k=1), torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(sample_next_token(logits[:2], temperature=0.0), torch.zeros(2, 1, dtype=torch.long))
    freq = torch.bincount(sample_next_token(logits, generator=gen).flatten(), minlength=8) / 4000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.03)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_next_token(logits[0])


def test_flops_per_token_matches_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    model = make()
    cfg, C = model.config, model.config.n_embd
    flops = model.flops_per_token()
    with FlopCounterMode(display=False) as counter:                 # counts every mm; not the fused SDPA on CPU
        model(torch.randint(0, cfg.vocab_size, (1, cfg.block_size)))
    assert counter.get_total_flops() == cfg.block_size * (sum(flops.values()) - flops["attention (context)"])
    assert flops["attention (context)"] == cfg.n_layer * 4 * cfg.block_size * C
    assert model.flops_per_token(5)["attention (context)"] == cfg.n_layer * 4 * 5 * C
    assert make(window=4).flops_per_token()["attention (context)"] == cfg.n_layer * 4 * 4 * C

"""Generation speed and decoding-state memory vs context length: Strawberry with its constant-size
state cache, Strawberry without a cache (every token recomputes the whole context, as
strawberry.gpt.generate(use_cache=False) does), and the baseline GPT with its growing KV cache.

Hand-written, not exported from a notebook. Run: python -m benchmarks.generation [--contexts 256,1024]
For each context: prefill the context (timed separately), then time --new-tokens greedy tokens one by
one; a variant's time per token is the median token of its fastest repeat.
The variants run interleaved in one process, so the ratios survive a machine that drifts.
"""
from __future__ import annotations

import torch

from benchmarks.common import int_list, machine, parser, print_table, tensor_bytes, timed, write_json
from strawberry.gpt import GPT, GPTConfig
from strawberry.model import Strawberry, StrawberryConfig

VOCAB = 321
VARIANTS = ("strawberry_cached", "strawberry_uncached", "gpt_cached")


def build_models(max_len: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """Small default models: StrawberryConfig defaults and a 4 x 128 GPT whose block_size fits max_len."""
    torch.manual_seed(0)
    strawberry = Strawberry(StrawberryConfig(vocab_size=VOCAB)).to(device).eval()
    gpt = GPT(GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128, block_size=max_len)).to(device).eval()
    return {"strawberry": strawberry, "gpt": gpt}


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, use_cache: bool,
           device: torch.device) -> dict:
    """Prefill `prompt`, then generate `new_tokens` greedy tokens: prefill seconds, the median seconds
    per new token, and cache bytes."""
    out = prompt
    cache = model.new_cache() if use_cache else None
    logits = None

    def prefill():
        nonlocal logits
        logits = model(prompt, cache=cache)[0] if use_cache else model(prompt)[0]

    prefill_s = timed(prefill, device)
    bytes_after_prefill = tensor_bytes(cache) if use_cache else 0

    def next_token():
        nonlocal out, logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, token], dim=1)
        logits = model(token, cache=cache)[0] if use_cache else model(out)[0]

    token_s = sorted(timed(next_token, device) for _ in range(new_tokens))
    state = tensor_bytes(cache) if use_cache else 0
    # the median token: robust to a moment of interference from other work on a shared machine
    return {"prefill_s": prefill_s, "token_s": token_s[len(token_s) // 2], "state_bytes": state,
            "state_growth_bytes_per_token": (state - bytes_after_prefill) / max(1, new_tokens)}


def run(contexts: list[int], new_tokens: int = 32, repeats: int = 1, device: str = "cpu") -> dict:
    dev = torch.device(device)
    models = build_models(max(contexts) + new_tokens + 1, dev)
    plan = {"strawberry_cached": ("strawberry", True), "strawberry_uncached": ("strawberry", False),
            "gpt_cached": ("gpt", True)}
    g = torch.Generator().manual_seed(0)
    decode(models["strawberry"], torch.randint(VOCAB, (1, 8), generator=g).to(dev), 2, True, dev)   # warm-up
    decode(models["gpt"], torch.randint(VOCAB, (1, 8), generator=g).to(dev), 2, True, dev)
    rows = []
    for context in contexts:
        prompt = torch.randint(VOCAB, (1, context), generator=g).to(dev)
        best: dict[str, dict] = {}
        for _ in range(repeats):                               # interleaved; keep each variant's fastest
            for name in VARIANTS:
                kind, use_cache = plan[name]
                r = decode(models[kind], prompt, new_tokens, use_cache, dev)
                if name not in best or r["token_s"] < best[name]["token_s"]:
                    best[name] = r
        for name in VARIANTS:
            r = best[name]
            rows.append({"variant": name, "context": context, "tokens_per_s": 1 / r["token_s"],
                         "ms_per_token": 1e3 * r["token_s"], "prefill_s": r["prefill_s"],
                         "state_bytes": r["state_bytes"],
                         "state_bytes_per_context_token": r["state_bytes"] / (context + new_tokens),
                         "state_growth_bytes_per_token": r["state_growth_bytes_per_token"]})
    by = {(r["variant"], r["context"]): r for r in rows}
    speedup = {str(c): by["strawberry_uncached", c]["ms_per_token"] / by["strawberry_cached", c]["ms_per_token"]
               for c in contexts}
    lo, hi = min(contexts), max(contexts)
    flatness = {name: {"ms_per_token_ratio": by[name, hi]["ms_per_token"] / by[name, lo]["ms_per_token"],
                       "state_bytes_ratio": (by[name, hi]["state_bytes"] / by[name, lo]["state_bytes"]
                                             if by[name, lo]["state_bytes"] else None)}
                for name in VARIANTS}
    return {"benchmark": "generation", "machine": machine(), "device": device, "new_tokens": new_tokens,
            "repeats": repeats, "contexts": contexts, "vocab_size": VOCAB,
            "models": {k: {"params": m.get_num_params(False)} for k, m in models.items()},
            "rows": rows, "cached_vs_uncached_speedup": speedup,
            "flatness_largest_over_smallest_context": flatness}


def main(argv: list[str] | None = None) -> dict:
    p = parser("generation", __doc__)
    p.add_argument("--contexts", type=int_list, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest is kept")
    args = p.parse_args(argv)
    result = run(args.contexts, args.new_tokens, args.repeats, args.device)
    print_table(result["rows"], ["variant", "context", "tokens_per_s", "ms_per_token", "prefill_s", "state_bytes",
                                 "state_growth_bytes_per_token"])
    print("cached vs uncached Strawberry speedup by context:",
          {c: round(s, 2) for c, s in result["cached_vs_uncached_speedup"].items()})
    lo, hi = min(args.contexts), max(args.contexts)
    for name, f in result["flatness_largest_over_smallest_context"].items():
        print(f"{name}: ms/token at {hi} / at {lo} = {f['ms_per_token_ratio']:.2f}; state bytes ratio = {f['state_bytes_ratio']}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

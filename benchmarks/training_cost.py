"""Training cost vs sequence length: forward+backward tokens/s and activation memory for the
sequence mixers alone (AFT, windowed local MoE SDPA, full causal SDPA) and the complete models
(Strawberry with every idea on, Strawberry without retention as the `cpu` preset trains it since
notebook 09, and the baseline GPT), plus model FLOPs utilisation (MFU) against a measured matmul peak.

Hand-written, not exported from a notebook. Run: python -m benchmarks.training_cost [--seq-lens 256,1024]
Every measurement uses --tokens tokens per batch (batch = tokens // seq_len, at least 1). The
memory column is the bytes autograd saves for backward (measured with saved-tensor hooks), the
part of peak memory that grows with the sequence; on CUDA the allocator's peak is reported too.
MFU = training FLOPs per token (3 x forward matmul FLOPs) x tokens/s / peak fp32 matmul FLOP/s.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.common import int_list, machine, parser, print_table, sync, timed, write_json
from strawberry.gpt import GPT, CausalSelfAttention, GPTConfig
from strawberry.model import Strawberry, StrawberryConfig
from strawberry.moe import LocalMoEAttention
from strawberry.recursion import AFTMixer

VOCAB, C, H, WINDOW = 321, 128, 4, 64


def matmul_peak_flops(n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Best fp32 FLOP/s of an n x n matmul on this device (the denominator of MFU)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    torch.matmul(a, b)
    return max(2 * n ** 3 / timed(lambda: torch.matmul(a, b), dev) for _ in range(repeats))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn() runs."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        seen[(t.untyped_storage().data_ptr(), t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def candidates(seq_len: int, device: torch.device) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module, takes token ids). Mixers take (B, T, C) activations."""
    torch.manual_seed(0)
    return {
        "aft": (AFTMixer(C), False),
        "local_moe_sdpa": (LocalMoEAttention(C, H, window=WINDOW, n_experts=4, top_k=2, max_seq_len=seq_len), False),
        "full_sdpa": (CausalSelfAttention(GPTConfig(n_embd=C, n_head=H, block_size=seq_len)), False),
        "strawberry": (Strawberry(StrawberryConfig(vocab_size=VOCAB, n_embd=C, n_head=H, window=WINDOW,
                                                   block_size=seq_len)), True),
        "strawberry_no_retention": (Strawberry(StrawberryConfig(vocab_size=VOCAB, n_embd=C, n_head=H, window=WINDOW,
                                                                block_size=seq_len, retention=False)), True),
        "gpt": (GPT(GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=H, n_embd=C, block_size=seq_len)), True),
    }


def step_fn(module: nn.Module, ids: bool, batch: int, seq_len: int, device: torch.device):
    if ids:
        x = torch.randint(VOCAB, (batch, seq_len), device=device)

        def step():
            _, loss = module(x, x)
            loss.backward()
    else:
        x = torch.randn(batch, seq_len, C, device=device, requires_grad=True)

        def step():
            module(x).float().square().mean().backward()
    return step


def run(seq_lens: list[int], tokens: int = 4096, repeats: int = 2, device: str = "cpu",
        matmul_n: int = 1024) -> dict:
    dev = torch.device(device)
    peak = matmul_peak_flops(matmul_n, device=device)
    rows = []
    for seq_len in seq_lens:
        batch = max(1, tokens // seq_len)
        models = {name: (m.to(dev).train(), ids) for name, (m, ids) in candidates(seq_len, dev).items()}
        steps = {name: step_fn(m, ids, batch, seq_len, dev) for name, (m, ids) in models.items()}
        for step in steps.values():                            # warm-up
            step()
        best = {name: float("inf") for name in steps}
        for _ in range(repeats):                               # interleaved; keep each variant's fastest
            for name, step in steps.items():
                best[name] = min(best[name], timed(step, dev))
        for name, (module, ids) in models.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            memory = saved_bytes(steps[name])
            row = {"variant": name, "seq_len": seq_len, "batch": batch, "tokens_per_s": batch * seq_len / best[name],
                   "saved_activation_MB": memory / 2 ** 20}
            if dev.type == "cuda":
                sync(dev)
                row["cuda_peak_MB"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
            if ids:                                            # a whole model: it counts its own FLOPs
                fwd = sum(module.flops_per_token(seq_len).values())
                row["train_flops_per_token"] = 3 * fwd
                row["mfu"] = 3 * fwd * row["tokens_per_s"] / peak
                row["params"] = module.get_num_params(False)
            rows.append(row)
    by = {(r["variant"], r["seq_len"]): r for r in rows}
    mfu_ratio = {name: {str(s): by[name, s]["mfu"] / by["gpt", s]["mfu"] for s in seq_lens}
                 for name in ("strawberry", "strawberry_no_retention")}
    return {"benchmark": "training_cost", "machine": machine(), "device": device, "tokens_per_batch": tokens,
            "repeats": repeats, "seq_lens": seq_lens, "matmul_n": matmul_n, "matmul_peak_flops": peak,
            "rows": rows, "mfu_strawberry_over_gpt": mfu_ratio}


def main(argv: list[str] | None = None) -> dict:
    p = parser("training_cost", __doc__)
    p.add_argument("--seq-lens", type=int_list, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the matmul that measures the peak")
    args = p.parse_args(argv)
    result = run(args.seq_lens, args.tokens, args.repeats, args.device, args.matmul_n)
    print(f"measured fp32 matmul peak ({args.matmul_n}^3, {result['machine']['threads']} threads): "
          f"{result['matmul_peak_flops'] / 1e9:.2f} GFLOP/s")
    print_table(result["rows"], ["variant", "seq_len", "batch", "tokens_per_s", "saved_activation_MB",
                                 "train_flops_per_token", "mfu"])
    for name, ratios in result["mfu_strawberry_over_gpt"].items():
        print(f"MFU {name} / GPT by sequence length:", {s: round(r, 3) for s, r in ratios.items()})
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

"""Quality at equal wall-clock (--budget seconds) or at equal tokens (--steps): train each variant
per seed with strawberry.train and report validation bits per byte, mean and spread over --seeds.

Hand-written, not exported from a notebook.
Run: python -m benchmarks.quality [--budget 120 --seeds 2]   or   [--steps 150 --out runs/benchmarks/quality_steps.json]
Variants are the `cpu` preset (Strawberry), the baseline GPT at about its parameter count, and
ablations that each change one idea. A budget counts optimizer steps only (not evaluation):
a short calibration measures steps/s (then the weights and optimizer are restored), max_steps is
set so the warmup/cooldown schedule ends at the budget, and training stops at the budget regardless.
Every run is also scored the way generation sees text (`generation_bpb`): a causal model scores the
same there as in the batched evaluation; the original's batch-global retention does not.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, parser, print_table, write_json
from strawberry.gpt import GPT, GPTConfig
from strawberry.model import Strawberry, StrawberryConfig
from strawberry.tokenizer import get_tokenizer
from strawberry.train import PRESETS, Trainer, make_config

PRESET = "cpu"                                 # the training settings (batch, context, lr, schedule) of every variant
FULL = dict(n_embd=128, n_head=4, n_layer=2, r_layer=4, window=64)   # every idea on: notebook 07's Strawberry
ABLATIONS: dict[str, dict] = {                 # name -> model_config overrides on FULL
    "strawberry": {},
    "no_retention": {"retention": False},
    "aft_only": {"ratio": "1:0"},
    "sdpa_only": {"ratio": "0:1"},
    "dense_attn": {"attn_experts": 1, "attn_top_k": 1},   # MoE attention off: one value/output expert per head
    "moe_ffn": {"ffn_experts": 4},
    "r_layer1": {"n_layer": 8, "r_layer": 1},  # the same 8 steps and 3:1 schedule, unshared weights (equal compute)
    "routing_expert": {"routing": "expert"},
    "batch_global_retention": {"retention_batch_global": True},   # the original's leaky statistic
}
VARIANTS = ("gpt", *ABLATIONS)


def matched_gpt_config(vocab_size: int, block_size: int) -> dict:
    """A GPT of width 128 whose depth gives the parameter count nearest to the full Strawberry's."""
    with torch.device("meta"):                                 # shapes only: no memory, no initialisation cost
        target = Strawberry(StrawberryConfig(vocab_size=vocab_size, block_size=block_size, **FULL)).get_num_params(False)
        best = min(range(1, 13), key=lambda n: abs(GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size,
                                                                 n_layer=n)).get_num_params(False) - target))
    return {"n_layer": best, "n_head": 4, "n_embd": 128}


def variant_config(name: str, seed: int):
    base = PRESETS[PRESET]
    overrides: dict = {"seed": seed, "sample_tokens": 0, "max_steps": 10 ** 6, "out_dir": f"runs/benchmarks/quality/{name}"}
    if name == "gpt":
        overrides.update(model="gpt", model_config=matched_gpt_config(get_tokenizer(base.get("tokenizer", "char")).vocab_size,
                                                                 base["block_size"]))
    else:
        overrides["model_config"] = {**FULL, **ABLATIONS[name]}
    return overrides


@torch.no_grad()
def generation_bpb(trainer: Trainer, n_seqs: int = 4) -> dict:
    """Val bits per byte of n_seqs sequences scored two ways: batched (as in training and evaluation) and
    as generation sees them (each position predicted from its own prefix alone, one sequence at a time)."""
    model = trainer.model.eval()
    x, y = trainer.batch("val", torch.Generator().manual_seed(0))
    x, y = x[:n_seqs], y[:n_seqs]
    batched = F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten()).item()
    last_logits = torch.stack([model(x[i:i + 1, :t + 1])[0][0, -1] for i in range(len(x)) for t in range(x.shape[1])])
    prefix = F.cross_entropy(last_logits.float(), y.flatten()).item()
    model.train()
    scale = trainer.bpb_per_nat["val"]
    return {"batched_bpb": batched * scale, "generation_bpb": prefix * scale}


def train_for(name: str, seed: int, eval_iters: int, budget: float | None = None, steps: int | None = None,
              generation_seqs: int = 4, calibrate_frac: float = 0.1) -> dict:
    """Train one variant for `budget` seconds of optimizer steps, or for `steps` steps; its final metrics."""
    if (budget is None) == (steps is None):
        raise ValueError("give either a time budget (seconds) or a number of steps, not both")
    trainer = Trainer(make_config(PRESET, {**variant_config(name, seed), "eval_iters": eval_iters}))
    cfg, model = trainer.config, trainer.model
    if steps is None:                                          # measure steps/s, then rewind through a checkpoint
        trainer.save()
        start, calib_steps = time.perf_counter(), 0
        while calib_steps < 2 or time.perf_counter() - start < calibrate_frac * budget:
            trainer.train_step()
            calib_steps += 1
        steps_per_s = calib_steps / (time.perf_counter() - start)
        trainer.load(trainer.checkpoint_path)                  # the same weights, optimizer, schedule and step 0
        steps = max(2, int(budget * steps_per_s))
    cfg.max_steps = steps                                      # the schedule reads cfg at every step
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps // 10)
    start = time.perf_counter()
    while trainer.step < cfg.max_steps and (budget is None or time.perf_counter() - start < budget):
        trainer.train_step()
    train_s = time.perf_counter() - start
    metrics = trainer.evaluate()
    tokens = trainer.step * cfg.batch_size * cfg.block_size * cfg.grad_accum
    return {"variant": name, "seed": seed, "steps": trainer.step, "planned_steps": cfg.max_steps, "train_s": train_s,
            "tokens": tokens, "tokens_per_s": tokens / train_s,
            "params": model.get_num_params(False), "val_bpb": metrics["val_bpb"], "train_bpb": metrics["train_bpb"],
            "final_train_loss": trainer.history["loss"][-1] if trainer.history["loss"] else float("nan"),
            **generation_bpb(trainer, generation_seqs)}


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for name in variants:
        vals = [r["val_bpb"] for r in runs if r["variant"] == name]
        steps = [r["steps"] for r in runs if r["variant"] == name]
        mine = [r for r in runs if r["variant"] == name]
        rows.append({"variant": name, "seeds": len(vals), "val_bpb_mean": statistics.fmean(vals),
                     "val_bpb_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "val_bpb_min": min(vals), "val_bpb_max": max(vals), "steps_mean": statistics.fmean(steps),
                     "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in mine),
                     "generation_minus_batched_bpb": statistics.fmean(r["generation_bpb"] - r["batched_bpb"] for r in mine),
                     "params": mine[0]["params"]})
    return rows


def run(variants: list[str], budget: float | None = 120.0, seeds: int = 2, eval_iters: int = 10,
        steps: int | None = None, generation_seqs: int = 4) -> dict:
    """Every variant for every seed, at equal time (budget seconds) or at equal tokens (steps, budget=None)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    runs = []
    for seed in range(seeds):                                  # seed-major: every variant sees the same drift
        for name in variants:
            r = train_for(name, 1337 + seed, eval_iters, budget, steps, generation_seqs)
            print(f"{name} seed {r['seed']}: {r['steps']} steps in {r['train_s']:.1f} s, val {r['val_bpb']:.3f} bpb, "
                  f"as generated {r['generation_bpb']:.3f} (batched {r['batched_bpb']:.3f})", flush=True)
            runs.append(r)
    return {"benchmark": "quality", "machine": machine(), "preset": PRESET, "budget_s": budget, "steps": steps,
            "seeds": seeds, "eval_iters": eval_iters, "generation_seqs": generation_seqs, "variants": {v: variant_config(v, 0) for v in variants},
            "runs": runs, "summary": summarise(runs, variants)}


def add_to(previous: dict, new: dict) -> dict:
    """`previous` with the runs of `new` added (replacing earlier runs of the same variants): one file
    after re-running or adding a variant. Both must use the same budget or steps and seeds."""
    keys = ("preset", "budget_s", "steps", "seeds", "eval_iters")
    if any(previous.get(k) != new[k] for k in keys):
        raise ValueError(f"cannot add runs with {[(k, new[k]) for k in keys]} to a file with "
                         f"{[(k, previous.get(k)) for k in keys]}: use the same --budget/--steps, --seeds and --eval-iters")
    redone = {r["variant"] for r in new["runs"]}
    runs = [r for r in previous["runs"] if r["variant"] not in redone] + new["runs"]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    return {**previous, "variants": {v: variant_config(v, 0) for v in variants}, "runs": runs,
            "summary": summarise(runs, variants),
            "added": previous.get("added", []) + [{"variants": sorted(redone), "machine": new["machine"]}]}


def main(argv: list[str] | None = None) -> dict:
    p = parser("quality", __doc__)
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per variant and seed")
    p.add_argument("--steps", type=int, default=None, help="train every variant for this many steps instead "
                   "(equal tokens); the budget is then ignored")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--eval-iters", type=int, default=10, help="batches per split in the final evaluation")
    p.add_argument("--generation-seqs", type=int, default=4, help="val sequences scored token by token, as generated")
    p.add_argument("--add", action="store_true", help="add these variants' runs to the existing --out file "
                   "(replacing their earlier runs) instead of overwriting it")
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("quality runs the cpu preset on the CPU only")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be a positive number of optimizer steps")
    result = run([v for v in args.variants.split(",") if v], None if args.steps else args.budget, args.seeds,
                 args.eval_iters, args.steps, args.generation_seqs)
    if args.add:
        if not Path(args.out).exists():
            p.error(f"--add: {args.out} does not exist yet; run without --add first")
        result = add_to(json.loads(Path(args.out).read_text()), result)
    print_table(result["summary"], ["variant", "params", "seeds", "steps_mean", "tokens_per_s", "val_bpb_mean",
                                    "val_bpb_std", "val_bpb_min", "val_bpb_max", "generation_minus_batched_bpb"])
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

"""Quality at equal wall-clock: train each variant for --budget seconds (per seed) with
strawberry.train and report validation bits per byte, mean and spread over --seeds.

Hand-written, not exported from a notebook. Run: python -m benchmarks.quality [--budget 120 --seeds 2]
Variants are the `cpu` preset (Strawberry), the baseline GPT at about its parameter count, and
ablations that each change one idea. The budget counts optimizer steps only (not evaluation):
a short calibration measures steps/s (then the weights and optimizer are restored), max_steps is
set so the warmup/cooldown schedule ends at the budget, and training stops at the budget regardless.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.common import machine, parser, print_table, write_json
from strawberry.gpt import GPT, GPTConfig
from strawberry.model import Strawberry, StrawberryConfig
from strawberry.tokenizer import get_tokenizer
from strawberry.train import PRESETS, Trainer, make_config

PRESET = "cpu"
ABLATIONS: dict[str, dict] = {                 # name -> model_config overrides on the cpu preset
    "strawberry": {},
    "no_retention": {"retention": False},
    "aft_only": {"ratio": "1:0"},
    "sdpa_only": {"ratio": "0:1"},
    "moe_ffn": {"ffn_experts": 4},
    "r_layer1": {"n_layer": 8, "r_layer": 1},  # the same 8 steps and 3:1 schedule, unshared weights (equal compute)
    "routing_expert": {"routing": "expert"},
}
VARIANTS = ("gpt", *ABLATIONS)


def matched_gpt_config(vocab_size: int, block_size: int) -> dict:
    """A GPT of width 128 whose depth gives the parameter count nearest to the cpu preset's Strawberry."""
    target = Strawberry(StrawberryConfig(vocab_size=vocab_size, block_size=block_size,
                                         **PRESETS[PRESET]["model_config"])).get_num_params(False)
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
        overrides["model_config"] = {**base["model_config"], **ABLATIONS[name]}
    return overrides


def train_for(name: str, seed: int, budget: float, eval_iters: int, calibrate_frac: float = 0.1) -> dict:
    """Train one variant for `budget` seconds of optimizer steps; its final val/train bits per byte."""
    trainer = Trainer(make_config(PRESET, {**variant_config(name, seed), "eval_iters": eval_iters}))
    cfg, model = trainer.config, trainer.model
    initial = (copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
               [copy.deepcopy(s.state_dict()) for s in trainer.schedulers], torch.get_rng_state())
    start, calib_steps = time.perf_counter(), 0
    while calib_steps < 2 or time.perf_counter() - start < calibrate_frac * budget:
        trainer.train_step()
        calib_steps += 1
    steps_per_s = calib_steps / (time.perf_counter() - start)
    model.load_state_dict(initial[0])                          # start again from the same weights
    for o, s in zip(trainer.optimizers, initial[1]):
        o.load_state_dict(s)
    for sch, s in zip(trainer.schedulers, initial[2]):
        sch.load_state_dict(s)
    torch.set_rng_state(initial[3])
    trainer.step, trainer.history = 0, {"loss": [], "lr": [], "evals": []}
    cfg.max_steps = max(2, int(budget * steps_per_s))           # the schedule reads cfg at every step
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps // 10)
    start = time.perf_counter()
    while trainer.step < cfg.max_steps and time.perf_counter() - start < budget:
        trainer.train_step()
    train_s = time.perf_counter() - start
    metrics = trainer.evaluate()
    return {"variant": name, "seed": seed, "steps": trainer.step, "planned_steps": cfg.max_steps, "train_s": train_s,
            "tokens": trainer.step * cfg.batch_size * cfg.block_size * cfg.grad_accum,
            "params": model.get_num_params(False), "val_bpb": metrics["val_bpb"], "train_bpb": metrics["train_bpb"],
            "final_train_loss": trainer.history["loss"][-1] if trainer.history["loss"] else float("nan")}


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for name in variants:
        vals = [r["val_bpb"] for r in runs if r["variant"] == name]
        steps = [r["steps"] for r in runs if r["variant"] == name]
        rows.append({"variant": name, "seeds": len(vals), "val_bpb_mean": statistics.fmean(vals),
                     "val_bpb_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "val_bpb_min": min(vals), "val_bpb_max": max(vals), "steps_mean": statistics.fmean(steps),
                     "params": next(r["params"] for r in runs if r["variant"] == name)})
    return rows


def run(variants: list[str], budget: float = 120.0, seeds: int = 2, eval_iters: int = 10) -> dict:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    runs = []
    for seed in range(seeds):                                  # seed-major: every variant sees the same drift
        for name in variants:
            r = train_for(name, 1337 + seed, budget, eval_iters)
            print(f"{name} seed {r['seed']}: {r['steps']} steps in {r['train_s']:.1f} s, val {r['val_bpb']:.3f} bpb", flush=True)
            runs.append(r)
    return {"benchmark": "quality", "machine": machine(), "preset": PRESET, "budget_s": budget, "seeds": seeds,
            "eval_iters": eval_iters, "variants": {v: variant_config(v, 0) for v in variants},
            "runs": runs, "summary": summarise(runs, variants)}


def main(argv: list[str] | None = None) -> dict:
    p = parser("quality", __doc__)
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per variant and seed")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--eval-iters", type=int, default=10, help="batches per split in the final evaluation")
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("quality runs the cpu preset on the CPU only")
    result = run([v for v in args.variants.split(",") if v], args.budget, args.seeds, args.eval_iters)
    print_table(result["summary"], ["variant", "params", "seeds", "steps_mean", "val_bpb_mean", "val_bpb_std",
                                    "val_bpb_min", "val_bpb_max"])
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

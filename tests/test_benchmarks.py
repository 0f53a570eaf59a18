"""Smoke tests of the benchmark scripts (benchmarks/, hand-written): each main() runs with tiny
settings and writes JSON with the expected keys and finite numbers."""
import json
import math
from pathlib import Path

import pytest

from benchmarks import generation, quality, training_cost


def _finite(values):
    values = list(values)
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), values


def test_generation(tmp_path):
    out = tmp_path / "generation.json"
    generation.main(["--contexts", "32,64", "--new-tokens", "3", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {r["variant"] for r in result["rows"]} == set(generation.VARIANTS)
    assert {r["context"] for r in result["rows"]} == {32, 64}
    for r in result["rows"]:
        _finite([r["tokens_per_s"], r["ms_per_token"], r["prefill_s"], r["state_bytes"], r["state_growth_bytes_per_token"]])
    _finite(result["cached_vs_uncached_speedup"].values())
    _finite(f["ms_per_token_ratio"] for f in result["flatness_largest_over_smallest_context"].values())


def test_training_cost(tmp_path):
    out = tmp_path / "training_cost.json"
    training_cost.main(["--seq-lens", "32,64", "--tokens", "64", "--repeats", "1", "--matmul-n", "128", "--out", str(out)])
    result = json.loads(out.read_text())
    _finite([result["matmul_peak_flops"]])
    assert {r["variant"] for r in result["rows"]} == {"aft", "local_moe_sdpa", "full_sdpa", "strawberry", "strawberry_no_retention", "gpt"}
    for r in result["rows"]:
        _finite([r["tokens_per_s"], r["saved_activation_MB"]])
        if r["variant"] in ("strawberry", "strawberry_no_retention", "gpt"):
            _finite([r["train_flops_per_token"], r["mfu"]])
    _finite(r for ratios in result["mfu_strawberry_over_gpt"].values() for r in ratios.values())


def test_quality(tmp_path):
    out = tmp_path / "quality.json"
    quality.main(["--budget", "1", "--seeds", "1", "--variants", "gpt,aft_only", "--eval-iters", "1", "--generation-seqs", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["summary"]] == ["gpt", "aft_only"]
    for r in result["summary"]:
        _finite([r["val_bpb_mean"], r["val_bpb_std"], r["steps_mean"], r["params"]])
    for r in result["runs"]:
        assert r["steps"] >= 1
        _finite([r["val_bpb"], r["train_bpb"], r["train_s"]])
    # re-running one variant with --add replaces its runs and keeps the others
    quality.main(["--budget", "1", "--seeds", "1", "--variants", "gpt", "--eval-iters", "1", "--generation-seqs", "1", "--out", str(out), "--add"])
    added = json.loads(out.read_text())
    assert [r["variant"] for r in added["summary"]] == ["gpt", "aft_only"] and len(added["runs"]) == 2
    assert added["added"][0]["variants"] == ["gpt"]
    assert next(r for r in added["runs"] if r["variant"] == "aft_only") == next(r for r in result["runs"] if r["variant"] == "aft_only")
    with pytest.raises(ValueError, match="same --budget"):
        quality.add_to(added, {**added, "budget_s": 2.0})


def test_quality_at_equal_steps_and_the_leak_of_batch_global_retention(tmp_path):
    out = tmp_path / "quality_steps.json"
    quality.main(["--steps", "3", "--seeds", "1", "--variants", "strawberry,batch_global_retention",
                  "--eval-iters", "1", "--generation-seqs", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["budget_s"] is None
    runs = {r["variant"]: r for r in result["runs"]}
    assert all(r["steps"] == 3 and r["tokens"] == runs["strawberry"]["tokens"] for r in runs.values())
    # a causal model scores the same as generated and batched; the leaky one does not
    assert abs(runs["strawberry"]["generation_bpb"] - runs["strawberry"]["batched_bpb"]) < 1e-6
    assert abs(runs["batch_global_retention"]["generation_bpb"] - runs["batch_global_retention"]["batched_bpb"]) > 1e-5


def test_quality_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        quality.run(["nope"], budget=1, seeds=1)


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_committed_results_are_complete():
    """Notebook 09 plots these files: every variant, seed, context and sequence length must be there."""
    timed = json.loads((RESULTS / "quality.json").read_text())
    steps = json.loads((RESULTS / "quality_steps.json").read_text())
    assert timed["budget_s"] == 120 and timed["seeds"] >= 2 and steps["steps"] and steps["budget_s"] is None
    for result in (timed, steps):
        assert [r["variant"] for r in result["summary"]] == list(quality.VARIANTS)
        assert len(result["runs"]) == len(quality.VARIANTS) * result["seeds"]
        _finite(r["val_bpb"] for r in result["runs"])
    gen = json.loads((RESULTS / "generation.json").read_text())
    assert gen["contexts"] == [256, 512, 1024, 2048, 4096]
    assert {(r["variant"], r["context"]) for r in gen["rows"]} == {(v, c) for v in generation.VARIANTS for c in gen["contexts"]}
    cost = json.loads((RESULTS / "training_cost.json").read_text())
    assert cost["seq_lens"] == [256, 512, 1024, 2048, 4096] and len(cost["rows"]) == 6 * len(cost["seq_lens"])

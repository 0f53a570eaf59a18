"""Smoke tests of the benchmark scripts (benchmarks/, hand-written): each main() runs with tiny
settings and writes JSON with the expected keys and finite numbers."""
import json
import math

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
    assert {r["variant"] for r in result["rows"]} == {"aft", "local_moe_sdpa", "full_sdpa", "strawberry", "gpt"}
    for r in result["rows"]:
        _finite([r["tokens_per_s"], r["saved_activation_MB"]])
        if r["variant"] in ("strawberry", "gpt"):
            _finite([r["train_flops_per_token"], r["mfu"]])
    _finite(result["mfu_strawberry_over_gpt"].values())


def test_quality(tmp_path):
    out = tmp_path / "quality.json"
    quality.main(["--budget", "1", "--seeds", "1", "--variants", "gpt,aft_only", "--eval-iters", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["summary"]] == ["gpt", "aft_only"]
    for r in result["summary"]:
        _finite([r["val_bpb_mean"], r["val_bpb_std"], r["steps_mean"], r["params"]])
    for r in result["runs"]:
        assert r["steps"] >= 1
        _finite([r["val_bpb"], r["train_bpb"], r["train_s"]])


def test_quality_at_equal_steps_and_the_leak_of_batch_global_retention(tmp_path):
    out = tmp_path / "quality_steps.json"
    quality.main(["--steps", "3", "--seeds", "1", "--variants", "strawberry,batch_global_retention",
                  "--eval-iters", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["budget_s"] is None
    runs = {r["variant"]: r for r in result["runs"]}
    assert all(r["steps"] == 3 and r["tokens"] == runs["strawberry"]["tokens"] for r in runs.values())
    # a causal model scores the same as generated and batched; the leaky one does not
    assert abs(runs["strawberry"]["generation_bpb"] - runs["strawberry"]["batched_bpb"]) < 1e-4
    assert abs(runs["batch_global_retention"]["generation_bpb"] - runs["batch_global_retention"]["batched_bpb"]) > 1e-4


def test_quality_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        quality.run(["nope"], budget=1, seeds=1)

"""The trainer: schedule, exact resume, atomic and safe checkpoints, NaN guard, clear errors, DDP and the CLIs."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from strawberry import gpt, train
from strawberry.sample import main as sample_main, sampler_widget
from strawberry.train import (CheckpointError, Trainer, TrainingDiverged, load_checkpoint, lr_multiplier,
                              make_config, model_from_checkpoint, sample_text, save_checkpoint)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(model="gpt", model_config=dict(n_layer=1, n_head=2, n_embd=32), block_size=32, batch_size=4, max_steps=8,
            warmup_steps=2, eval_interval=4, eval_iters=2, sample_tokens=0)


class Payload:
    """Any custom class: unpickling it could run code, so weights_only refuses it."""


def tiny_config(out_dir: Path, **overrides) -> train.TrainConfig:
    return make_config("quick", {**TINY, "out_dir": str(out_dir), **overrides})


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of 8 steps (checkpoints at 4 and 8), shared by the read-only tests."""
    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("run")))
    trainer.fit(progress=False, verbose=False)
    return trainer


def test_schedule_warmup_constant_cooldown(finished_run):
    S, W, D, r = 100, 10, 20, 0.1
    m = [lr_multiplier(s, S, W, D, r) for s in range(S)]
    assert m[0] == pytest.approx(0.1) and m[4] == pytest.approx(0.5) and m[W - 1] == 1.0    # linear warmup
    assert all(x == 1.0 for x in m[W:S - D + 1])                                               # constant
    assert all(a > b for a, b in zip(m[S - D:], m[S - D + 1:]))                                 # strictly decaying
    assert m[S - D + D // 2] == pytest.approx(r + (1 - r) * 0.5)                                # cosine midpoint
    assert m[-1] == pytest.approx(r, abs=0.01) and lr_multiplier(S, S, W, D, r) == pytest.approx(r)
    # the optimizer really used cfg.lr * multiplier at every step
    cfg = finished_run.config
    expected = [cfg.lr * lr_multiplier(s, cfg.max_steps, cfg.warmup_steps, train.cooldown_steps(cfg), cfg.final_lr_frac)
                for s in range(cfg.max_steps)]
    assert finished_run.history["lr"] == pytest.approx(expected)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, finished_run):
    first = Trainer(tiny_config(tmp_path))
    first.fit(stop_at=3, progress=False, verbose=False)       # stops between two evaluations
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3
    resumed = Trainer(tiny_config(tmp_path), resume=True)
    assert resumed.step == 3
    resumed.fit(progress=False, verbose=False)
    assert resumed.history["loss"] == finished_run.history["loss"]            # bit for bit
    assert [e["val_bpb"] for e in resumed.history["evals"]] == [e["val_bpb"] for e in finished_run.history["evals"]]
    for a, b in zip(resumed.model.state_dict().values(), finished_run.model.state_dict().values()):
        assert torch.equal(a, b)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, finished_run):
    path = finished_run.save(tmp_path / "ckpt.pt")

    def crashing_save(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half of a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"format": train.CHECKPOINT_FORMAT, "step": 999}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == finished_run.step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]          # no temporary file left behind


def test_checkpoints_load_with_weights_only(tmp_path, monkeypatch, finished_run):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    state = load_checkpoint(finished_run.checkpoint_path)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert state["step"] == 8 and state["config"]["model"] == "gpt" and isinstance(state["model_config"], dict)
    torch.save({"format": train.CHECKPOINT_FORMAT, "payload": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "unsafe.pt")


def test_corrupt_truncated_and_foreign_checkpoints_are_refused(tmp_path, finished_run):
    good = finished_run.checkpoint_path.read_bytes()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("junk.pt", "truncated.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(tmp_path / name)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a Strawberry checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Trainer(tiny_config(tmp_path / "nothing"), resume=True)
    state = load_checkpoint(finished_run.checkpoint_path)
    state["model"] = {k: v[..., :1] if v.dim() else v for k, v in state["model"].items()}   # wrong shapes
    save_checkpoint(state, tmp_path / "mismatched.pt")
    with pytest.raises(CheckpointError, match="do not fit the model"):
        model_from_checkpoint(tmp_path / "mismatched.pt")


def test_a_config_that_does_not_fit_the_checkpoint_is_refused(tmp_path, finished_run):
    out = finished_run.checkpoint_path.parent
    with pytest.raises(CheckpointError, match="n_layer"):
        Trainer(tiny_config(out, model_config=dict(n_layer=2, n_head=2, n_embd=32)), resume=True)
    with pytest.raises(CheckpointError, match="optimizer"):
        Trainer(tiny_config(out, optimizer="muon"), resume=True)
    with pytest.raises(CheckpointError, match="block_size"):
        Trainer(tiny_config(out, block_size=16), resume=True)
    Trainer(tiny_config(out, lr=1e-4, max_steps=12), resume=True)            # schedule changes are allowed


def test_missing_or_different_tokenizer_is_reported(tmp_path, monkeypatch, finished_run):
    state = load_checkpoint(finished_run.checkpoint_path)
    state["tokenizer"] = {"kind": "bpe", "name": "bpe-999", "vocab_size": 999, "sha256": "0" * 64}
    save_checkpoint(state, tmp_path / "bpe.pt")
    monkeypatch.setenv("STRAWBERRY_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"bpe-999.*missing"):
        model_from_checkpoint(tmp_path / "bpe.pt")
    monkeypatch.delenv("STRAWBERRY_DATA_DIR")
    state["tokenizer"] = {**train.tokenizer_reference(finished_run.tokenizer), "sha256": "0" * 64}
    save_checkpoint(state, tmp_path / "other_vocab.pt")
    with pytest.raises(CheckpointError, match="fingerprint"):
        model_from_checkpoint(tmp_path / "other_vocab.pt")


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path))
    real_forward, calls = gpt.GPT.forward, []

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training:
            calls.append(1)
            if len(calls) > 6 and loss is not None:          # the 7th training step goes wrong
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(gpt.GPT, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"step 7: the training loss is nan.*step 4\)"):
        trainer.fit(progress=False, verbose=False)
    assert trainer.step == 6 and len(trainer.history["loss"]) == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())    # the bad update was not applied
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4                  # and the checkpoint was not overwritten


def test_config_validation_and_overrides(monkeypatch):
    cfg = make_config("cpu", ["lr=3e-4", "model_config.n_layer=6", "out_dir=runs/x", "compile=False"])
    assert (cfg.lr, cfg.model_config["n_layer"], cfg.out_dir, cfg.compile) == (3e-4, 6, "runs/x", False)
    for bad, message in [(["n_layer=6"], "unknown setting"), (["lr"], "key=value"), (["lr=-1"], "lr must be > 0"),
                         (["warmup_steps=5000"], "exceed"), (["model=llama"], "unknown model kind")]:
        with pytest.raises(ValueError, match=message):
            make_config("cpu", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("tpu")
    monkeypatch.setenv("STRAWBERRY_QUICK", "1")
    assert train.default_preset() == "quick"
    monkeypatch.delenv("STRAWBERRY_QUICK")
    assert train.default_preset() == ("gpu" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown key"):
        train.resolve_model_config("gpt", {"n_layers": 2}, 321, 64)
    assert train.main(["--preset", "quick", "--override", "nonsense=1"]) == 1


def test_muon_takes_hidden_matrices_and_trains(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, optimizer="muon", max_steps=4, eval_interval=4))
    adamw, muon = trainer.optimizers
    hidden = {id(p) for group in muon.param_groups for p in group["params"]}
    assert id(trainer.model.wte.weight) not in hidden and all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert len(hidden) == 5                                  # qkv, proj, w1, w2, w3 (the tied head is the embedding)
    trainer.fit(progress=False, verbose=False)
    assert all(math.isfinite(x) for x in trainer.history["loss"])
    assert len(load_checkpoint(trainer.checkpoint_path)["optimizers"]) == 2


def test_sampling_function_and_widget(finished_run, capsys):
    model, tokenizer = model_from_checkpoint(finished_run.checkpoint_path)
    a = sample_text(model, tokenizer, "ROMEO:", 20, seed=3)
    assert a.startswith("ROMEO:") and a == sample_text(model, tokenizer, "ROMEO:", 20, seed=3)
    assert sample_text(model, tokenizer, "", 5, temperature=0)       # an empty prompt starts from a newline
    widget = sampler_widget(model, tokenizer, prompt="JULIET:", max_new_tokens=10)
    capsys.readouterr()
    widget.children[3].click()                               # the Generate button; outside Jupyter it prints
    assert "JULIET:" in capsys.readouterr().out


def test_ddp_two_processes_equal_one_process_and_the_clis_run(tmp_path):
    """`torchrun` with 2 gloo processes of one micro-batch each == 1 process accumulating 2; then sample from the CLI."""
    overrides = ["model=gpt", "model_config={'n_layer': 1, 'n_head': 2, 'n_embd': 32}", "block_size=32", "batch_size=4",
                 "max_steps=3", "warmup_steps=1", "eval_interval=3", "eval_iters=1", "sample_tokens=0"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "strawberry.train", "--preset", "quick", "--no-progress", "--override", *overrides,
                          "grad_accum=1", f"out_dir={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    single = Trainer(make_config("quick", [*overrides, "grad_accum=2", f"out_dir={tmp_path / 'single'}"]))
    single.fit(progress=False, verbose=False)
    one, two = load_checkpoint(single.checkpoint_path), load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert len(two["rng"]) == 2 and len(one["rng"]) == 1            # every process's random state is saved
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], abs=1e-5)
    for name, weight in one["model"].items():
        assert torch.allclose(weight, two["model"][name], atol=1e-5), name

    sample = subprocess.run([sys.executable, "-m", "strawberry.sample", "--checkpoint", str(tmp_path / "ddp" / "ckpt.pt"),
                             "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "0"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:")
    assert sample_main(["--checkpoint", str(tmp_path / "missing.pt")]) == 1

import pytest
import torch

from strawberry.runtime import autocast, get_device, is_quick, seed_everything


def test_device_override_by_argument_and_environment(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("STRAWBERRY_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.delenv("STRAWBERRY_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert get_device().type == expected


def test_bad_devices_get_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown device"):
        get_device("tpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("STRAWBERRY_DEVICE", "cuda")
        with pytest.raises(ValueError, match=r"STRAWBERRY_DEVICE.*not available"):
            get_device()


def test_quick_mode_switch(monkeypatch):
    monkeypatch.setenv("STRAWBERRY_QUICK", "1")
    assert is_quick()
    monkeypatch.setenv("STRAWBERRY_QUICK", "0")
    assert not is_quick()


def test_autocast_is_a_no_op_on_cpu_and_seeding_is_reproducible():
    with autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    seed_everything(3)
    a = torch.randn(3)
    seed_everything(3)
    assert torch.equal(a, torch.randn(3))

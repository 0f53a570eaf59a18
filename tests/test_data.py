import hashlib
import urllib.error

import pytest
import torch

from strawberry import data
from strawberry.data import DataError, get_batch, load_tinyshakespeare, train_val_split


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_cached_corpus_loads_without_network(monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", _no_network)
    text = load_tinyshakespeare()
    assert len(text.encode("utf-8")) == 1_115_394
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == data.TINYSHAKESPEARE_SHA256


def test_offline_without_cache_names_url_path_and_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", _no_network)
    with pytest.raises(DataError) as err:
        load_tinyshakespeare(tmp_path)
    message = str(err.value)
    assert data.TINYSHAKESPEARE_URL in message
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in message
    assert data.TINYSHAKESPEARE_SHA256 in message
    assert not list(tmp_path.rglob("*.part")), "a failed download must not leave a partial file"


def test_corrupt_cache_is_refused(tmp_path):
    path = tmp_path / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_text("First Citizen:\nnot the real corpus\n")
    with pytest.raises(DataError, match="corrupt"):
        load_tinyshakespeare(tmp_path)


def test_download_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    class FakeResponse:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"truncated"

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: FakeResponse())
    with pytest.raises(DataError, match="SHA-256"):
        load_tinyshakespeare(tmp_path)
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()


def test_split_is_disjoint_and_complete():
    text = load_tinyshakespeare()
    train, val = train_val_split(text, 0.1)
    assert train + val == text
    assert len(val) == len(text) - int(len(text) * 0.9)
    with pytest.raises(ValueError):
        train_val_split(text, 1.5)


def test_batches_are_shifted_windows_on_the_requested_device():
    tokens = torch.arange(1000, dtype=torch.int32)
    x, y = get_batch(tokens, batch_size=5, block_size=32, device="cpu", generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (5, 32) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # consecutive ids: y is x shifted by one position
    x2, _ = get_batch(tokens, 5, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(tokens[:10], 2, 32)

import math
import random

import pytest

from strawberry.data import load_tinyshakespeare, train_val_split
from strawberry.tokenizer import BPETokenizer, CharTokenizer, bits_per_byte, get_tokenizer


def random_unicode(rng: random.Random, n: int) -> str:
    """Random valid strings: ASCII, Latin, Greek, CJK, emoji, control characters."""
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0, 128), rng.randrange(128, 0x800), rng.randrange(0x4E00, 0x9FFF),
                         rng.randrange(0x1F300, 0x1FAFF), rng.randrange(0x10000, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:
            out.append(chr(cp))
    return "".join(out)


@pytest.fixture(scope="module")
def small_bpe():
    train, _ = train_val_split(load_tinyshakespeare())
    return BPETokenizer.train(train[:200_000], 400)


@pytest.fixture(scope="module")
def char_tokenizer():
    return get_tokenizer("char")


def test_round_trip_on_random_unicode(small_bpe, char_tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        s = random_unicode(rng, rng.randrange(0, 40))
        assert small_bpe.decode(small_bpe.encode(s)) == s
        assert char_tokenizer.decode(char_tokenizer.encode(s)) == s


def test_char_tokenizer_matches_nanogpt_on_shakespeare(char_tokenizer):
    assert char_tokenizer.chars[:3] == "\n !" and len(char_tokenizer.chars) == 65
    assert char_tokenizer.encode("Hi") == [char_tokenizer.stoi["H"], char_tokenizer.stoi["i"]]


def test_invalid_text_and_ids_get_clear_errors(small_bpe, char_tokenizer):
    for tok in (small_bpe, char_tokenizer):
        with pytest.raises(ValueError, match="not valid Unicode"):
            tok.encode("a\ud800b")
        with pytest.raises(ValueError, match="token ids"):
            tok.decode([tok.vocab_size])


def test_save_load_identity(small_bpe, tmp_path):
    path = tmp_path / "tok.tiktoken"
    small_bpe.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.mergeable_ranks == small_bpe.mergeable_ranks and loaded.pattern == small_bpe.pattern
    text = "Wherefore art thou, Romeo? 🍓"
    assert loaded.encode(text) == small_bpe.encode(text)
    assert path.read_text().isascii()  # a plain text file, not a pickle


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        BPETokenizer.load(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not a tokenizer\n")
    with pytest.raises(ValueError, match="not a valid tokenizer file"):
        BPETokenizer.load(bad)


def test_training_is_deterministic():
    text = "the cat sat on the mat; the dog sat on the log. " * 200
    assert BPETokenizer.train(text, 300).mergeable_ranks == BPETokenizer.train(text, 300).mergeable_ranks


def test_bits_per_byte_by_hand():
    assert bits_per_byte(math.log(256), 10, 10) == pytest.approx(8.0)
    # 1.5 nats/token, 200 tokens covering 600 bytes: 300 nats = 432.8 bits over 600 bytes
    assert bits_per_byte(1.5, 200, 600) == pytest.approx(300 / math.log(2) / 600)


def test_get_tokenizer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        get_tokenizer("words")

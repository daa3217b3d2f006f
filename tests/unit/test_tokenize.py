"""PromptEncoder: long texts cut at pre-token boundaries and encoded on several threads give
exactly `tokenizer.encode`'s ids (the reference), for the byte-level BPE tokenizers it accepts,
and every other tokenizer takes the plain path."""
import json
import random

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from meshserve import tokenize
from meshserve.bench.datasets import random_samples
from meshserve.bench.shapes import resolve_model

LLAMA3_SPLIT = next(p for p in tokenize._KNOWN_SPLITS if "{1,3}" in p)
# Pieces that sit on the edges of the pre-tokenizer rules: runs of spaces before words, newlines
# and tabs, digit runs (grouped by three in Llama 3), contractions, punctuation, non-ASCII
# letters, and special-token text.
ATOMS = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", "a", "word", " word", "Word", "'s", "'LL", "1", "12345",
         " 678", ".", "...", "!?", " -", "é", "naïve", "東京", "🙂", "<|begin_of_text|>", "<|eot_id|>", "x y"]


def adversarial_texts(n: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ATOMS) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="module")
def llama_tok():
    return AutoTokenizer.from_pretrained(resolve_model("llama-3.1-8b"))


@pytest.fixture(scope="module")
def qwen_tok():
    return AutoTokenizer.from_pretrained(resolve_model("qwen3-0.6b"))


@pytest.fixture(scope="module")
def llama3_split_tok(llama_tok):
    """The same vocabulary behind Llama 3's own pre-tokenizer (Split regex + ByteLevel without regex)."""
    spec = json.loads(llama_tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


@pytest.fixture(autouse=True)
def rust_threads(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # tests/conftest.py turns it off by default


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(tokenize, "MIN_CHARS", 0)
    monkeypatch.setattr(tokenize, "PIECE_CHARS", 40)


@pytest.mark.parametrize("which", ["llama_tok", "qwen_tok", "llama3_split_tok"])
def test_parallel_encode_equals_encode(which, request, small_pieces):
    tok = request.getfixturevalue(which)
    enc = tokenize.PromptEncoder(tok, threads=8)
    assert enc.parallel
    texts = adversarial_texts(40, 300, seed=hash(which) % 1000)
    texts += [s.prompt for s in random_samples(tok, 3, 2048, 1, seed=5)]
    for text in texts:
        for special in (True, False):
            assert enc.encode(text, add_special_tokens=special) == tok.encode(text, add_special_tokens=special)


def test_adversarial_texts_break_naive_cuts(llama3_split_tok):
    """The texts above do exercise the cut rule: cutting at arbitrary characters changes the ids."""
    tok = llama3_split_tok
    texts = adversarial_texts(20, 300, seed=1)
    differ = 0
    for text in texts:
        naive = []
        for i in range(0, len(text), 37):
            naive += tok.encode(text[i:i + 37], add_special_tokens=False)
        differ += naive != tok.encode(text, add_special_tokens=False)
    assert differ >= 15


def test_cuts_fall_before_a_space_after_a_non_space():
    text = "".join(adversarial_texts(1, 2000, seed=2))
    pieces = tokenize.split_text(text, 16)
    assert "".join(pieces) == text and len(pieces) > 8
    for piece in pieces[1:]:
        assert piece[0] == " "
    for piece in pieces[:-1]:
        assert not piece[-1].isspace()


def test_other_tokenizers_take_the_plain_path(llama_tok, small_pieces):
    spec = json.loads(llama_tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\S+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    enc = tokenize.PromptEncoder(tok, threads=8)
    assert not enc.parallel  # an unknown split regex: no proof that the cuts are safe
    text = adversarial_texts(1, 300, seed=3)[0]
    assert enc.encode(text) == tok.encode(text)
    assert not tokenize.PromptEncoder(llama_tok, threads=1).parallel


def test_tokenizers_parallelism_false_keeps_one_encode(llama_tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert not tokenize.PromptEncoder(llama_tok, threads=8).parallel

"""vLLM's `bad_words`: a word's last token is banned whenever the output ends with the word's other
tokens (a one-token word: always), over the outputs only. The reference is transformers' greedy
decoding with that rule applied here, step by step; the engine's greedy ids must equal it, with the
words given as token ids or as strings (tokenized alone and after a space, as vLLM does), in a batch
with free requests (overlap on), and on two tensor-parallel ranks."""
from __future__ import annotations

import pytest
import torch


PROMPTS = ["hello world", "the cat sat on the mat", "numbers 1 2 3 and words"]


@pytest.fixture(scope="module")
def model(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def hf(tiny_llama_hf):
    return tiny_llama_hf


@torch.no_grad()
def reference(hf, prompt: str, max_tokens: int, words=()) -> list[int]:
    model, tok = hf
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        for w in words:
            if len(w) == 1 or (len(out) >= len(w) - 1 and out[len(out) - len(w) + 1:] == list(w[:-1])):
                logits[w[-1]] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def contains(seq: list[int], word: list[int]) -> bool:
    return any(seq[i:i + len(word)] == word for i in range(len(seq) - len(word) + 1))


@pytest.fixture(scope="module")
def llm(model):
    from meshserve import LLM
    return LLM(model=model, max_batch_size=8, max_seq_len=512)


def _words_from_free_run(hf, prompt):
    free = reference(hf, prompt, 16)
    return free, [free[2:4], [free[7]]]  # a two-token word the free run writes, and a one-token word


def test_token_id_words_equal_the_reference_beside_free_requests(llm, hf):
    from meshserve import SamplingParams
    params, refs = [], []
    for p in PROMPTS:
        free, words = _words_from_free_run(hf, p)
        ref = reference(hf, p, 16, words)
        assert ref != free  # the ban changes this output
        assert not any(contains(ref, w) for w in words)
        params.append(SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, bad_words_token_ids=words))
        refs.append(ref)
    free_params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS + PROMPTS, params + [free_params] * len(PROMPTS))
    assert [o.outputs[0].token_ids for o in outs[:len(PROMPTS)]] == refs
    assert [o.outputs[0].token_ids for o in outs[len(PROMPTS):]] == [reference(hf, p, 16) for p in PROMPTS]


def test_string_words_are_tokenized_alone_and_after_a_space(llm, hf):
    from meshserve import SamplingParams
    _, tok = hf
    prompt = PROMPTS[1]
    free = reference(hf, prompt, 16)
    word = tok.decode(free[3:5]).strip() or "the"
    seqs = [tok.encode(word, add_special_tokens=False), tok.encode(" " + word, add_special_tokens=False)]
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                bad_words=[word]))[0].outputs[0]
    assert out.token_ids == reference(hf, prompt, 16, [s for i, s in enumerate(seqs) if s not in seqs[:i]])


def test_two_ranks_equal_the_reference(model, hf):
    from meshserve import LLM, SamplingParams
    free, words = _words_from_free_run(hf, PROMPTS[0])
    llm = LLM(model=model, tensor_parallel_size=2, max_batch_size=4, max_seq_len=512)
    try:
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                        bad_words_token_ids=words))[0].outputs[0]
    finally:
        llm.shutdown()
    assert out.token_ids == reference(hf, PROMPTS[0], 16, words)


@pytest.mark.parametrize("kw,words", [
    ({"bad_words": [""]}, "SamplingParams.bad_words=[''] is invalid: expected a list of non-blank strings"),
    ({"bad_words_token_ids": [[]]}, "expected a list of non-empty lists of token ids"),
    ({"bad_words_token_ids": [[1, -2]]}, "expected a list of non-empty lists of token ids"),
])
def test_bad_words_are_checked(kw, words):
    from meshserve import SamplingParams
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kw)


def test_an_id_outside_the_vocabulary_is_refused(llm):
    from meshserve import SamplingParams
    with pytest.raises(ValueError, match="bad_words_token_ids contains token id 999999"):
        llm.generate(["hi"], SamplingParams(bad_words_token_ids=[[5, 999999]]))

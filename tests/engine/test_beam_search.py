"""Beam search (vLLM's LLM.beam_search, BeamSearchParams) against transformers' own beam search
(`generate(num_beams=k)`, no EOS): the same beams in the same order, each beam's cum_logprob equal to
a float64 sum of log-softmaxes; EOS and length_penalty ranking checked on the search's state with
given logprobs; bad params are one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

from meshserve import LLM
from meshserve.beam_search import BeamSearch, BeamSearchParams, beam_score

PROMPTS = [[5, 9, 31, 7, 100], [44, 3, 3, 250, 12, 17, 90, 61]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, show_progress=False) as llm:
        yield llm


@torch.no_grad()
def cum_logprob64(model, prompt, out) -> float:
    m = model.double()
    logits = m(torch.tensor([prompt + out])).logits[0]
    lp = torch.log_softmax(logits, -1)
    total = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(out))
    model.float()
    return total


@pytest.mark.parametrize("width", [1, 3])
def test_beams_equal_transformers_beam_search(llm, tiny_llama_hf, width):
    model, _ = tiny_llama_hf
    model.generation_config.eos_token_id = None
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True))
    for p, out in zip(PROMPTS, outs):
        ref = model.generate(torch.tensor([p]), num_beams=width, num_return_sequences=width, do_sample=False,
                             max_new_tokens=6, early_stopping=False, pad_token_id=0, attention_mask=torch.ones(1, len(p),
                                                                                                              dtype=torch.long))
        assert [s.output_token_ids for s in out.sequences] == ref[:, len(p):].tolist()
        for s in out.sequences:
            assert s.tokens[:len(p)] == p and s.finish_reason == "length" and len(s.logprobs) == 6
            assert math.isclose(s.cum_logprob, cum_logprob64(model, p, s.output_token_ids), abs_tol=1e-3)
            assert s.text == llm.tokenizer.decode(s.output_token_ids, skip_special_tokens=True)


def test_eos_completes_a_beam_and_length_penalty_ranks():
    """Given logprobs: EOS (id 2) ends the beam that takes it; the others go on; the final ranking is
    cum_logprob / length ** length_penalty (length with the prompt, less the EOS), vLLM's."""
    s = BeamSearch([7, 7], BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=1.0), [2])
    s.advance([{2: -0.1, 5: -0.5, 6: -3.0}])  # EOS is best: completed [7, 7, 2] at -0.1
    assert [b.tokens for b in s.beams] == [[7, 7, 5], [7, 7, 6]] and [b.tokens for b in s.completed] == [[7, 7, 2]]
    s.advance([{8: -0.2}, {9: -0.1}])
    s.advance([{8: -0.2}, {9: -0.1}])
    assert s.done and s.pending() == []
    out = s.result(lambda ids: ",".join(map(str, ids)))
    # scores: [7,7,2]: -0.1 / 2; [7,7,5,8,8]: -0.9 / 5; [7,7,6,9,9]: -3.2 / 5
    assert [b.tokens for b in out.sequences] == [[7, 7, 2], [7, 7, 5, 8, 8]]
    assert out.sequences[0].finish_reason == "stop" and out.sequences[0].text == ""  # the EOS is not text
    assert out.sequences[1].finish_reason == "length" and out.sequences[1].text == "5,8,8"
    assert beam_score([7, 7, 5, 8, 8], -0.9, {2}, 2.0) == pytest.approx(-0.9 / 25)
    s = BeamSearch([7], BeamSearchParams(beam_width=1, max_tokens=2, ignore_eos=True), [2])
    s.advance([{2: -0.1, 5: -0.5}])
    assert [b.tokens for b in s.beams] == [[7, 2]] and not s.completed  # ignore_eos: EOS is a token like others


@pytest.mark.parametrize("kw,words", [
    ({"beam_width": 0, "max_tokens": 4}, "BeamSearchParams.beam_width=0 is invalid"),
    ({"beam_width": 2, "max_tokens": True}, "BeamSearchParams.max_tokens=True is invalid"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": -1}, "BeamSearchParams.temperature=-1"),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "BeamSearchParams.length_penalty=nan"),
])
def test_bad_params_are_one_line_errors(kw, words):
    with pytest.raises(ValueError, match=words):
        BeamSearchParams(**kw)


def test_beam_search_needs_its_params(llm):
    with pytest.raises(ValueError, match="params must be a meshserve.beam_search.BeamSearchParams"):
        llm.beam_search(["hi"], {"beam_width": 2})

"""Structured outputs (vLLM's `structured_outputs`, TensorRT-LLM's `guided_decoding`) from the LLM API.

The reference is independent of the engine: transformers runs the same checkpoint step by step,
and a grammar matcher built here (xgrammar over the checkpoint's own tokenizer) masks its logits
before the argmax. The engine's greedy ids must equal that, in a batch that mixes constrained and
free requests (each mask reaches its own row, at its own step), under chunked prefill, with two
tensor-parallel ranks (the mask reaches the sampling rank), and after preemption. Whatever the
model, the text must satisfy the constraint by Python's own `re`, `json` and `jsonschema`."""
from __future__ import annotations

import json
import re

import pytest
import torch


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["x", "yy", "z"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "pick", "n"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["red", "green", "blue sky"]
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "zz"'
PROMPTS = ["hello world", "the cat sat on the mat", "a b c", "numbers 1 2 3 and words"]


@pytest.fixture(scope="module")
def model(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def hf(tiny_llama_hf):
    return tiny_llama_hf


def _matcher(tok, vocab_size: int, kind: str, value):
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=[tok.eos_token_id])
    comp = xgr.GrammarCompiler(info, max_threads=1)
    if kind == "json":
        g = comp.compile_json_schema(json.dumps(value), any_whitespace=False)
    elif kind == "regex":
        g = comp.compile_regex(value)
    elif kind == "choice":
        g = comp.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))
    elif kind == "structural_tag":  # xgrammar's own format: the tag as its JSON text
        g = comp.compile_structural_tag(json.dumps(value))
    else:
        g = comp.compile_grammar(value)
    return xgr.GrammarMatcher(g)


@torch.no_grad()
def reference(hf, prompt: str, max_tokens: int, constraint=None, end=None) -> list[int]:
    """transformers' greedy ids, each step's logits masked by this test's own matcher; with `end` (a
    reasoning model's `</think>`), free until the output ends with those tokens, masked after."""
    import xgrammar as xgr
    model, tok = hf
    V = model.config.vocab_size
    ids = tok(prompt)["input_ids"]
    matcher = _matcher(tok, V, *constraint) if constraint and not end else None
    bitmask = xgr.allocate_token_bitmask(1, V)
    out = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        if matcher is not None:
            matcher.fill_next_token_bitmask(bitmask)
            allowed = ((bitmask[0][:, None] >> torch.arange(32)) & 1).flatten()[:V].bool()
            logits = logits.masked_fill(~allowed, float("-inf"))
        t = int(logits.argmax())
        out.append(t)
        if t == tok.eos_token_id:
            break
        if matcher is not None:
            assert matcher.accept_token(t)
            if matcher.is_terminated():
                break
        elif constraint and out[-len(end):] == end:
            matcher = _matcher(tok, V, *constraint)
    return out


def _params(kind, value, **kw):
    from meshserve import SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    spec = {kind: value} | ({"disable_any_whitespace": True} if kind == "json" else {})
    return SamplingParams(max_tokens=kw.pop("max_tokens", 40), temperature=0, structured_outputs=StructuredOutputsParams(**spec), **kw)


CASES = [("regex", REGEX), ("choice", CHOICES), ("json", SCHEMA), ("grammar", GRAMMAR)]


def check_text(kind, value, text: str) -> None:
    """The constraint, by Python's own parsers (not the grammar library)."""
    if kind == "regex":
        assert re.fullmatch(value, text), text
    elif kind == "choice":
        assert text in value, text
    elif kind == "json":
        import jsonschema
        jsonschema.validate(json.loads(text), value)
    else:
        assert re.fullmatch(r"\((?:[a-c]|zz)(?:,(?:[a-c]|zz))*\)", text), text


def run_mixed(llm, prompts=PROMPTS):
    """Every constraint and a free request in one batch."""
    from meshserve import SamplingParams
    ps = [_params(k, v) for k, v in CASES] + [SamplingParams(max_tokens=12, temperature=0)]
    return llm.generate(prompts + prompts[:1], ps)


@pytest.fixture(scope="module")
def llm(model):
    from meshserve import LLM
    return LLM(model=model, max_batch_size=8, max_seq_len=512)


def test_greedy_ids_equal_transformers_masked_by_the_same_grammar_in_a_mixed_batch(llm, hf):
    outs = run_mixed(llm)
    for (kind, value), prompt, o in zip(CASES, PROMPTS, outs):
        seq = o.outputs[0]
        assert seq.token_ids == reference(hf, prompt, 40, (kind, value)), kind
        assert seq.finish_reason == "stop", (kind, seq.text)
        check_text(kind, value, seq.text)
    free = outs[-1].outputs[0]
    assert free.token_ids == reference(hf, PROMPTS[0], 12)  # no mask leaked onto a free row


def test_sampled_outputs_satisfy_the_constraint_and_n_sequences_each_have_their_own(llm):
    from meshserve import SamplingParams
    from meshserve.sampling_params import GuidedDecodingParams
    for kind, value in CASES:
        spec = GuidedDecodingParams(**{kind: value})
        outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=60, temperature=1.0, seed=7, n=3,
                                                        guided_decoding=spec))
        for o in outs:
            for seq in o.outputs:
                if seq.finish_reason == "stop":
                    check_text(kind, value, seq.text)
                else:  # cut by max_tokens: a prefix the grammar accepts (free JSON whitespace can run long)
                    assert kind == "json" and seq.finish_reason == "length"


def test_json_object_and_json_text_schema(llm):
    from meshserve import SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    outs = llm.generate(PROMPTS[:2], [
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(
            json_object=True, disable_any_whitespace=True)),
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(
            json=json.dumps(SCHEMA), disable_any_whitespace=True))])
    assert isinstance(json.loads(outs[0].outputs[0].text), dict)
    check_text("json", SCHEMA, outs[1].outputs[0].text)


TAG = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>", "content": {
    "type": "regex", "pattern": REGEX}}}  # (json_schema content allows free whitespace: a random model fills it)


def test_a_structural_tag_equals_transformers_masked_by_it(llm, hf):
    """xgrammar's structural tag format (vLLM's structured_outputs.structural_tag): a tag that is the whole
    answer, its content held to REGEX."""
    from meshserve import SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    for value in (TAG, json.dumps(TAG)):
        out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=80, temperature=0, structured_outputs=
                                                      StructuredOutputsParams(structural_tag=value))).outputs[0]
        assert out.token_ids == reference(hf, PROMPTS[1], 80, ("structural_tag", TAG))
        assert out.finish_reason == "stop" and out.text.startswith("<f>") and out.text.endswith("</f>"), repr(out.text)
        check_text("regex", REGEX, out.text[3:-4])


def test_the_legacy_structural_tag_holds_only_the_triggered_parts(llm, hf):
    """vLLM's {"structures": [{"begin", "schema", "end"}], "triggers"}: text is free until a trigger, then
    the structure's schema holds until its end. Checked on token sequences of known texts."""
    from meshserve.engine.structured_output import StructuredOutputs
    from meshserve.sampling_params import StructuredOutputsParams
    _, tok = hf
    tag = {"structures": [{"begin": "<f=get>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f="]}
    so = StructuredOutputs(hf[0].config.vocab_size, [tok.eos_token_id])
    so.tokenizer = tok

    def accepts(text):
        state = so.state(StructuredOutputsParams(structural_tag=tag), [tok.eos_token_id])
        return all(state.accept(t) for t in tok(text, add_special_tokens=False)["input_ids"])
    assert accepts('any words <f=get>{"ok": true, "pick": "yy", "n": 5}</f> more words')
    assert not accepts('any words <f=get>{"ok": 1}')  # the schema holds after the trigger
    assert not accepts('<f=put>{"ok": true}')  # after the trigger only a structure's begin


def test_chunked_prefill_and_preemption_keep_the_grammar(model, hf):
    """Prompts prefilled in 8-token chunks, and a KV pool so small that requests are preempted and
    recomputed: every grammar still holds, and greedy ids equal the reference."""
    from meshserve import LLM
    llm = LLM(model=model, max_batch_size=4, max_seq_len=128, max_num_tokens=8,
              kv_cache_config={"max_tokens": 160, "tokens_per_block": 8})
    long = [p + " and more words here" * 3 for p in PROMPTS]
    try:
        outs = run_mixed(llm, long)
        preemptions = llm.get_stats()["num_preemptions"]
    finally:
        llm.shutdown()
    for (kind, value), prompt, o in zip(CASES, long, outs):
        assert o.outputs[0].token_ids == reference(hf, prompt, 40, (kind, value)), kind
        check_text(kind, value, o.outputs[0].text)
    assert preemptions > 0


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_two_ranks_equal_the_reference(model, hf, layout):
    """The mask travels to the rank that samples: tp rank 0, or the last pipeline stage."""
    from meshserve import LLM
    llm = LLM(model=model, max_batch_size=8, max_seq_len=512, **layout)
    try:
        outs = run_mixed(llm)
    finally:
        llm.shutdown()
    for (kind, value), prompt, o in zip(CASES, PROMPTS, outs):
        assert o.outputs[0].token_ids == reference(hf, prompt, 40, (kind, value)), kind


@pytest.mark.parametrize("spec,words", [
    ({"regex": "([0-9"}, "structured_outputs.regex='([0-9' is invalid: Regex parsing error"),
    ({"json": "{bad"}, "structured_outputs.json='{bad' is invalid: Failed to parse JSON"),
    ({"grammar": "root ::= foo"}, "Rule \"foo\" is not defined"),
])
def test_a_grammar_that_does_not_parse_is_a_value_error_naming_it(llm, spec, words):
    from meshserve import SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    good = SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    with pytest.raises(ValueError) as exc:  # one bad request of three: none of them runs
        llm.generate(["hi"] * 3, [good, SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), good])
    assert words in str(exc.value) and "\n" not in str(exc.value)
    assert not llm._core.has_unfinished()
    assert llm.generate(["hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids  # the engine goes on


@pytest.mark.parametrize("kw,words", [
    ({}, "sets nothing: expected exactly one of json, regex, choice, grammar, json_object"),
    ({"regex": "a", "choice": ["a"]}, "sets regex, choice"),
    ({"choice": []}, "structured_outputs.choice=[] is invalid"),
    ({"json": 5}, "structured_outputs.json=5 is invalid"),
])
def test_structured_outputs_params_are_checked_on_construction(kw, words):
    from meshserve.sampling_params import StructuredOutputsParams
    with pytest.raises(ValueError, match=re.escape(words)):
        StructuredOutputsParams(**kw)


def test_the_two_names_of_the_setting_cannot_both_be_given():
    from meshserve import SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    s = StructuredOutputsParams(regex="a")
    with pytest.raises(TypeError, match="both guided_decoding and structured_outputs"):
        SamplingParams(guided_decoding=s, structured_outputs=s)
    assert SamplingParams(guided_decoding={"regex": "a"}).structured_outputs == s  # a dict of its fields
    with pytest.raises(ValueError, match="unknown field 'regexp'"):
        SamplingParams(structured_outputs={"regexp": "a"})


def test_without_a_tokenizer_structured_outputs_are_refused(model):
    from meshserve import LLM
    llm = LLM(model=model, skip_tokenizer_init=True, max_batch_size=2, max_seq_len=256)
    try:
        with pytest.raises(ValueError, match="needs the model's tokenizer"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], _params("regex", "[a-z]"))
        assert llm.generate([{"prompt_token_ids": [5, 6, 7]}], _params("regex", "[a-z]").clone(
            structured_outputs=None, max_tokens=2))[0].outputs[0].token_ids
    finally:
        llm.shutdown()


def test_grammar_banned_unpacks_every_bit_as_numpy_does():
    """The device-side unpacking against numpy's own little-endian unpackbits, sign bits included."""
    import numpy as np

    from meshserve.engine.messages import ScheduledRequest
    from meshserve.worker.input_batch import grammar_banned
    rng = np.random.default_rng(0)
    V = 100  # 4 words, the last one partly past the vocabulary
    masks = [rng.integers(0, 256, 16, dtype=np.uint8).tobytes(), None, np.full(16, 255, np.uint8).tobytes()]
    reqs = [ScheduledRequest(f"r{i}", 0, 1, grammar_mask=m) for i, m in enumerate(masks)]
    got = grammar_banned(reqs, V, torch.device("cpu"))
    want = torch.from_numpy(np.unpackbits(np.frombuffer(masks[0], np.uint8), bitorder="little")[:V] == 0)
    assert torch.equal(got[0], want) and not got[1].any() and not got[2].any()
    short = grammar_banned([ScheduledRequest("s", 0, 1, grammar_mask=b"\xff" * 8)], V, torch.device("cpu"))
    assert not short[0, :64].any() and short[0, 64:].all()  # ids past a short mask are banned


def test_a_reasoning_models_grammar_holds_after_its_thinking_ends(llm, hf):
    """reasoning_end_token_ids (the server's --reasoning_parser sets `</think>`'s): free decoding until
    the output ends with them, the grammar after; in the prompt already, the grammar from the start."""
    from meshserve import SamplingParams
    from meshserve.sampling_params import StructuredOutputsParams
    prompt = PROMPTS[1]
    free = reference(hf, prompt, 24)
    # "the end of the thinking": a pair the free run writes, first at k >= 2
    k = next(k for k in range(2, 22) if all(free[i:i + 2] != free[k:k + 2] for i in range(k)))
    end = free[k:k + 2]
    spec = StructuredOutputsParams(regex=REGEX, reasoning_end_token_ids=end)
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, structured_outputs=spec))[0].outputs[0]
    want = reference(hf, prompt, 40, ("regex", REGEX), end)
    assert out.token_ids == want and want[:k + 2] == free[:k + 2]
    assert re.fullmatch(REGEX, hf[1].decode(out.token_ids[k + 2:], skip_special_tokens=True))
    _, tok = hf
    ids = tok(prompt)["input_ids"] + end  # the prompt holds the end: constrained from the first token
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=40, temperature=0,
                                                                   structured_outputs=spec))[0].outputs[0]
    assert re.fullmatch(REGEX, out.text) and out.finish_reason == "stop"

"""A resumed request (`resume_output_token_ids`: the orchestrator's failover hands the output so
far to another server) goes on exactly as the uninterrupted run: the engine counts the given
tokens as outputs, not prompt (engine/request.py). For each of presence / frequency / repetition
penalty, min_tokens with stop ids, a stop string straddling the cut, max_tokens, and seeded
sampling (with penalties and top-p): the first k tokens given back, the rest generated equals the
uninterrupted run's rest, and the text is the whole output's, for several k."""
import asyncio

import pytest

from helpers import build_checkpoint
from meshserve import LLM, SamplingParams

PROMPT = "The capital of France"
N = 24
CUTS = (1, 5, 12, N - 1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    build_checkpoint(path, "llama")
    with LLM(path, kv_cache_config={"tokens_per_block": 4, "max_tokens": 2048}, max_seq_len=128,
             show_progress=False) as llm:
        yield llm


def run(llm, params, resume=None, prompt=PROMPT):
    ids = llm.tokenizer.encode(prompt)
    p = {"prompt_token_ids": ids, "resume_output_token_ids": resume} if resume is not None else ids
    return llm.generate(p, params, use_tqdm=False).outputs[0]


def assert_resumes(llm, params, cuts=CUTS):
    """Every cut: given the first k tokens, the rest (ids, text, finish) is the uninterrupted run's."""
    full = run(llm, params)
    for k in cuts:
        if k >= len(full.token_ids):
            continue
        out = run(llm, params, full.token_ids[:k])
        assert full.token_ids[:k] + out.token_ids == full.token_ids, k
        assert (out.text, out.finish_reason, out.stop_reason) == (full.text, full.finish_reason, full.stop_reason), k
    return full


def as_prompt_differs(llm, params, full) -> bool:
    """Whether giving the tokens back as prompt (the old failover) would have changed the output."""
    pids = llm.tokenizer.encode(PROMPT)
    for k in CUTS:
        rest = llm.generate(pids + full.token_ids[:k], params.clone(max_tokens=params.max_tokens - k),
                            use_tqdm=False).outputs[0].token_ids
        if full.token_ids[:k] + rest != full.token_ids:
            return True
    return False


@pytest.mark.parametrize("name,value,off", [("presence_penalty", 1.5, 0.0), ("frequency_penalty", 1.5, 0.0),
                                            ("repetition_penalty", 1.8, 1.0)])
def test_penalties_count_the_resumed_tokens_as_outputs(llm, name, value, off):
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, **{name: value})
    full = assert_resumes(llm, params)
    assert full.token_ids != run(llm, params.clone(**{name: off})).token_ids  # the penalty matters here
    if name != "repetition_penalty":  # repetition counts prompt and output alike: as prompt was right
        assert as_prompt_differs(llm, params, full)


def test_seeded_sampling_draws_as_the_uninterrupted_run(llm):
    params = SamplingParams(max_tokens=N, temperature=1.0, seed=3, ignore_eos=True)
    full = assert_resumes(llm, params)
    assert as_prompt_differs(llm, params, full)  # the per-step seed counts outputs
    mixed = SamplingParams(max_tokens=N, temperature=0.9, seed=11, top_p=0.9, top_k=40, presence_penalty=0.7,
                           frequency_penalty=0.5, repetition_penalty=1.3, ignore_eos=True)
    assert_resumes(llm, mixed, cuts=(1, 2, 7, 16, N - 1))


def test_max_tokens_counts_from_the_original_start(llm):
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    full = assert_resumes(llm, params)
    out = run(llm, params, full.token_ids[:10])
    assert len(out.token_ids) == N - 10 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="nothing is left to generate"):
        run(llm, params, full.token_ids)  # N given back: max_tokens is spent
    with pytest.raises(ValueError, match="exactly one sequence"):
        run(llm, params.clone(n=2), full.token_ids[:3])


def test_min_tokens_and_stop_ids_count_from_the_original_start(llm):
    base = run(llm, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)).token_ids
    stop_id = base[2]
    # stop_id is banned until 9 outputs exist, then ends the request when sampled
    params = SamplingParams(max_tokens=N, temperature=0, stop_token_ids=[stop_id], min_tokens=9)
    full = assert_resumes(llm, params, cuts=(1, 3, 8, 9, 10, 15))
    assert stop_id not in full.token_ids[:8]
    # end_id acts as EOS: the same under min_tokens
    params = SamplingParams(max_tokens=N, temperature=0, end_id=stop_id, min_tokens=9)
    assert_resumes(llm, params, cuts=(1, 3, 8, 9, 10))


def _stop_straddling(llm, text: str, ids: list[int]):
    """(k, stop, where): a 4-character stop string whose first occurrence starts before the text of
    ids[:k] ends and ends after it."""
    for k in range(2, len(ids)):
        head = llm.tokenizer.decode(ids[:k])
        if not text.startswith(head) or len(head) < 4:
            continue
        a = len(head) - 2
        stop = text[a:a + 4]
        if len(stop) == 4 and text.index(stop) == a:
            return k, stop, a
    pytest.fail("no stop string straddling a token boundary in the output")


def test_a_stop_string_straddling_the_resume_point_is_caught(llm):
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    base = run(llm, greedy)
    k, stop, a = _stop_straddling(llm, base.text, base.token_ids)
    for include in (False, True):
        params = greedy.clone(stop=[stop], include_stop_str_in_output=include)
        full = run(llm, params)
        assert full.text == base.text[:a + (4 if include else 0)] and full.stop_reason == stop
        for cut in (1, k - 1, k):  # the stop string after the cut, (maybe) just after, straddling it
            out = run(llm, params, base.token_ids[:cut])
            assert (out.text, out.finish_reason, out.stop_reason) == (full.text, "stop", stop), (cut, include)
            assert full.token_ids[:cut] + out.token_ids == full.token_ids, (cut, include)


def test_a_stop_string_under_min_tokens_counts_the_resumed_tokens(llm):
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    base = run(llm, greedy)
    # a stop string first complete with the m-th token, m > 4; min_tokens = m lets it end the request
    # there (the front checks stop strings only once min_tokens outputs exist)
    for a in range(len(base.text) // 2, len(base.text) - 3):
        stop = base.text[a:a + 3]
        m = next(j for j in range(1, N + 1) if stop in llm.tokenizer.decode(base.token_ids[:j]))
        if base.text.index(stop) == a and m > 4:
            break
    else:
        pytest.fail("no stop string late enough in the output")
    params = greedy.clone(stop=[stop], min_tokens=m)
    full = run(llm, params)
    assert full.text == base.text[:a] and full.stop_reason == stop
    for cut in (m - 3, m - 1):  # counting only the new tokens, the stop string would be missed
        out = run(llm, params, base.token_ids[:cut])
        assert (out.text, out.stop_reason) == (full.text, stop), cut


def test_a_resumed_stream_joins_to_the_whole_text(llm):
    params = SamplingParams(max_tokens=N, temperature=1.0, seed=5, presence_penalty=1.0, ignore_eos=True)
    full = run(llm, params)
    pids = llm.tokenizer.encode(PROMPT)

    async def stream():
        texts, ids = [], []
        req = llm.generate_async({"prompt_token_ids": pids, "resume_output_token_ids": full.token_ids[:9]}, params)
        async for out in req:
            texts.append(out.outputs[0].text)
            ids = out.outputs[0].token_ids
        return texts, ids

    texts, ids = asyncio.run(stream())
    assert texts[-1] == full.text and full.token_ids[:9] + ids == full.token_ids

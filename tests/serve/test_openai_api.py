"""The server through the official `openai` client (sync and async): chat and completions,
streaming equals non-streaming, usage, n + seed, logprobs, stop strings, 32 concurrent streams."""
from __future__ import annotations

import asyncio
import math
import re

import openai
import pytest

from serve_util import start_server

MODEL = "tiny-chat"
MAX_SEQ_LEN = 512
MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", str(MAX_SEQ_LEN), "--max-batch-size", "64", "--max_beam_width", "3",
                       "--allowed-origins", '["https://app.example"]')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient(server):
    """A factory: an AsyncOpenAI client belongs to the event loop it is used in."""
    return lambda: openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0,
                                      timeout=60)


def chat_prompt_len(tok, messages) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


def test_models_lists_the_folder_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("n", [1, 3])
def test_chat_stream_joined_equals_non_stream(client, tiny_tokenizer, n):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, n=n)
    full = client.chat.completions.create(**kw)
    texts, finishes = [""] * n, [[] for _ in range(n)]
    usage = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    for i in range(n):
        assert texts[i] == full.choices[i].message.content
        assert finishes[i] == [full.choices[i].finish_reason]  # exactly once
    prompt_len = chat_prompt_len(tiny_tokenizer, MESSAGES)
    for u in (full.usage, usage):
        assert u.prompt_tokens == prompt_len
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_joined_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0)
    full = client.completions.create(**kw)
    text, finishes = "", []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.finish_reason is not None:
                finishes.append(c.finish_reason)
    assert text == full.choices[0].text
    assert finishes == [full.choices[0].finish_reason]


def test_usage_adds_up_over_prompts_and_samples(client, tiny_tokenizer):
    prompts = ["Paris is the capital", "Numbers: 0 1 2"]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.prompt_tokens == sum(len(tiny_tokenizer.encode(p)) for p in prompts)
    assert out.usage.completion_tokens == 4 * 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 28


def test_token_id_prompt(client, tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hello world")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_n_with_seed_is_reproducible(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    a = [c.message.content for c in client.chat.completions.create(**kw).choices]
    b = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert a == b
    assert len(set(a)) > 1  # sample i uses seed + i: the samples differ from each other
    c = [c.message.content for c in client.chat.completions.create(**{**kw, "seed": 99}).choices]
    assert c != a


def test_max_completion_tokens_and_default_max_tokens(client, tiny_tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    # chat without max_tokens: up to the context limit
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == MAX_SEQ_LEN - chat_prompt_len(tiny_tokenizer, MESSAGES)
    # completions default to 16 tokens, as OpenAI
    out = client.completions.create(model=MODEL, prompt="Hello", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16


def _ascii_window(text: str, start: int) -> str | None:
    m = re.search(r"[A-Za-z0-9 ,.!?]{3}", text[start:])
    return m.group(0) if m else None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_text_streamed_and_not(client, include):
    kw = dict(model=MODEL, prompt="Hello world! How are", max_tokens=60, temperature=0,
              extra_body={"ignore_eos": True})
    reference = client.completions.create(**kw).choices[0].text
    stop = _ascii_window(reference, 8)
    if stop is None:
        pytest.skip("the random model produced no plain-text window to stop on")
    i = reference.find(stop)
    expected = reference[: i + len(stop)] if include else reference[:i]
    kw["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": include}
    out = client.completions.create(stop=[stop], **kw)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw)
                       if c.choices)
    assert streamed == expected


def test_chat_logprobs_are_sorted_and_greedy_picks_the_top(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-5)
        assert all(t <= 0 for t in tops)


def test_completion_echo_with_logprobs(client, tiny_tokenizer):
    prompt = "Hello world"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                    logprobs=2)
    choice = out.choices[0]
    num_prompt = len(tiny_tokenizer.encode(prompt))
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == num_prompt + 4
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_completion_prompt_logprobs_match_transformers(client, tiny_model, tiny_tokenizer):
    """vLLM's `prompt_logprobs`: per prompt token None (the first), else its own logprob and the k
    likeliest, against transformers' float64 log-softmax of the same prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt, k = "Hello world! How are you today?", 2
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": k})
    plp = out.choices[0].model_extra["prompt_logprobs"]
    ids = tiny_tokenizer.encode(prompt)
    assert len(plp) == len(ids) == out.usage.prompt_tokens and plp[0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float64)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    for i in range(1, len(ids)):
        row, entry = ref[i - 1], plp[i]
        top = torch.topk(row, k)
        want = {ids[i]: row[ids[i]].item(), **{t: v for t, v in zip(top.indices.tolist(), top.values.tolist())}}
        assert {int(t) for t in entry} == set(want), i
        for t, e in entry.items():
            assert e["logprob"] == pytest.approx(want[int(t)], abs=1e-4)
            assert e["decoded_token"] == tiny_tokenizer.decode([int(t)])
            # its place in the vocabulary (vLLM's), the prompt token's wherever it falls: within float32's
            # reach of float64's (near-ties may swap)
            v = row[int(t)].item()
            assert (row > v + 1e-4).sum().item() + 1 <= e["rank"] <= (row > v - 1e-4).sum().item() + 1, (i, t)
    no_plp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert "prompt_logprobs" not in (no_plp.choices[0].model_extra or {})


def test_chat_prompt_logprobs_match_transformers_and_stream_refuses_them(client, tiny_model, tiny_tokenizer):
    """vLLM's chat `prompt_logprobs`: the answer's top-level list, one entry per prompt token of the
    rendered conversation, against transformers; with stream (as vLLM) a 400 naming the field."""
    import torch
    from transformers import AutoModelForCausalLM

    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,
                                         extra_body={"prompt_logprobs": 1})
    plp = out.model_extra["prompt_logprobs"]
    text = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(plp) == len(ids) == out.usage.prompt_tokens and plp[0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float64)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    for i in range(1, len(ids)):
        assert plp[i][str(ids[i])]["logprob"] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, stream=True,
                                       extra_body={"prompt_logprobs": 1})
    assert "prompt_logprobs" in str(e.value) and "non-streaming" in str(e.value)
    assert "prompt_logprobs" not in (client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
                                     .model_extra or {})


def test_sampling_extensions(client, tiny_tokenizer):
    forced = tiny_tokenizer.encode(" world")[-1]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                    logit_bias={str(forced): 100}, logprobs=0)
    assert out.choices[0].logprobs.tokens == [tiny_tokenizer.decode([forced])] * 5
    # min_tokens masks the stop token until 3 tokens exist; then it is sampled and stops the sequence
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, temperature=0,
                                    logit_bias={str(forced): 100},
                                    extra_body={"min_tokens": 3, "stop_token_ids": [forced]})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 4
    assert out.choices[0].model_extra["stop_reason"] == forced
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.3, seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "skip_special_tokens": False,
                    "ignore_eos": True})
    assert out.usage.completion_tokens == 8


async def _one_stream(aclient, i: int) -> tuple[str, list]:
    finishes, text = [], ""
    if i % 2:
        stream = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12 + i,
                                                       stream=True, temperature=0.5, seed=i,
                                                       extra_body={"ignore_eos": True})
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.finish_reason:
                    finishes.append(c.finish_reason)
    else:
        stream = await aclient.completions.create(model=MODEL, prompt=f"Numbers: {i}", max_tokens=12 + i,
                                                  stream=True, temperature=0, extra_body={"ignore_eos": True})
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                if c.finish_reason:
                    finishes.append(c.finish_reason)
    return text, finishes


def test_32_concurrent_streams_all_complete(aclient):
    async def main():
        async with aclient() as ac:
            return await asyncio.gather(*[_one_stream(ac, i) for i in range(32)])

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(finishes == ["length"] for _, finishes in results)


def test_async_client_matches_sync(client, aclient):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)

    async def main():
        async with aclient() as ac:
            a = await ac.chat.completions.create(**kw)
            s = await ac.chat.completions.create(stream=True, **kw)
            return a.choices[0].message.content, "".join([c.choices[0].delta.content or "" async for c in s
                                                          if c.choices])

    non_stream, stream = asyncio.run(main())
    assert non_stream == stream == client.chat.completions.create(**kw).choices[0].message.content


def test_use_beam_search_answers_the_llm_apis_beams(client, tiny_model):
    """vLLM's use_beam_search (n beams, length_penalty) on both endpoints: the choices are the LLM API's
    beams, best first (tests/engine/test_beam_search.py checks those against transformers)."""
    from meshserve import LLM
    from meshserve.beam_search import BeamSearchParams
    prompt = [5, 9, 31, 7, 100]
    with LLM(tiny_model, max_seq_len=MAX_SEQ_LEN, show_progress=False) as llm:
        want = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=3, max_tokens=6,
                                                                                 ignore_eos=True))[0]
        chat_text = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        chat_ids = llm.tokenizer.encode(chat_text, add_special_tokens=False)
        want_chat = llm.beam_search([{"prompt_token_ids": list(chat_ids)}],
                                    BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=6,
                                  extra_body={"use_beam_search": True, "ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.token_ids for c in r.choices] == [s.output_token_ids for s in want.sequences]
    assert [c.text for c in r.choices] == [s.text for s in want.sequences]
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == 5
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5,
                                       extra_body={"use_beam_search": True, "ignore_eos": True})
    assert [ch.message.content for ch in c.choices] == [s.text for s in want_chat.sequences]
    assert all(ch.finish_reason == "length" for ch in c.choices)


@pytest.mark.parametrize("extra,param", [({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"),
                                         ({"echo": True}, "echo"), ({"guided_regex": "a+"}, "guided_regex"),
                                         ({"n": 0}, "n"), ({"length_penalty": "x"}, "length_penalty")])
def test_what_beam_search_cannot_take_is_a_400_naming_it(client, extra, param):
    import httpx
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "use_beam_search": True, "n": 2} | extra
    r = httpx.post(str(client.base_url) + "completions", json=body, headers={"Authorization": f"Bearer {client.api_key}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"], err


def test_max_beam_width_caps_a_requests_beams(client):
    """TensorRT-LLM's max_beam_width (serve --max_beam_width 3 here): n up to it with use_beam_search, more is
    a 400 naming n; without beam search, n is max_n's."""
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=3, extra_body={"use_beam_search": True})
    assert len(ok.choices) == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=4, extra_body={"use_beam_search": True})
    err = e.value.response.json()["error"]
    assert err["param"] == "n" and "--max_beam_width 3" in err["message"], err
    assert len(client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=4).choices) == 4


def test_cors_answers_the_allowed_origin_only(server):
    """serve --allowed-origins '["https://app.example"]': a browser's preflight from it is answered (before the
    API key is asked for) and answers carry its origin; another origin's preflight is refused and its
    answers carry none (a browser then withholds them from the page)."""
    import httpx
    url = server.base_url + "/v1/chat/completions"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url, headers={"Origin": "https://app.example", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example", r.headers
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.options(url, headers={"Origin": "https://evil.example", **pre})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    r = httpx.post(url, json=body, headers={"Origin": "https://app.example", **server.headers}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(url, json=body, headers={"Origin": "https://app.example"}, timeout=60)  # no key: its 401 too
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(url, json=body, headers={"Origin": "https://evil.example", **server.headers}, timeout=60)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

"""`--stream-interval N` (vLLM's and TensorRT-LLM's stream_interval): a stream's first token is
sent at once, then text every N tokens, the rest with the end; the joined text equals the
non-streamed answer."""
import openai
import pytest

from serve_util import start_server

INTERVAL = 4


@pytest.fixture(scope="module")
def client(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", "512", "--stream-interval", str(INTERVAL))
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


def _stream_tokens(client, **kw):
    sizes, text, finish = [], "", None
    for chunk in client.completions.create(stream=True, logprobs=0, **kw):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.tokens:
                sizes.append(len(c.logprobs.tokens))
            text += c.text
            finish = c.finish_reason or finish
    return sizes, text, finish


def test_first_token_at_once_then_every_interval_and_the_same_text(client):
    kw = dict(model="tiny-chat", prompt="The quick brown fox", max_tokens=23, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    sizes, text, finish = _stream_tokens(client, **kw)
    # The reader is woken at the first token, then each time INTERVAL more have come, then at the
    # end; a chunk carries the tokens whose text is complete (the random model emits partial UTF-8
    # characters that the detokenizer holds back) and whatever came before the reader ran (the
    # first wake can precede the start of the HTTP response), so sizes are not exactly 1, 4, 4, ...
    # The first-token-at-once order itself: tests/engine/test_llm_api.py (1, 6, 11, 12).
    assert sum(sizes) == 23 and len(sizes) >= 2, sizes
    assert len(sizes) <= 2 + -(-22 // INTERVAL), sizes  # 23 events with stream_interval 1
    assert text == full.choices[0].text and finish == full.choices[0].finish_reason == "length"


def test_a_stop_string_still_cuts_the_text(client):
    full = client.completions.create(model="tiny-chat", prompt="Numbers: 0 1 2", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})
    t = full.choices[0].text
    assert len(t) > 8
    stop = t[len(t) // 2:len(t) // 2 + 2]  # cuts the text somewhere past its first tokens
    want = client.completions.create(model="tiny-chat", prompt="Numbers: 0 1 2", max_tokens=30, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})
    sizes, text, finish = _stream_tokens(client, model="tiny-chat", prompt="Numbers: 0 1 2", max_tokens=30,
                                         temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert text == want.choices[0].text and stop not in text and finish == "stop"
    assert len(text) < len(t) and sum(sizes) > 1


def test_a_bad_interval_is_refused_naming_it():
    from meshserve.config import build_llm_args
    with pytest.raises(Exception, match="stream_interval"):
        build_llm_args("test", model="x", stream_interval=0)

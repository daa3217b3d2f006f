"""vLLM's --enable_prompt_tokens_details: usage.prompt_tokens_details.cached_tokens is the prompt tokens
whose KV the prefix cache held: none the first time a prompt is seen, whole blocks of it the second
time (streamed or not), and the field is absent without the flag (test_structured_outputs_http.py)."""
from __future__ import annotations

import openai
import pytest

from serve_util import start_server

BLOCK = 16


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("usage") / "extra.yml"
    cfg.write_text(f"kv_cache_config:\n  tokens_per_block: {BLOCK}\n")
    srv = start_server(tiny_model, "--max_seq_len", "512", "--config", str(cfg), "--enable_prompt_tokens_details")
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


def test_cached_tokens_are_whole_blocks_of_a_repeated_prompt(client):
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    first = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=2).usage
    assert first.prompt_tokens_details.cached_tokens == 0 and first.prompt_tokens > 3 * BLOCK
    again = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=2).usage
    cached = again.prompt_tokens_details.cached_tokens
    assert cached % BLOCK == 0 and (first.prompt_tokens - 1) // BLOCK * BLOCK <= cached < first.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny-chat", max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": prompt}]))
    messages = [{"role": "user", "content": prompt}]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0  # a new prompt (the chat template's)
    chat = client.chat.completions.create(model="tiny-chat", max_tokens=2, messages=messages).usage
    assert chat.prompt_tokens_details.cached_tokens >= (chat.prompt_tokens - 1) // BLOCK * BLOCK > 0


def test_reset_prefix_cache_over_http(client):
    """vLLM's POST /reset_prefix_cache: a repeated prompt finds nothing cached after it; while a stream
    holds KV blocks it is a 409 and the cache stays; like every route but /health, it needs the key."""
    import httpx

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    auth = {"Authorization": f"Bearer {client.api_key}"}
    prompt = "pack my box with five dozen liquor jugs " * 6

    def cached() -> int:
        return client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=2).usage \
            .prompt_tokens_details.cached_tokens

    assert cached() == 0 and cached() > 0
    assert httpx.post(base + "/reset_prefix_cache", timeout=30).status_code == 401
    r = httpx.post(base + "/reset_prefix_cache", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json() == {"success": True}, r.text
    assert cached() == 0 and cached() > 0
    stream = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=480, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # its first token: 479 more to go, its blocks held
    r = httpx.post(base + "/reset_prefix_cache", headers=auth, timeout=30)
    stream.close()
    assert r.status_code == 409 and "requests hold KV blocks" in r.json()["error"]["message"], r.text
    assert cached() > 0  # nothing changed

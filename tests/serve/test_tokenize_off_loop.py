"""Long prompts are tokenized (and chat templates rendered) off the API server's event loop, so one
long prompt does not hold back every other stream's chunks; short ones stay inline. The encoder
here cannot finish until the event loop has run something else: on the loop it would wait in vain."""
import asyncio
import threading

import pytest

from meshserve.serve.openai_server import OpenAIServing, ServerConfig
from meshserve.serve.server_config import TOKENIZE_OFFLOAD_CHARS
from meshserve.serve.protocol import APIError, ChatCompletionRequest


class GatedEncoder:
    """Wraps the server's encoder; each encode waits (up to 10 s) for `release`, and records
    whether it was released and on which thread it ran."""

    def __init__(self, inner, gated: bool = True):
        self.inner, self.gated = inner, gated
        self.release = threading.Event()
        self.calls: list[tuple[bool, str]] = []

    def encode(self, text, add_special_tokens=True):
        released = self.release.wait(10) if self.gated else True
        self.calls.append((released, threading.current_thread().name))
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


@pytest.fixture
def serving(tiny_tokenizer):
    s = OpenAIServing(None, tiny_tokenizer, None, ServerConfig("tiny-chat", "unused"))
    yield s
    s._tokenize_pool.shutdown()


def long_text(n_chars: int) -> str:
    words = "the quick brown fox jumps over a lazy dog while it rains in spain".split()
    out, size, i = [], 0, 0
    while size < n_chars:
        out.append(words[i % len(words)] + str(i % 7))
        size += len(out[-1]) + 1
        i += 1
    return " ".join(out)


async def run_while_gated(gate: GatedEncoder, coro):
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)  # the task starts; inline, it would block the loop right here
    gate.release.set()  # reached only if the loop is free while the prompt is being encoded
    return await asyncio.wait_for(task, 20)


def test_a_long_completion_prompt_is_encoded_while_the_loop_runs(serving, tiny_tokenizer):
    text = long_text(TOKENIZE_OFFLOAD_CHARS + 500)
    gate = serving.encoder = GatedEncoder(serving.encoder)
    [(got_text, ids)] = asyncio.run(run_while_gated(gate, serving.completion_prompts(text)))
    assert gate.calls and gate.calls[0][0], "the encode ran on the event loop (it was never released)"
    assert got_text == text and ids == tiny_tokenizer.encode(text)


def test_many_short_prompts_adding_up_are_encoded_off_the_loop_in_order(serving, tiny_tokenizer):
    n = TOKENIZE_OFFLOAD_CHARS // 300 + 2
    texts = [long_text(300) + f" number {i}" for i in range(n)]
    batch = texts[:2] + [[5, 6, 7]] + texts[2:]  # token ids pass through in their place
    gate = serving.encoder = GatedEncoder(serving.encoder)
    got = asyncio.run(run_while_gated(gate, serving.completion_prompts(batch)))
    assert len(gate.calls) == n and all(released for released, _ in gate.calls), "encoded on the event loop"
    want = [(t, tiny_tokenizer.encode(t)) for t in texts[:2]] + [(None, [5, 6, 7])] + \
        [(t, tiny_tokenizer.encode(t)) for t in texts[2:]]
    assert got == want


def test_a_long_chat_is_rendered_and_encoded_while_the_loop_runs(serving, tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text(TOKENIZE_OFFLOAD_CHARS)}]
    req = ChatCompletionRequest.model_validate({"messages": msgs})
    gate = serving.encoder = GatedEncoder(serving.encoder)
    text, ids = asyncio.run(run_while_gated(gate, serving.chat_prompt(req)))
    assert gate.calls and gate.calls[0][0], "the chat prompt was encoded on the event loop"
    want = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == want and ids == tiny_tokenizer.encode(want, add_special_tokens=False)


def test_short_prompts_stay_on_the_loop_thread(serving, tiny_tokenizer):
    rec = serving.encoder = GatedEncoder(serving.encoder, gated=False)
    [(_, ids)] = asyncio.run(serving.completion_prompts("Hello there"))
    assert ids == tiny_tokenizer.encode("Hello there")
    assert rec.calls == [(True, threading.main_thread().name)]


def test_a_template_error_on_the_worker_thread_is_a_400_naming_messages(serving):
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": long_text(TOKENIZE_OFFLOAD_CHARS)}],
        "chat_template": "{{ raise_exception('no users here') }}"})
    with pytest.raises(APIError) as e:
        asyncio.run(serving.chat_prompt(req))
    assert e.value.status == 400 and e.value.param == "messages" and "no users here" in e.value.message


def test_the_threshold_is_the_servers_setting(tiny_tokenizer):
    """serve --tokenize_offload_chars: with 100, a 300-character prompt (inline by default) is
    encoded off the loop."""
    s = OpenAIServing(None, tiny_tokenizer, None, ServerConfig("tiny-chat", "unused", tokenize_offload_chars=100))
    try:
        text = long_text(300)
        gate = s.encoder = GatedEncoder(s.encoder)
        [(_, ids)] = asyncio.run(run_while_gated(gate, s.completion_prompts(text)))
        assert gate.calls and gate.calls[0][0], "encoded on the event loop despite the lower threshold"
        assert ids == tiny_tokenizer.encode(text)
    finally:
        s._tokenize_pool.shutdown()


def test_a_negative_threshold_is_a_one_line_cli_error():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "meshserve", "serve", "--tokenize-offload-chars", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "meshserve serve: error: --tokenize_offload_chars -1: must be an integer >= 0 (0: every prompt off the "
        "event loop)"]

"""A chat stream's first SSE chunk (the one with role "assistant") is sent when the engine has
produced the first output, as vLLM does, not when the request is submitted: clients (`vllm bench
serve` among them) time TTFT to the first chunk. The engine here is a stand-in whose first output
waits for the test to release it, so the check does not depend on timing."""
import asyncio
import json
from types import SimpleNamespace

import pytest

from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.sampling_params import SamplingParams
from meshserve.serve import responses
from meshserve.serve.openai_server import OpenAIServing, ServerConfig
from meshserve.serve.protocol import ChatCompletionRequest


class HeldStream:
    """A RequestStream stand-in: its deltas wait for `release`, then come out in order."""

    def __init__(self, params: SamplingParams, deltas: list[RequestOutput]):
        self.state = SimpleNamespace(params=params, prompt_token_ids=[1, 2, 3])
        self.release = asyncio.Event()
        self._deltas = deltas
        self.aborted = False

    async def deltas(self):
        await self.release.wait()
        for out in self._deltas:
            yield out

    def abort(self) -> None:
        self.aborted = True


def delta(texts: list[str], finished: bool = False) -> RequestOutput:
    outs = [CompletionOutput(i, text, [7] if text else [], "length" if finished else None)
            for i, text in enumerate(texts)]
    return RequestOutput("r", None, [1, 2, 3], outs, finished)


def events(chunks: list[bytes]) -> list:
    out = []
    for c in chunks:
        assert c.startswith(b"data: ") and c.endswith(b"\n\n"), c
        data = c[6:-2]
        out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_the_role_chunk_waits_for_the_first_output_and_comes_before_its_text(tiny_tokenizer, n):
    serving = OpenAIServing(None, tiny_tokenizer, None, ServerConfig("tiny-chat", "unused"))
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], stream=True, n=n)
    stream = HeldStream(SamplingParams(n=n, max_tokens=2), [delta(["He"] * n), delta(["y"] * n, finished=True)])
    ctx = responses.ChatContext("chatcmpl-1", "tiny-chat", req, serving.tokens, [stream])

    async def run() -> list[bytes]:
        gen = serving.chat_stream(ctx, stream)
        first = asyncio.ensure_future(gen.__anext__())
        for _ in range(50):  # every step the generator could take without an engine output
            await asyncio.sleep(0)
        assert not first.done(), "a chunk was sent before the engine produced anything"
        stream.release.set()
        chunks = [await first]
        chunks += [c async for c in gen]
        return chunks

    try:
        got = events(asyncio.run(run()))
    finally:
        serving._tokenize_pool.shutdown()
    assert got[-1] == "[DONE]" and stream.aborted
    roles = got[:n]
    assert [c["choices"][0]["delta"].get("role") for c in roles] == ["assistant"] * n
    assert sorted(c["choices"][0]["index"] for c in roles) == list(range(n))
    texts = [c["choices"][0]["delta"].get("content") for c in got[n:-1]]
    assert texts == ["He"] * n + ["y"] * n  # the first output's text right after the role chunks

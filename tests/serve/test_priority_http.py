"""`--scheduling_policy priority` on a real server (vLLM's flag and request field): with one sequence per
step, of two requests queued behind a running one the lower `priority` runs first, whatever their
arrival order; priority 0 answers as the LLM API's greedy run does."""
from __future__ import annotations

import threading
import time

import openai
import pytest

from serve_util import start_server


@pytest.fixture(scope="module")
def client(tiny_model):
    srv = start_server(tiny_model, "--max_seq_len", "512", "--max_batch_size", "1", "--scheduling_policy", "priority")
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


def test_a_lower_priority_value_runs_first(client):
    finished: list[str] = []
    blocker = client.completions.create(model="tiny-chat", prompt="Once", max_tokens=400, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
    next(iter(blocker))  # it runs: the next two wait for the one sequence of a step

    def ask(name, priority):
        client.completions.create(model="tiny-chat", prompt=name, max_tokens=4, temperature=0,
                                  extra_body={"priority": priority, "ignore_eos": True})
        finished.append(name)

    late = threading.Thread(target=ask, args=("low", 7))
    late.start()
    time.sleep(0.2)
    early = threading.Thread(target=ask, args=("high", -3))  # arrives later, runs first
    early.start()
    for _ in blocker:
        pass
    late.join(60)
    early.join(60)
    assert finished == ["high", "low"]


def test_priority_keeps_the_greedy_answer(client, tiny_model):
    from meshserve import LLM, SamplingParams
    with LLM(model=tiny_model, max_seq_len=512, show_progress=False) as llm:
        want = llm.generate("Hello there", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                            use_tqdm=False).outputs[0].text
    for priority in (-2**63, 0, 12):
        got = client.completions.create(model="tiny-chat", prompt="Hello there", max_tokens=8, temperature=0,
                                        extra_body={"priority": priority, "ignore_eos": True})
        assert got.choices[0].text == want
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=1, extra_body={"priority": 2**63})
    assert exc.value.body["param"] == "priority"

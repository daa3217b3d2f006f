"""OutputProcessor, the front's one output path (LLM and the API server): n > 1 expansion with
seed + i, routing by sequence id, stop strings that ask the engine to abort, stream_interval, a
failing request that fails alone. Texts are checked against the tokenizer's own decode."""
import pytest

from helpers import build_tokenizer
from meshserve.engine.messages import EngineCoreOutput as Out
from meshserve.engine.output_processor import OutputProcessor
from meshserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_n_expands_into_seeded_sequences_and_routes_back(tok):
    proc = OutputProcessor(tok)
    state, seqs = proc.add_request("r", None, [1, 2], SamplingParams(n=3, seed=7, max_tokens=4))
    assert [sid for sid, _ in seqs] == ["r-0", "r-1", "r-2"]
    assert [p.seed for _, p in seqs] == [7, 8, 9] and all(p.n == 1 for _, p in seqs)
    ids = tok.encode("hello world", add_special_tokens=False)
    res = proc.process([Out("r-1", ids), Out("r-0", ids[:1])])
    assert res.touched == [state] and res.num_tokens == len(ids) + 1 and not res.finished
    res = proc.process([Out("r-0", ids[1:], finish_reason="length"), Out("r-1", [], finish_reason="length"),
                        Out("r-2", ids, finish_reason="length")])
    assert res.finished == [state] and "r" not in proc.requests
    assert [c.text for c in state.make_output().outputs] == [tok.decode(ids)] * 3
    assert proc.process([Out("r-0", [5])]).touched == []  # a finished request hears nothing more


def test_stop_string_asks_the_engine_to_abort_that_sequence(tok):
    proc = OutputProcessor(tok)
    state, _ = proc.add_request("s", None, [1], SamplingParams(stop=["world"], max_tokens=20))
    res = proc.process([Out("s", tok.encode("hello world again", add_special_tokens=False))])
    assert res.abort_seq_ids == ["s"] and res.finished == [state]
    out = state.make_output().outputs[0]
    assert out.text == "hello " and out.finish_reason == "stop" and out.stop_reason == "world"


def test_stream_interval_decides_when_a_reader_is_due(tok):
    proc = OutputProcessor(tok, stream_interval=3)
    state, _ = proc.add_request("i", None, [1], SamplingParams(max_tokens=20))
    due = [bool(proc.process([Out("i", [40])]).due) for _ in range(7)]
    assert due == [True, False, False, True, False, False, True]  # the first at once, then every 3


def test_a_failing_request_fails_alone(tok):
    class Broken:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, *a, **k):
            raise RuntimeError("broken tokenizer")

    proc = OutputProcessor(tok)
    good, _ = proc.add_request("g", None, [1], SamplingParams(max_tokens=5))
    bad, _ = proc.add_request("b", None, [1], SamplingParams(max_tokens=5, n=2))
    for seq in bad.seqs.values():  # force the slow (decode-and-diff) path onto the broken tokenizer
        seq.detok._stream, seq.detok.tokenizer = None, Broken()
    res = proc.process([Out("b-0", [40]), Out("g", [40])])
    assert [s.request_id for s, _ in res.failed] == ["b"] and sorted(res.abort_seq_ids) == ["b-0", "b-1"]
    assert res.touched == [good] and "b" not in proc.requests and "g" in proc.requests


def test_abort_returns_open_sequences_and_forgets_the_request(tok):
    proc = OutputProcessor(tok)
    proc.add_request("a", None, [1], SamplingParams(n=2, max_tokens=5))
    proc.process([Out("a-0", [40], finish_reason="length")])
    assert proc.abort_request("a") == ["a-1"]
    assert proc.abort_request("a") == [] and proc.num_pending_sequences() == 0
    with pytest.raises(ValueError, match="already in use"):
        proc.add_request("x", None, [1], SamplingParams())
        proc.add_request("x", None, [1], SamplingParams())

"""The overlap scheduler (on by default): step N+1 is scheduled while step N runs, decoding
requests taking their next input from step N's sampled ids on the device. Outputs are the same
with it off (`disable_overlap_scheduler=True` or `pytorch_backend_config.enable_overlap_scheduler:
false`), for greedy, seeded sampling, penalties, stop strings, and under preemption."""
import pytest

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("overlap"))
    hf = build_checkpoint(path, "llama")
    return path, hf


def run(path, prompts, params, **kw):
    with LLM(path, show_progress=False, kv_cache_config=kw.pop("kv", {"tokens_per_block": 4}), **kw) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        depth = llm._core.executor.max_inflight
        return [[c.token_ids for c in o.outputs] for o in outs], [[c.text for c in o.outputs] for o in outs], depth


MIXED = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=9, temperature=1.0, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=11, ignore_eos=True, n=2),
    SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.4, presence_penalty=0.5, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, min_tokens=4, stop=[" e"]),
    SamplingParams(max_tokens=7, temperature=0.5, seed=5, logprobs=2, ignore_eos=True),
]


def test_overlap_is_on_by_default_and_uses_placeholders(ckpt):
    path, _ = ckpt
    with LLM(path, show_progress=False) as llm:
        runner = llm._core.executor.runner
        assert llm._core.executor.max_inflight == 2 and llm._core.scheduler.config.overlap
        seen = []
        original = runner._fill_placeholders
        runner._fill_placeholders = lambda inp: (seen.append(len(inp.placeholders)), original(inp))
        llm.generate(["Hello world"] * 3, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert sum(seen) > 0


@pytest.mark.parametrize("off", [dict(disable_overlap_scheduler=True),
                                 dict(pytorch_backend_config={"enable_overlap_scheduler": False})])
def test_same_outputs_with_and_without_overlap(ckpt, off):
    path, _ = ckpt
    prompts = ["Hello world", "The capital of France", "def add(a, b):", "1 2 3", "Ünïcödé", "x"]
    on_ids, on_text, _ = run(path, prompts, MIXED)
    off_ids, off_text, depth = run(path, prompts, MIXED, **off)
    assert depth == 1
    assert on_ids == off_ids and on_text == off_text


def test_overlap_with_preemption_matches_transformers(ckpt):
    path, hf = ckpt
    prompts = make_prompts(9, 320, 15, seed=8)
    ref = [hf_greedy(hf, p, 12) for p in prompts]
    ids, _, _ = run(path, prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                      kv={"tokens_per_block": 4, "max_tokens": 40, "enable_block_reuse": False})
    assert [i[0] for i in ids] == ref


def test_min_tokens_keeps_overlap_and_bans_stop_ids_for_exactly_min_tokens(ckpt):
    """min_tokens does not turn overlap off; its stop ids are banned for exactly the first
    min_tokens outputs (counted with the in-flight step), then allowed again."""
    path, hf = ckpt
    prompt = make_prompts(1, 320, 6, seed=4)[0]
    ref = hf_greedy(hf, prompt, 12)
    stop = ref[1]  # greedy would emit it second: banned until 5 outputs exist
    params = SamplingParams(max_tokens=12, temperature=0, min_tokens=5, stop_token_ids=[stop])
    with LLM(path, show_progress=False, kv_cache_config={"tokens_per_block": 4}) as llm:
        runner = llm._core.executor.runner
        seen = []
        original = runner._fill_placeholders
        runner._fill_placeholders = lambda inp: (seen.append(len(inp.placeholders)), original(inp))
        on = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert sum(seen) > 0, "min_tokens should not disable the overlap scheduler"
    off = run(path, [{"prompt_token_ids": prompt}], params, disable_overlap_scheduler=True)[0][0][0]
    assert on == off
    assert len(on) >= 5 and stop not in on[:5]
    assert on[0] == ref[0] and on[1] != stop


class _SlowDevice:
    """Stands in for a GPU: each batch takes `step_s` after the one before it, done() polls that."""

    def __init__(self, executor, step_s: float):
        self.inner, self.step_s, self.due = executor.execute_async, step_s, 0.0

    def execute_async(self, so):
        import time
        self.due = max(time.perf_counter(), self.due) + self.step_s
        return _SlowHandle(self.inner(so), self.due)


class _SlowHandle:
    def __init__(self, inner, due: float):
        self.inner, self.due = inner, due

    def done(self) -> bool:
        import time
        return time.perf_counter() >= self.due

    def result(self):
        import time
        time.sleep(max(0.0, self.due - time.perf_counter()))
        return self.inner.result()


def _arrival_run(path, late: bool, step_s: float = 0.15):
    """A runs alone until the engine is steady; B arrives just after one of A's outputs and is
    added when the engine next drains its socket (after its next step() call, as the server's loop
    does). Returns the batches completed from B's arrival to its first token, A's and B's tokens,
    and whether that step() call deferred the launch."""
    import time
    with LLM(path, show_progress=False) as llm:
        core = llm._core
        core.late_launch = late
        core.executor.execute_async = _SlowDevice(core.executor, step_s).execute_async
        greedy = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
        core.add_request("A", list(range(3, 12)), greedy)
        tokens = {"A": [], "B": []}

        def step():
            for out in core.step():
                tokens[out.request_id] += out.new_token_ids

        while len(tokens["A"]) < 5:
            step()
        arrived_at = core.num_iterations
        # The deferral is timed from recent step periods and host times; on a loaded CI machine a
        # slow host measurement would cancel it, so pin them to the stand-in device's own timing.
        core._periods.extend([step_s] * core._periods.maxlen)
        core._host_s.extend([0.001] * core._host_s.maxlen)
        step()
        deferred = core.defer_until > 0
        core.add_request("B", list(range(20, 26)), greedy)
        first_b = None
        while core.has_unfinished():
            step()
            if tokens["B"] and first_b is None:
                first_b = core.num_iterations - arrived_at
            if core.defer_until:
                time.sleep(max(0.0, core.defer_until - time.perf_counter()))
        return first_b, tokens, deferred


def test_late_launch_admits_an_arrival_one_batch_earlier_with_the_same_tokens(ckpt):
    """overlap_late_launch: while one batch runs and nobody waits, the next one is held back until
    shortly before the running one is due, so a request arriving meanwhile joins it (one batch,
    one step's time, earlier) instead of the batch after; the tokens do not change."""
    path, _ = ckpt
    wait_off, tokens_off, deferred_off = _arrival_run(path, late=False)
    wait_on, tokens_on, deferred_on = _arrival_run(path, late=True)
    assert deferred_on and not deferred_off
    assert wait_on == wait_off - 1, (wait_on, wait_off)
    assert tokens_on == tokens_off and len(tokens_on["A"]) == 14 and len(tokens_on["B"]) == 14


def test_late_launch_is_a_server_option(ckpt):
    from meshserve.config import build_llm_args
    assert build_llm_args("test", model="x", overlap_late_launch=True).overlap_late_launch
    with pytest.raises(Exception, match="overlap_late_launch"):
        build_llm_args("test", model="x", overlap_late_launch="sometimes")


def test_a_step_slower_than_the_threshold_is_logged_with_its_shape(ckpt, caplog):
    import logging
    path, _ = ckpt
    with LLM(path, show_progress=False) as llm:
        core = llm._core
        core.executor.execute_async = _SlowDevice(core.executor, 0.05).execute_async
        core.slow_step_s = 0.02  # MESHSERVE_SLOW_STEP_MS=20; every stand-in step takes 50 ms
        core._slow_step_log.interval_s = 0.0  # every slow step (the default logs one per 30 s)
        core.add_request("A", list(range(3, 12)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        with caplog.at_level(logging.INFO, logger="meshserve.engine.engine_core"):
            while core.has_unfinished():
                core.step()
        core.slow_step_s = 0.0  # 0: never logged
        core.add_request("B", list(range(3, 12)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        n = len(caplog.records)
        with caplog.at_level(logging.INFO, logger="meshserve.engine.engine_core"):
            while core.has_unfinished():
                core.step()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("took" in m and "1 sequences, 9 tokens (0 in steps of one)" in m for m in msgs[:n]), msgs
    assert any("1 sequences, 1 tokens (1 in steps of one)" in m for m in msgs[:n]), msgs
    assert len(caplog.records) == n

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

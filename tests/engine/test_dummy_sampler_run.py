"""The start-up profiling forward (on a GPU, before the KV pool is sized) also runs each sampler
path once, so that its kernels compile before the first request, and puts the random generator
back: unseeded random sampling draws the same tokens as an engine that never ran it."""
import pytest

from helpers import build_checkpoint
from meshserve import LLM, SamplingParams
from meshserve.layers.sampler import Sampler

PROMPTS = [[3, 5, 7, 9, 11], [20, 21, 22]]
RANDOM = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)  # no seed: the engine's generator


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("dummy_sampler"))
    build_checkpoint(p, "llama")
    return p


def generate(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, RANDOM, use_tqdm=False)]


def test_profile_run_samples_each_path_and_keeps_the_generator(path, monkeypatch):
    calls = []
    for name in ("_draw", "_top_p_within_top_k", "_top_k_top_p"):
        orig = getattr(Sampler, name)

        def spy(*args, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(*args, **kw)
        monkeypatch.setattr(Sampler, name, staticmethod(spy) if name != "_draw" else spy)
    with LLM(path, show_progress=False, max_num_tokens=64, seed=0) as llm:
        ref = generate(llm)
    with LLM(path, show_progress=False, max_num_tokens=64, seed=0) as llm:
        runner = llm._core.executor.runner
        calls.clear()
        runner.profile_run()  # on CPU the engine does not call it; it clears the KV pool
        runner.init_kv_cache(llm._core.kv.num_blocks)
        assert calls == ["_draw", "_top_p_within_top_k", "_draw", "_top_k_top_p"]
        assert generate(llm) == ref

"""Pipeline parallelism on CPU ranks: greedy ids equal transformers at PP=2, PP=3 with an uneven
split, TP=2 x PP=2, and with chunked prefill, preemption, prefix reuse and streaming under a
pipeline; stage utilization is reported; invalid layouts are errors naming the numbers."""
import asyncio

import pytest

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams

MAX_NEW = 8
SP = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pp_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pp-qwen3"))
    hf = build_checkpoint(path, "qwen3", num_hidden_layers=5, vocab_size=322)
    prompts = make_prompts(8, 320, 15, seed=4)
    return path, prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("layout", [
    dict(pipeline_parallel_size=2),
    dict(pipeline_parallel_size=3, pp_partition=[1, 3, 1]),
    dict(tensor_parallel_size=2, pipeline_parallel_size=2),
], ids=["pp2", "pp3-uneven", "tp2xpp2"])
def test_pipeline_matches_transformers(pp_model, layout):
    path, prompts, ref = pp_model
    with LLM(path, kv_cache_config={"tokens_per_block": 4, "max_tokens": 2048}, show_progress=False, **layout) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        stats = llm.get_stats()
    assert got == ref
    assert len(stats["pipeline_stage_busy_fraction"]) == layout["pipeline_parallel_size"]


def test_pipeline_with_chunking_preemption_and_reuse(pp_model):
    path, prompts, ref = pp_model
    kv = {"tokens_per_block": 4, "max_tokens": 48}  # 12 blocks for 8 sequences of up to 23 tokens
    with LLM(path, pipeline_parallel_size=2, max_num_tokens=6, kv_cache_config=kv, show_progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        again = llm.generate(prompts[-1], SP, use_tqdm=False)
        stats = llm.get_stats()
    assert got == ref and again.outputs[0].token_ids == ref[-1]
    assert stats["num_preemptions"] > 0
    assert again.num_cached_tokens > 0


def test_pipeline_streams(pp_model):
    path, prompts, ref = pp_model

    async def run(llm):
        outs = []
        async for out in llm.generate_async(prompts[3], SP, streaming=True):
            outs.append(out)
        return outs

    with LLM(path, pipeline_parallel_size=2, kv_cache_config={"tokens_per_block": 4}, show_progress=False) as llm:
        outs = asyncio.run(run(llm))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref[3] and len(outs) > 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(pipeline_parallel_size=6), "pp_size=6.*5"),
    (dict(pipeline_parallel_size=2, pp_partition=[2, 2]), "pp_partition.*sum.*5|5.*pp_partition"),
    (dict(pipeline_parallel_size=2, pp_partition=[1, 1, 3]), "pp_partition"),
])
def test_invalid_pipelines_name_the_numbers(pp_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(pp_model[0], show_progress=False, **kwargs)


def test_launcher_world_must_equal_tp_times_pp():
    from meshserve.config import LlmArgs
    from meshserve.executor.multiproc import check_world
    from meshserve.distributed.launch import LaunchInfo

    launch = LaunchInfo("mpirun", 0, 6, 0, "127.0.0.1", 1)
    with pytest.raises(ValueError, match="started 6 ranks.*tensor_parallel_size=2 x pipeline_parallel_size=2"):
        check_world(LlmArgs(tensor_parallel_size=2, pipeline_parallel_size=2), "cpu", launch, 4)

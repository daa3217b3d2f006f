"""Attention data parallelism (enable_attention_dp) on CPU ranks (gloo): every rank runs its own
requests through replicated attention while the experts stay split, so greedy ids must equal
transformers on every MoE layout (split and replicate rules, a dense model, DeepSeek's latent
attention), with ranks that sit idle (the dummy step), chunked prefill, preemption, the overlap
scheduler on and off; sampling with seeds, logprobs and prompt logprobs equal a single-rank run;
placement and enable_balance against hand-worked cases; the server with the official client and
per-rank gauges in /metrics; settings attention DP cannot honour are one-line errors."""
import os
import sys

import httpx
import pytest
from openai import OpenAI

from helpers import (DEEPSEEK_YARN, assert_same_as_one_rank, build_checkpoint, build_deepseek, hf_greedy,
                     make_prompts, seeded_logprob_params, served_token_ids)
from meshserve import LLM, SamplingParams
from meshserve.engine.dp_coordinator import DpScheduler
from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.messages import ModelRunnerOutput
from meshserve.engine.request import Request
from meshserve.engine.scheduler import SchedulerConfig

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
KV = {"tokens_per_block": 4, "max_tokens": 2048}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("qwen3_moe", "qwen2_moe", "mixtral", "llama"):
        path = str(tmp_path_factory.mktemp(arch))
        hf = build_checkpoint(path, arch)
        prompts = make_prompts(7, 320, 13, seed=3)
        out[arch] = (path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts])
    return out


def run(path, prompts, sp=SP, **kw):
    kw.setdefault("kv_cache_config", KV)
    with LLM(path, enable_attention_dp=True, show_progress=False, **kw) as llm:
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return outs, llm.get_stats(), llm._core


# arch, layout, world size; 7 prompts: on 4 and 8 ranks some ranks get fewer requests, and on 8 one
# rank gets none and runs a dummy token in every step
LAYOUTS = {
    "qwen3_moe-tp2": ("qwen3_moe", dict(tensor_parallel_size=2), 2),  # experts split by moe_tp 2
    "qwen3_moe-tp4xep2": ("qwen3_moe", dict(tensor_parallel_size=4, moe_expert_parallel_size=2), 4),
    "qwen2_moe-tp2xep2-no-overlap": ("qwen2_moe", dict(tensor_parallel_size=2, moe_expert_parallel_size=2,
                                                       disable_overlap_scheduler=True), 2),
    "mixtral-tp2xep4": ("mixtral", dict(tensor_parallel_size=2, moe_expert_parallel_size=4), 8),  # replicate rule
    "llama-tp2": ("llama", dict(tensor_parallel_size=2), 2),  # a dense model: plain data parallelism
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_attention_dp_matches_transformers(checkpoints, name):
    arch, layout, world = LAYOUTS[name]
    path, prompts, ref = checkpoints[arch]
    outs, stats, core = run(path, prompts, **layout)
    assert core.executor.world_size == world and core.dp_size == world
    got = [o.outputs[0].token_ids for o in outs]
    assert got == ref, name
    placed = [r["num_requests_placed"] for r in stats["attention_dp_ranks"]]
    assert sum(placed) == len(prompts) and max(placed) - min(placed) <= 1, placed  # all at once: spread evenly
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),  # experts split by moe_tp: the gather path
                                    dict(tensor_parallel_size=2, moe_expert_parallel_size=2)],  # direct dispatch
                         ids=["gather", "direct"])
def test_one_request_on_two_ranks_and_expert_counts(checkpoints, layout):
    """A lone request: the other rank runs a dummy token each step and adds no routed rows, so the
    expert counts equal those of the same request without attention DP (each rank's own routed ids
    gathered for the counters when it dispatches its own tokens)."""
    path, prompts, ref = checkpoints["qwen3_moe"]
    outs, stats, core = run(path, [prompts[-1]], **layout)
    assert core.executor.runner.parallel.dp_tokens.direct == ("moe_expert_parallel_size" in layout)
    assert outs[0].outputs[0].token_ids == ref[-1]
    with LLM(path, tensor_parallel_size=2, kv_cache_config=KV, show_progress=False) as llm:
        llm.generate([prompts[-1]], SP, use_tqdm=False)
        plain = llm.get_stats()
    assert stats["expert_tokens"] == plain["expert_tokens"] and stats["expert_tokens"]
    if "moe_expert_parallel_size" in layout:  # every rank busy, uneven counts per step
        outs, stats, _ = run(path, prompts, **layout)
        assert [o.outputs[0].token_ids for o in outs] == ref
        with LLM(path, tensor_parallel_size=2, kv_cache_config=KV, show_progress=False) as llm:
            llm.generate(prompts, SP, use_tqdm=False)
            assert stats["expert_tokens"] == llm.get_stats()["expert_tokens"]


def test_deepseek_latent_attention_with_chunks_and_preemption(tmp_path):
    """DeepSeek-V3 (MLA, a dense first layer, grouped routing) at tp2 x ep2 with attention DP: the
    latent cache per rank, 6-token steps (chunked prompts) and 12 blocks per rank (preemption)."""
    hf = build_deepseek(str(tmp_path), num_hidden_layers=3, rope_parameters=DEEPSEEK_YARN)
    prompts = make_prompts(7, 320, 15)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = [hf_greedy(hf, p, 10) for p in prompts]
    outs, stats, _ = run(str(tmp_path), prompts, sp, tensor_parallel_size=2, moe_expert_parallel_size=2,
                         max_num_tokens=6, kv_cache_config={"tokens_per_block": 4, "max_tokens": 48})
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert stats["num_preemptions"] > 0


def test_sampling_logprobs_and_prompt_logprobs_equal_a_single_rank(checkpoints):
    path, prompts, _ = checkpoints["qwen3_moe"]
    sps = seeded_logprob_params(len(prompts))
    outs = run(path, prompts, sps, tensor_parallel_size=2)[0]
    assert_same_as_one_rank(path, prompts, sps, outs, KV)


def test_unseeded_samples_on_two_ranks_differ(checkpoints):
    """n=2 puts the two samples on the two ranks, which must draw their own noise."""
    path, prompts, _ = checkpoints["qwen3_moe"]
    outs, stats, _ = run(path, [prompts[-1]], SamplingParams(n=2, max_tokens=12, temperature=1.0, ignore_eos=True),
                         tensor_parallel_size=2)
    assert [r["num_requests_placed"] for r in stats["attention_dp_ranks"]] == [1, 1]
    a, b = (c.token_ids for c in outs[0].outputs)
    assert a != b


def test_enable_balance_keeps_outputs(checkpoints):
    path, prompts, ref = checkpoints["qwen3_moe"]
    outs, _, core = run(path, prompts, tensor_parallel_size=2,
                        attention_dp_config={"enable_balance": True, "timeout_iters": 3, "batching_wait_iters": 1})
    assert core.scheduler.enable_balance
    assert [o.outputs[0].token_ids for o in outs] == ref


# ---- placement and balancing, on the schedulers alone -------------------------------------------------
def dp_scheduler(ranks=2, blocks=64, **kw) -> DpScheduler:
    cfg = SchedulerConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=256)
    return DpScheduler(cfg, [KVCacheManager(blocks, 4) for _ in range(ranks)], **kw)


def request(rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), [], 256)


def test_placement_least_loaded_then_cached_prefix():
    s = dp_scheduler(ranks=3)
    for i in range(3):
        s.add_request(request(f"r{i}", list(range(10, 30))))
    assert [s.owner[f"r{i}"] for i in range(3)] == [0, 1, 2]  # one each
    # rank 1 computes r1's prompt and caches its 5 full blocks; r0 and r2 finish unscheduled
    s.abort_request("r0"), s.abort_request("r2")
    r1 = s.ranks[1].requests["r1"]
    part = s.schedule().dp[1]
    assert [r.req_id for r in part.reqs] == ["r1"]
    s.ranks[1].kv.cache_full_blocks(r1)
    # loads now 0, 1, 0: a prompt sharing r1's prefix still goes to rank 1 (within one of the lowest
    # load, the longest cached prefix wins); an unrelated one to the least loaded, lowest rank
    s.add_request(request("same", list(range(10, 30)) + [7]))
    s.add_request(request("other", list(range(40, 60))))
    assert s.owner["same"] == 1 and s.owner["other"] == 0


def step(s: DpScheduler):
    """Schedule one step and feed back a sampled token for every request it ran."""
    so = s.schedule()
    ids = [r.req_id for r in so.all_reqs()]
    s.update_from_output(so, ModelRunnerOutput(so.step_id, ids, [9] * len(ids)))
    return [[r.req_id for r in part.reqs] for part in so.dp]


def test_enable_balance_holds_prompts_until_every_rank_has_one_or_timeout():
    s = dp_scheduler(ranks=2, enable_balance=True, timeout_iters=3, batching_wait_iters=0)
    s.add_request(request("a", [5] * 6, max_tokens=50))
    assert step(s) == [["a"], []]  # nothing runs anywhere: an idle engine never holds a prompt
    s.add_request(request("c", [7] * 6))  # to rank 1, the less loaded
    assert s.owner["c"] == 1
    # rank 0 has no prompt waiting: c is held while a decodes, for timeout_iters steps
    assert [step(s) for _ in range(3)] == [[["a"], []]] * 3
    assert step(s) == [["a"], ["c"]]
    # prompts on every rank start together, at once (batching_wait_iters=0)
    s.add_request(request("d", [8] * 6))
    s.add_request(request("e", [3] * 6))
    assert sorted(s.owner[r] for r in "de") == [0, 1]
    assert step(s) == [["a", "d"] if s.owner["d"] == 0 else ["a", "e"], ["c", "e"] if s.owner["e"] == 1 else ["c", "d"]]


def test_without_balance_prompts_start_at_once():
    s = dp_scheduler(ranks=2)
    s.add_request(request("a", [5] * 6, max_tokens=50))
    s.schedule()
    s.add_request(request("b", [6] * 6))
    assert [r.req_id for r in s.schedule().dp[1].reqs] == ["b"]


# ---- settings it cannot honour -----------------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [
    (dict(enable_attention_dp=True, tensor_parallel_size=2, pipeline_parallel_size=2),
     "enable_attention_dp=True with pipeline_parallel_size=2"),
    (dict(tensor_parallel_size=2, attention_dp_config={"enable_balance": True}),
     "attention_dp_config={'enable_balance': True, 'timeout_iters': 50, 'batching_wait_iters': 10} needs "
     "enable_attention_dp=True"),
])
def test_settings_attention_dp_cannot_honour_are_refused(checkpoints, kw, needle):
    path = checkpoints["qwen3_moe"][0]
    with pytest.raises(ValueError) as e:
        LLM(path, show_progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_serve_with_attention_dp_flag(checkpoints):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from serve_util import start_server
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints["qwen3_moe"][0]
    tok = AutoTokenizer.from_pretrained(path)  # the server's tokenizer
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = ["The capital of France", "Once upon a time", "A B C", "hello"]
    refs = [hf_greedy(hf, tok.encode(p), 12) for p in prompts]
    server = start_server(path, "--tp_size", "2", "--ep_size", "2", "--enable_attention_dp", api_key=None)
    try:
        assert served_token_ids(server.base_url, prompts, 12) == refs
        text = httpx.get(server.base_url + "/metrics").text
        placed = {line.split('dp_rank="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line.startswith("meshserve_attention_dp_requests_placed{")}
        assert set(placed) == {"0", "1"} and sum(placed.values()) == 4 and min(placed.values()) >= 1, text[-2000:]
        used = [line for line in text.splitlines() if line.startswith("meshserve_kv_cache_used_blocks{")]
        assert used and float(used[0].rsplit(" ", 1)[1]) == 0
    finally:
        server.stop()


def test_seed_deepseek_config_tp16_ep4_on_16_ranks(tmp_path):
    """The seed's Slurm example: DeepSeek-V3 at --tp_size 16 --ep_size 4 with its config.yml
    (enable_attention_dp, the overlap scheduler, free_gpu_memory_fraction), here on 16 CPU ranks: 16
    schedulers, one latent cache each, experts split moe_tp 4 x moe_ep 4; 5 prompts, so 11 ranks run
    dummy tokens in every step."""
    from meshserve.config import load_yaml_config  # what `meshserve serve --config` reads

    hf = build_deepseek(str(tmp_path / "ckpt"), num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16)
    cfg = tmp_path / "config.yml"
    cfg.write_text("enable_attention_dp: true\npytorch_backend_config:\n  enable_overlap_scheduler: true\n"
                   "kv_cache_config:\n  free_gpu_memory_fraction: 0.95\n  tokens_per_block: 4\n  max_tokens: 512\n")
    prompts = make_prompts(5, 320, 9, seed=3)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = [hf_greedy(hf, p, sp.max_tokens) for p in prompts]
    args = load_yaml_config(str(cfg))
    with LLM(str(tmp_path / "ckpt"), tensor_parallel_size=16, moe_expert_parallel_size=4, max_batch_size=161,
             show_progress=False, **args) as llm:
        assert llm._core.executor.world_size == 16 and llm._core.dp_size == 16
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == ref


def test_dropped_streams_on_both_ranks_free_every_rank_s_blocks(checkpoints):
    """8 streams over two attention-DP ranks, each dropped after 3 chunks: every one is aborted, both
    ranks' KV blocks come back, generation stops, and the engine still answers as transformers does."""
    import asyncio
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from serve_util import start_server

    path, prompts, ref = checkpoints["qwen3_moe"]
    server = start_server(path, "--tp_size", "2", "--enable_attention_dp", api_key=None)

    def per_rank(name: str) -> list[float]:
        text = httpx.get(server.base_url + "/metrics").text
        return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]

    try:
        model = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY").models.list().data[0].id
        before = server.metrics()
        busy: list = []

        async def one(client, i, all_started, started):
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": 200, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            chunks = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    chunks += 1
                    if chunks == 1:
                        started.append(i)
                        if len(started) == 8:
                            busy.extend(await asyncio.to_thread(per_rank, "meshserve_attention_dp_requests_running"))
                            all_started.set()
                    if chunks >= 3 and all_started.is_set():
                        break  # drop the stream mid-way
            return chunks

        async def main():
            all_started, started = asyncio.Event(), []
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                return await asyncio.gather(*[one(client, i, all_started, started) for i in range(8)])

        chunks = asyncio.run(main())
        assert all(c < 100 for c in chunks)
        assert len(busy) == 2 and min(busy) >= 1, busy  # both ranks were running streams when they dropped
        deadline = time.monotonic() + 10
        while True:
            m = server.metrics()
            if (m["meshserve_num_requests_running"] == 0 and m["meshserve_kv_cache_used_blocks"] == 0) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert m["meshserve_num_requests_running"] == 0 and m["meshserve_kv_cache_used_blocks"] == 0, m
        assert per_rank("meshserve_attention_dp_kv_cache_usage_ratio") == [0.0, 0.0]
        assert m.get("meshserve_requests_total[abort]", 0) - before.get("meshserve_requests_total[abort]", 0) == 8
        generated = m["meshserve_generation_tokens_total"]
        time.sleep(0.5)
        assert server.metrics()["meshserve_generation_tokens_total"] == generated  # nothing runs any more
        assert served_token_ids(server.base_url, prompts, 8) == ref
    finally:
        server.stop()


def test_structured_outputs_and_bad_words_on_every_dp_rank(checkpoints):
    """Each DP rank's part of a step carries its own grammar masks and bad-word bans: the greedy ids
    equal one rank's (tests/engine/test_structured_outputs.py and test_bad_words.py hold that one to
    transformers), with requests spread over both ranks."""
    import re

    from meshserve import StructuredOutputsParams
    path, prompts, ref = checkpoints["llama"]
    regex = r"[a-c]{2}-[0-9]{2,3}"
    params = [SamplingParams(max_tokens=12, temperature=0, structured_outputs=StructuredOutputsParams(regex=regex))
              if i % 2 else SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                           bad_words_token_ids=[r[2:4], [r[5]]])
              for i, r in enumerate(ref)]
    with LLM(path, show_progress=False, kv_cache_config=KV) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    outs, stats, _ = run(path, prompts, params, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in outs[1::2])
    assert all(p > 0 for p in (r["num_requests_placed"] for r in stats["attention_dp_ranks"]))

"""scheduling_policy="priority" (vLLM's): requests run in priority order (lower first, then arrival),
preemption takes the lowest priority, and every request's greedy ids still equal transformers'. A
priority on an engine that schedules first come, first served is a one-line ValueError."""
from __future__ import annotations

import pytest

from helpers import hf_greedy, make_prompts
from meshserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_requests_run_in_priority_order_with_transformers_outputs(tiny_llama, tiny_llama_hf):
    model, _ = tiny_llama_hf
    prompts = make_prompts(6, 300, 14, seed=3)
    priorities = [3, 1, 2, 0, 1, -5]
    with LLM(tiny_llama, scheduling_policy="priority", max_batch_size=1, show_progress=False) as llm:
        core = llm._core  # one sequence per step: the order requests finish is the order they ran
        for i, (p, pr) in enumerate(zip(prompts, priorities)):
            core.add_request(f"r{i}", p, GREEDY, priority=pr)
        finished, tokens = [], {}
        while core.scheduler.has_unfinished():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason:
                    finished.append(out.request_id)
        # the reference order: by priority, ties by arrival
        assert finished == [f"r{i}" for i in sorted(range(6), key=lambda i: (priorities[i], i))]
        for i, p in enumerate(prompts):
            assert tokens[f"r{i}"] == hf_greedy(model, p, 6), i
        # through LLM.generate, with KV pressure (room for 48 tokens, 6 x 20 wanted): preemptions keep parity
    with LLM(tiny_llama, scheduling_policy="priority", kv_cache_config={"max_tokens": 48, "tokens_per_block": 4,
                                                                        "enable_block_reuse": False},
             show_progress=False) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                            use_tqdm=False, priority=priorities)
        assert llm.get_stats()["num_preemptions"] > 0
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == hf_greedy(model, p, 12)


def test_a_priority_needs_the_priority_policy(tiny_llama):
    with LLM(tiny_llama, show_progress=False) as llm:  # fcfs
        with pytest.raises(ValueError, match=r"^priority=2: this engine schedules first come, first served "
                                             r"\(scheduling_policy='fcfs'\); start it with scheduling_policy='priority'"):
            llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, priority=[2])
        assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, priority=[0])[0].finished
        with pytest.raises(ValueError, match=r"priority=\[0, 0\] is invalid: expected a list of one integer per prompt"):
            llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, priority=[0, 0])
        with pytest.raises(ValueError, match=r"priority=True is invalid: expected an integer"):
            llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, priority=[True])
        assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].finished  # nothing was left behind
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(tiny_llama, scheduling_policy="lifo", show_progress=False)

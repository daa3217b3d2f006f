"""benchmarks/moe_1gpu.py's offline timeline (where an offline run's iterations went) on a tiny
checkpoint on CPU: its token accounting against the prompts and max_tokens given here."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_timeline_counts_every_prompt_token_and_iteration(tmp_path):
    from helpers import build_checkpoint
    from meshserve import LLM, SamplingParams
    import moe_1gpu

    path = str(tmp_path / "m")
    build_checkpoint(path, "qwen3", num_hidden_layers=1)
    lens = [40, 25, 33, 17, 50]
    prompts = [{"prompt_token_ids": [5 + (i * 7 + j) % 300 for j in range(n)]} for i, n in enumerate(lens)]
    with LLM(path, show_progress=False, dtype="float32", max_num_tokens=64, max_batch_size=3,
             kv_cache_config={"enable_block_reuse": False}) as llm:
        seconds, t = moe_1gpu.timed_with_timeline(llm, prompts, SamplingParams(max_tokens=6, ignore_eos=True))
        core = llm._core  # the wrappers are gone again
        assert core.scheduler.schedule.__func__ is type(core.scheduler).schedule
        assert core._step.__func__ is type(core)._step
    assert seconds > 0
    assert t["prompt_tokens"] == sum(lens)  # 64-token steps: chunks of the prompts, every one counted
    assert t["prefill_iterations"] >= -(-sum(lens) // 64)
    assert t["iterations"] == t["prefill_iterations"] + t["decode_only_iterations"]
    assert 0 < t["decode_only_tokens"] <= len(lens) * 5  # the first token of each comes with its prefill
    assert t["largest_decode_batch"] <= 3
    assert t["prefill_s"] > 0 and t["decode_only_s"] > 0

"""Diagnostic (GPU): the fp32 engine against transformers over many schedules, per engine setting.

tests/gpu/test_gpu_engine.py::test_fp32_prefill_graphs_match_transformers[48] failed once, in one
test order only. This repeats its scenario (a tiny Qwen3, 12 prompts of 1..40 tokens, a 48-token
step budget: prompt chunks beside decode rows) with shuffled batches and random max_tokens, under
several settings (overlap on/off, mixed-step graphs on/off, decode graphs off, block reuse off),
and prints every token that differs from transformers' greedy ids with transformers' own logit
gap at that position (a gap near 0: a near-tie; a large gap: a wrong result).

    python3 scripts/gpu_fp32_stress.py [iterations per setting, default 12] [setting names...]
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import build_checkpoint, hf_greedy, make_prompts  # noqa: E402

from meshserve import LLM, SamplingParams  # noqa: E402

SETTINGS = {
    "default": {},
    "no_overlap": {"disable_overlap_scheduler": True},
    "no_mixed_graphs": {"cuda_graph_config": {"prefill_max_tokens": 0}},
    "no_graphs": {"cuda_graph_config": {"enable": False}},
    "no_reuse": {"kv_cache_config": {"tokens_per_block": 16, "max_tokens": 8192, "enable_block_reuse": False}},
    "no_overlap_no_graphs": {"disable_overlap_scheduler": True, "cuda_graph_config": {"enable": False}},
}


@torch.no_grad()
def hf_gap(hf, ids: list[int], ours: int) -> tuple[float, float]:
    """transformers' top-2 logit gap at the next position after `ids`, and its logit for the
    token we chose minus its top logit."""
    logits = hf(torch.tensor([ids])).logits[0, -1].double()
    top2 = logits.topk(2)
    return float(top2.values[0] - top2.values[1]), float(logits[ours] - top2.values[0])


def main() -> int:
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    names = sys.argv[2:] or list(SETTINGS)
    path = tempfile.mkdtemp(prefix="stress-qwen3-")
    hf = build_checkpoint(path, "qwen3", num_hidden_layers=3, num_key_value_heads=1)
    prompts = make_prompts(12, 320, 40, seed=5)
    ref = [hf_greedy(hf, p, 16) for p in prompts]
    total_bad = 0
    for name in names:
        kw = {"dtype": "float32", "max_num_tokens": 48,
              "kv_cache_config": {"tokens_per_block": 16, "max_tokens": 8192}}
        kw.update(SETTINGS[name])
        rng = random.Random(1234)
        bad, checked = [], 0
        t0 = time.time()
        with LLM(path, show_progress=False, **kw) as llm:
            for it in range(iters):
                if it == 0:  # the test's own sequence: the whole batch, then three alone
                    jobs = [(list(range(12)), [16] * 12)] + [([i], [16]) for i in range(3)]
                else:
                    idx = rng.sample(range(12), rng.randint(1, 12))
                    jobs = [(idx, [rng.randint(1, 16) for _ in idx])]
                for idx, mts in jobs:
                    sps = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in mts]
                    outs = llm.generate([prompts[i] for i in idx], sps, use_tqdm=False)
                    for i, m, o in zip(idx, mts, outs):
                        got = list(o.outputs[0].token_ids)
                        checked += 1
                        if got != ref[i][:m]:
                            pos = next(j for j in range(m) if j >= len(got) or got[j] != ref[i][j])
                            ours = got[pos] if pos < len(got) else -1
                            gap, short = hf_gap(hf, prompts[i] + ref[i][:pos], max(ours, 0))
                            bad.append(f"  iter {it} prompt {i} ({len(prompts[i])} tokens, batch of {len(idx)}) "
                                       f"output {pos}: ours {ours} hf {ref[i][pos]}; hf top-2 gap {gap:.3g}, "
                                       f"hf logit(ours) - top {short:.3g}")
        print(f"[{name}] {checked} outputs, {len(bad)} differ from transformers ({time.time() - t0:.0f} s)",
              *bad, sep="\n", flush=True)
        total_bad += len(bad)
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())

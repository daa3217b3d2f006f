#!/usr/bin/env python
"""A/B of kernel_config switches on batch-1 decode of an MoE model cut to a few layers (one process,
one engine per configuration, the same prompts): ms per step and the difference per layer against the
first configuration, which is what the full model's step gains per layer (issue 21's batch-1 target).

    python benchmarks/moe_layer_ab.py --layers 8 --configs base,fuse,pdl,fuse+pdl --out $OUT/ab

A configuration is `base` or `+`-joined switches: fuse (fuse_norm_linear), pdl.
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWITCHES = {"fuse": "fuse_norm_linear", "pdl": "pdl"}


def kernel_config(name: str) -> dict:
    cfg = {v: False for v in SWITCHES.values()}
    if name != "base":
        for part in name.split("+"):
            if part not in SWITCHES:
                raise SystemExit(f"--configs: unknown switch {part!r}; accepted: base, {', '.join(SWITCHES)}")
            cfg[SWITCHES[part]] = True
    return cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--configs", default="base,fuse,pdl,fuse+pdl")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default="out/moe_layer_ab")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import torch
    from meshserve import LLM, SamplingParams
    from meshserve.models import shapes
    s = copy.deepcopy(shapes.SHAPES[a.model])
    s.config["num_hidden_layers"] = a.layers
    shapes.SHAPES["moe-ab"] = s
    g = torch.Generator().manual_seed(0)
    prompts = [[{"prompt_token_ids": torch.randint(5, 30000, (128,), generator=g).tolist()}] for _ in range(3)]
    sp1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    rows = []
    for name in a.configs.split(","):
        llm = LLM("moe-ab", load_format="dummy", max_batch_size=4, max_seq_len=1024, show_progress=False,
                  kernel_config=kernel_config(name))
        llm.generate(prompts[0], sp, use_tqdm=False)  # warm-up (compiles, first graph replays)
        runs, tokens = [], []
        for ps in prompts:
            t = time.perf_counter()
            llm.generate(ps, sp1, use_tqdm=False)
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = llm.generate(ps, sp, use_tqdm=False)
            runs.append(((time.perf_counter() - t) - first) / (a.new_tokens - 1) * 1000)
            tokens.append(out[0].outputs[0].token_ids)
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
        row = {"config": name, "ms_per_step_runs": runs, "ms_per_step": min(runs), "tokens": tokens}
        base = rows[0] if rows else row
        row["per_layer_us_vs_first"] = (row["ms_per_step"] - base["ms_per_step"]) / a.layers * 1000
        row["same_tokens_as_first"] = tokens == base["tokens"]
        rows.append(row)
        print(f"{name:>10}: {', '.join(f'{r:.3f}' for r in runs)} ms/step ({a.layers} layers); "
              f"{row['per_layer_us_vs_first']:+.2f} us/layer vs {rows[0]['config']}; "
              f"same tokens: {row['same_tokens_as_first']}", flush=True)
    with open(os.path.join(a.out, "moe_layer_ab.json"), "w") as f:
        json.dump({"model": a.model, "layers": a.layers, "rows": [{k: v for k, v in r.items() if k != "tokens"}
                                                                   for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()

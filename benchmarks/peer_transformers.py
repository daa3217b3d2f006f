#!/usr/bin/env python
"""The peer most users try first: `transformers` generate (sdpa, bf16, random weights) on the same
shape, batch 1 and batch 128, fixed output length. Prints tok/s and writes JSON.

    python benchmarks/peer_transformers.py llama-3.1-8b --new-tokens 64
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", help="shape name or folder with config.json")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="out/peer_transformers")
    a = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    from meshserve.models.resolve import resolve_model_path
    path = resolve_model_path(a.model)
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.randint(5, cfg.vocab_size - 5, (b, a.input_len), device="cuda")
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append({"batch": b, "seconds": dt, "output_tok_s": b * a.new_tokens / dt,
                     "ms_per_step": dt / a.new_tokens * 1000})
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "peer_transformers.json"), "w") as f:
        json.dump({"model": a.model, "transformers": __import__("transformers").__version__, "rows": rows}, f, indent=2)
    print(f"\ntransformers generate, {a.model}, bf16 sdpa, {a.input_len} in / {a.new_tokens} out")
    for r in rows:
        print(f"batch {r['batch']:>4}: {r['output_tok_s']:>9.1f} tok/s  {r['ms_per_step']:>7.2f} ms/step")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Tokenization of long prompts: `tokenizer.encode` against meshserve's PromptEncoder (the same ids,
cut at pre-token boundaries and encoded on the Rust thread pool), on the bench's random prompts.
Each prompt is encoded once by each (fresh text each time, so the BPE word cache is as cold as a
server's). Prints a table and writes JSON."""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-3.1-8b", help="shape name or model folder (its tokenizer)")
    p.add_argument("--lengths", default="1024,8192,32768")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--out", default="out/tokenize_long")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer

    from meshserve.bench.datasets import random_samples
    from meshserve.bench.shapes import resolve_model
    from meshserve.tokenize import PromptEncoder

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    enc = PromptEncoder(tok)
    rows = []
    print(f"{args.model}: parallel={enc.parallel}, threads={enc.threads}")
    print(f"{'tokens':>7} {'encode ms':>10} {'parallel ms':>12} {'speed-up':>9}")
    for n in (int(x) for x in args.lengths.split(",")):
        texts = [s.prompt for s in random_samples(tok, 2 * args.num_prompts, n, 1, seed=n)]
        times = {"encode": [], "parallel": []}
        for i, text in enumerate(texts):
            name, fn = ("encode", tok.encode) if i % 2 == 0 else ("parallel", enc.encode)
            t = time.perf_counter()
            ids = fn(text)
            times[name].append((time.perf_counter() - t) * 1000)
            assert ids == tok.encode(text), "PromptEncoder differs from tokenizer.encode"
        a, b = statistics.median(times["encode"]), statistics.median(times["parallel"])
        rows.append({"tokens": n, "encode_ms": a, "parallel_ms": b, "speedup": a / b})
        print(f"{n:>7} {a:>10.1f} {b:>12.1f} {a / b:>9.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenize_long.json"), "w") as f:
        json.dump({"model": args.model, "threads": enc.threads, "parallel": enc.parallel, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

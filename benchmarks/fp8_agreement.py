"""Teacher-forced top-1 agreement of FP8 (weights, KV cache) with the full-precision model: the
embedded default model (or --model) reads a fixed text once, and at every position the most likely
next token (prompt_logprobs) is compared with the reference run's (fp32 on CPU, the checkpoint's
dtype on a GPU). Prints a table and writes JSON. A quality figure, not a speed one: runs anywhere.

    python3 benchmarks/fp8_agreement.py --out out/fp8_agreement
"""
import argparse
import json
import os
from pathlib import Path

VARIANTS = {"reference": {}, "bfloat16": {"dtype": "bfloat16"}, "fp8 weights": {"quantization": "fp8"},
            "fp8 KV cache": {"kv_cache_config": {"dtype": "fp8"}},
            "fp8 weights + KV": {"quantization": "fp8", "kv_cache_config": {"dtype": "fp8"}}}


def top1(model, text: str, **kw) -> list:
    from meshserve import LLM, SamplingParams
    with LLM(model, show_progress=False, **kw) as llm:
        out = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0), use_tqdm=False)[0]
    return [max(d, key=d.get) if d else None for d in out.prompt_logprobs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    p.add_argument("--chars", type=int, default=6000)
    p.add_argument("--out", default="out/fp8_agreement")
    a = p.parse_args()
    text = open(a.text).read()[:a.chars]
    ref = top1(a.model, text)
    rows = []
    print(f"{'variant':>18} {'positions':>9} {'top-1 agreement':>15}")
    for name, kw in VARIANTS.items():
        got = ref if name == "reference" else top1(a.model, text, **kw)
        pairs = [(x, y) for x, y in zip(ref, got) if x is not None]
        agree = sum(x == y for x, y in pairs) / len(pairs)
        rows.append({"variant": name, "settings": kw, "positions": len(pairs), "agreement": agree})
        print(f"{name:>18} {len(pairs):>9} {agree:>15.4f}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fp8_agreement.json"), "w") as f:
        json.dump({"model": a.model or "embedded SmolLM2-135M-Instruct", "text": a.text, "chars": a.chars,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

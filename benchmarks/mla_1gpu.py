#!/usr/bin/env python
"""Scenario `mla-1gpu`: the DeepSeek-V3 architecture at Moonlight-16B-A3B's shape (bf16, random
weights; 27 layers, MLA with kv_lora_rank 512 + 64 rope dims, 64 experts, 6 active, 2 shared, a
dense first layer) on one GPU through the offline API: decode ms/step at batch 1 and 64 and one
8k-token prefill; the latent decode kernel's GB/s at 8k context; then the transformers peer.

Floors from bytes read per step at 4.3 TB/s: at batch 1 attention, router, shared experts, the
dense layer, LM head and the 6 routed experts per layer (5.15 GB -> 1.20 ms); at batch B the
routed experts a layer touches in expectation, E (1 - (1 - K/E)^B), plus the latent cache read.
The 8k prefill against its FLOPs at 790 TFLOP/s. Anchor (BENCHMARKS.md, transformers 5.17):
78.4 ms/step at batch 1, 387 tok/s at batch 64, one 8k prefill 213 ms.

    python benchmarks/mla_1gpu.py --out $OUT/mla
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BANDWIDTH, PEAK = 4.3e12, 790e12


def params(cfg: dict, experts_per_layer: float) -> float:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vdim, lora = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    q = h * heads * (nope + rope) if not cfg.get("q_lora_rank") else \
        h * cfg["q_lora_rank"] + cfg["q_lora_rank"] * heads * (nope + rope)
    attn = q + h * (lora + rope) + lora * heads * (nope + vdim) + heads * vdim * h
    inter = cfg["moe_intermediate_size"]
    dense = cfg["first_k_dense_replace"]
    moe_layers = cfg["num_hidden_layers"] - dense
    routed = experts_per_layer * 3 * h * inter
    shared = 3 * h * inter * cfg["n_shared_experts"]
    return (cfg["num_hidden_layers"] * attn + dense * 3 * h * cfg["intermediate_size"]
            + moe_layers * (routed + shared + cfg["n_routed_experts"] * h) + cfg["vocab_size"] * h)


def expected_experts(cfg: dict, batch: int) -> float:
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    return e * (1 - (1 - k / e) ** batch)


def kernel_bench(rows: list) -> None:
    import torch
    from meshserve.kernels.mla_decode import decode_num_splits, mla_decode
    from mla_kernel_sweep import CTX as ctx, H, L, R, latent_inputs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B in (1, 64):
        q, cache, tables, seq_lens, _ = latent_inputs(B)
        splits = decode_num_splits(B, H, ctx, sms)
        for _ in range(3):
            mla_decode(q, cache, tables, seq_lens, L, 0.07, splits)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            mla_decode(q, cache, tables, seq_lens, L, 0.07, splits)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) / 50 * 1000
        nbytes = B * ctx * (L + R) * 2
        floor_us = nbytes / BANDWIDTH * 1e6
        rows.append({"batch": B, "context": ctx, "splits": splits, "us": us, "GB_s": nbytes / us / 1e3,
                     "floor_us": floor_us, "ratio": us / floor_us})
        print(f"mla_decode B={B} ctx={ctx} splits={splits}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s "
              f"(floor {floor_us:.1f} us, ratio {us / floor_us:.2f})", flush=True)


def ours(a) -> dict:
    import torch
    from meshserve import LLM, SamplingParams
    from meshserve.models.shapes import SHAPES
    import kernel_record

    cfg = SHAPES[a.model].config
    result = {"model": a.model, "pdl": a.pdl, "kernel": []}
    kernel_bench(result["kernel"])
    llm = LLM(a.model, load_format="dummy", max_batch_size=64, max_seq_len=8192, max_num_tokens=8192,
              kernel_config={"pdl": a.pdl}, show_progress=False)
    result["kernel_config"] = kernel_record.from_llm(llm)
    g = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"] - 300

    def prompts(n, length):
        return [{"prompt_token_ids": torch.randint(5, vocab, (length,), generator=g).tolist()} for _ in range(n)]

    def timed(ps, max_tokens):
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    timed(prompts(2, 128), 16)
    for batch, new in ((1, 256), (64, 128)):
        runs = []
        for _ in range(3):
            ps = prompts(batch, 128)
            first = timed(ps, 1)
            runs.append((timed(ps, new) - first) / (new - 1) * 1000)
        ctx_bytes = batch * (128 + new / 2) * cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2
        floor = (params(cfg, expected_experts(cfg, batch)) * 2 + ctx_bytes) / BANDWIDTH * 1000
        result[f"decode_b{batch}"] = {"ms_per_step_runs": runs, "ms_per_step_worst": max(runs), "floor_ms": floor}
        print(f"decode batch {batch}: {', '.join(f'{r:.2f}' for r in runs)} ms/step (floor {floor:.2f})", flush=True)
    runs = [timed(prompts(1, 8191), 1) * 1000 for _ in range(3)]  # + 1 out = 8192 positions, the limit
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    attn_flops = 2 * 8192 * 8192 / 2 * heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"])
    flops = 2 * 8192 * params(cfg, cfg["num_experts_per_tok"]) + cfg["num_hidden_layers"] * attn_flops
    result["prefill_8k"] = {"ms_runs": runs, "ms_worst": max(runs), "floor_ms": flops / PEAK * 1000}
    print(f"prefill 8k: {', '.join(f'{r:.0f}' for r in runs)} ms (floor {flops / PEAK * 1000:.0f})", flush=True)
    llm.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="moonlight-16b-a3b")
    p.add_argument("--part", choices=["all", "ours", "peer"], default="all")
    p.add_argument("--pdl", action="store_true", help="kernel_config.pdl: programmatic dependent launch")
    p.add_argument("--out", default="out/mla_1gpu")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ours_json = os.path.join(a.out, "ours.json")
    if a.part == "ours":
        result = ours(a)
        with open(ours_json, "w") as f:
            json.dump(result, f, indent=2)
        return
    summary = {"scenario": "mla-1gpu"}
    if a.part == "all":
        subprocess.run([sys.executable, __file__, "--part", "ours", "--model", a.model, "--out", a.out]
                       + ["--pdl"] * a.pdl, check=False)
    if os.path.exists(ours_json) and os.path.getsize(ours_json):
        summary["ours"] = json.load(open(ours_json))
    if a.part in ("all", "peer"):
        peer_dir = os.path.join(a.out, "peer")
        subprocess.run([sys.executable, str(Path(__file__).parent / "peer_transformers.py"), a.model,
                        "--batches", "1,64", "--new-tokens", "8", "--out", peer_dir], check=False)
        path = os.path.join(peer_dir, "peer_transformers.json")
        if os.path.exists(path):
            summary["peer"] = json.load(open(path))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    o = summary.get("ours")
    if o:
        print(f"\nmla-1gpu: {a.model}")
        for key in ("decode_b1", "decode_b64"):
            r = o[key]
            print(f"{key:>12}: worst {r['ms_per_step_worst']:.2f} ms/step, floor {r['floor_ms']:.2f}, "
                  f"ratio {r['ms_per_step_worst'] / r['floor_ms']:.2f}")
        r = o["prefill_8k"]
        print(f"{'prefill_8k':>12}: worst {r['ms_worst']:.0f} ms, floor {r['floor_ms']:.0f}")
    for r in (summary.get("peer") or {}).get("rows", []):
        print(f"transformers batch {r['batch']}: {r['ms_per_step']:.1f} ms/step, {r['output_tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()

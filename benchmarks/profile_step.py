#!/usr/bin/env python
"""Where a generate() run spends its time: wraps the engine's stages with timers (synchronizing
the GPU around device stages) and prints a breakdown, then a torch.profiler table of a few steps.

    python benchmarks/profile_step.py qwen3-0.6b --num-requests 256 --input-len 128 --output-len 128
"""
import argparse
import collections
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TIMES = collections.defaultdict(float)
COUNTS = collections.Counter()


def timed(obj, name, label, sync=False):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            TIMES[label] += time.perf_counter() - t
            COUNTS[label] += 1
    setattr(obj, name, wrapper)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-batch-size", type=int, default=None, help="the engine's max_batch_size (default: its own)")
    p.add_argument("--torch-profile", action="store_true")
    args = p.parse_args()
    from meshserve import LLM, SamplingParams
    from meshserve.engine.scheduler import Scheduler
    from meshserve.layers.sampler import Sampler
    from meshserve.worker import cuda_graph, input_batch, model_runner

    extra = {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}
    llm = LLM(args.model, load_format="dummy", dtype=args.dtype, show_progress=False, **extra)
    runner = llm._core.executor.runner
    timed(Scheduler, "schedule", "scheduler.schedule")
    timed(Scheduler, "update_from_output", "scheduler.update")
    timed(input_batch.InputBatch, "prepare", "inputs.prepare")
    timed(input_batch.InputBatch, "sampling_batch", "inputs.sampling_batch")
    timed(Sampler, "__call__", "sampler (sync)", sync=True)
    timed(cuda_graph.CudaGraphRunner, "run", "graph replay (sync)", sync=True)
    timed(runner.model, "forward", "eager forward (sync)", sync=True)
    timed(model_runner.ModelRunner, "execute", "runner.execute")
    vocab = llm._core.limits.vocab_size
    prompts = [[(i * 31 + j) % (vocab - 10) + 5 for j in range(args.input_len)] for i in range(args.num_requests)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    TIMES.clear()
    COUNTS.clear()
    t0 = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    print(f"\n{args.model}: {args.num_requests} x {args.input_len} in / {args.output_len} out: {wall:.2f} s, "
          f"{args.num_requests * args.output_len / wall:.0f} output tok/s")
    print(f"{'stage':<28}{'total s':>9}{'calls':>7}{'ms/call':>9}{'% wall':>8}")
    for k, v in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"{k:<28}{v:>9.3f}{COUNTS[k]:>7}{1000 * v / COUNTS[k]:>9.3f}{100 * v / wall:>7.1f}%")
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts[:64], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    llm.shutdown()


if __name__ == "__main__":
    main()

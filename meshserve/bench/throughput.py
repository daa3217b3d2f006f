"""`meshserve bench throughput`: offline generation speed through `meshserve.LLM`.

Builds token-id prompts (random ids, or a dataset file tokenized with the model's tokenizer),
hands them all to `LLM.generate` at once with `ignore_eos` so output lengths are fixed, and reports
requests/s and tokens/s, plus per-request latency when the outputs carry timestamps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import datetime
from typing import Any, Optional, Sequence

import numpy as np

from meshserve.bench import datasets
from meshserve.models import shapes
from meshserve.models.resolve import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model folder, .gguf file, hub id, or a shape name (llama-3.1-8b, qwen3-0.6b, ...) with "
                             "--load-format dummy (default: the embedded SmolLM2-135M-Instruct)")
    datasets.add_dataset_args(parser)
    parser.add_argument("--num-requests", "--num-prompts", type=int, default=1000)
    parser.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pp-size", "--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--load-format", default=None, help="e.g. dummy for random weights")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantization", default=None, help="fp8: linear weights in FP8, quantised at load")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-num-tokens", type=int, default=None)
    parser.add_argument("--result-json", default=None)
    parser.add_argument("--disable-tqdm", action="store_true")


def model_for_llm(args: argparse.Namespace) -> Optional[str]:
    """What `LLM(model=...)` gets: with random weights a shape's name or the hub id it stands for
    (meta-llama/Llama-3.1-8B, ...) becomes the shape's folder and downloads nothing; anything else
    goes as given, and LLM resolves it as `meshserve serve` does (None: the embedded model)."""
    if args.load_format == "dummy" and args.model is not None and shapes.canonical_name(args.model):
        return shapes.resolve_model(args.model)
    return args.model


def build_llm(args: argparse.Namespace, model_path: Optional[str]):
    """The one place that constructs the offline engine; options left unset keep its defaults."""
    from meshserve import LLM

    optional = {"load_format": args.load_format, "dtype": args.dtype, "quantization": args.quantization,
                "max_batch_size": args.max_batch_size, "max_num_tokens": args.max_num_tokens}
    return LLM(model=model_path, tensor_parallel_size=args.tp_size, pipeline_parallel_size=args.pp_size,
               **{k: v for k, v in optional.items() if v is not None})


def _vocab_size(llm: Any, model_path: str) -> int:
    tokenizer = getattr(llm, "tokenizer", None)
    if tokenizer is not None:
        try:
            return len(tokenizer)
        except TypeError:
            pass
    config_path = os.path.join(model_path, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            return int(json.load(f)["vocab_size"])
    raise RuntimeError(f"cannot tell the vocabulary size of {model_path}: the LLM has no tokenizer "
                       "and there is no config.json")


def build_prompts(args: argparse.Namespace, llm: Any, model_path: str) -> tuple[list[list[int]], list[int]]:
    """Token-id prompts and their output lengths."""
    num = args.num_requests
    if args.dataset == "random":
        rng = np.random.default_rng(args.seed)
        in_lens = datasets.sample_lengths(num, args.input_len, args.range_ratio, rng)
        out_len = args.output_len if args.output_len is not None else 128
        out_lens = datasets.sample_lengths(num, out_len, args.range_ratio, rng)
        vocab = _vocab_size(llm, model_path)
        prompts = [rng.integers(0, vocab, size=int(n)).tolist() for n in in_lens]
        return prompts, [int(o) for o in out_lens]
    tokenizer = getattr(llm, "tokenizer", None) or datasets.load_tokenizer(args.tokenizer or model_path)
    if tokenizer is None:
        raise RuntimeError(f"--dataset {args.dataset} needs a tokenizer; pass --tokenizer")
    samples = datasets.build_samples(args, tokenizer, num)
    return [tokenizer.encode(s.prompt) for s in samples], [s.output_len for s in samples]


def _metric(metrics: Any, name: str) -> Optional[float]:
    value = metrics.get(name) if isinstance(metrics, dict) else getattr(metrics, name, None)
    return float(value) if isinstance(value, (int, float)) else None


def request_latencies(outputs: Sequence[Any]) -> dict[str, list[float]]:
    """Per-request e2e and TTFT (s) from `RequestOutput.metrics` timestamps, where present."""
    e2e, ttft = [], []
    for out in outputs:
        metrics = getattr(out, "metrics", None)
        if metrics is None:
            continue
        arrival = _metric(metrics, "arrival_time")
        finished = _metric(metrics, "finished_time") or _metric(metrics, "last_token_time")
        first = _metric(metrics, "first_token_time")
        if arrival is not None and finished is not None:
            e2e.append(finished - arrival)
        if arrival is not None and first is not None:
            ttft.append(first - arrival)
    return {"e2el": e2e, "ttft": ttft}


def summarize(outputs: Sequence[Any], prompts: Sequence[Sequence[int]], elapsed_s: float) -> dict:
    num_input = sum(len(p) for p in prompts)
    num_output = sum(len(out.outputs[0].token_ids) for out in outputs)
    result = {
        "elapsed_time": elapsed_s,
        "num_requests": len(outputs),
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "total_num_tokens": num_input + num_output,
        "requests_per_second": len(outputs) / elapsed_s,
        "output_throughput": num_output / elapsed_s,
        "tokens_per_second": (num_input + num_output) / elapsed_s,
    }
    for name, values in request_latencies(outputs).items():
        if values:
            ms = np.asarray(values) * 1000.0
            result.update({f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                           f"p99_{name}_ms": float(np.percentile(ms, 99))})
    return result


def format_report(result: dict) -> str:
    rows = [("Requests", result["num_requests"]), ("Elapsed (s)", result["elapsed_time"]),
            ("Total input tokens", result["total_input_tokens"]),
            ("Total output tokens", result["total_output_tokens"]),
            ("Request throughput (req/s)", result["requests_per_second"]),
            ("Output token throughput (tok/s)", result["output_throughput"]),
            ("Total token throughput (tok/s)", result["tokens_per_second"])]
    for name, title in (("e2el", "E2E latency"), ("ttft", "TTFT")):
        for stat in ("mean", "median", "p99"):
            key = f"{stat}_{name}_ms"
            if key in result:
                rows.append((f"{stat.capitalize()} {title} (ms)", result[key]))
    lines = ["{s:{c}^{n}}".format(s=" Offline Throughput Result ", n=50, c="=")]
    for label, value in rows:
        lines.append(f"{label + ':':<40} {value:<10.2f}" if isinstance(value, float) else f"{label + ':':<40} {value}")
    lines.append("=" * 50)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    from meshserve import SamplingParams

    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    datasets.check_dataset_args(args)
    model = model_for_llm(args)
    try:
        llm = build_llm(args, model)
    except (ValueError, FileNotFoundError) as e:  # what the user asked for cannot run: one line, no traceback
        raise SystemExit(f"meshserve bench throughput: error: {e}") from None
    model_path = getattr(llm, "model_path", None) or model
    prompts, out_lens = build_prompts(args, llm, model_path)
    print(f"bench throughput: {len(prompts)} requests, prompt tokens {min(map(len, prompts))}-"
          f"{max(map(len, prompts))}, output tokens {min(out_lens)}-{max(out_lens)}", flush=True)
    if len(set(out_lens)) == 1:
        params: Any = SamplingParams(max_tokens=out_lens[0], ignore_eos=True, temperature=0)
    else:
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in out_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "model_id": args.model or DEFAULT_MODEL_NAME,
              "model_path": model_path, "tp_size": args.tp_size, "pp_size": args.pp_size,
              "load_format": args.load_format, "dtype": args.dtype, "quantization": args.quantization,
              "dataset": args.dataset,
              **summarize(outputs, prompts, elapsed)}
    print(format_report(result), flush=True)
    if args.result_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_json)), exist_ok=True)
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {args.result_json}")
    return result

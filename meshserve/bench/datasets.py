"""Benchmark requests: random prompts of exact token lengths, ShareGPT files, JSONL prompt files.

Every builder returns a list of `Sample` (prompt text, prompt_len, output_len); serve.py sends them
over HTTP and throughput.py tokenizes them for the offline API. Lengths count tokens of the served
model's tokenizer, including the special tokens it adds (BOS), as the server will see them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DATASETS = ("random", "sharegpt", "jsonl")

# Common English words, each a single token in most BPE vocabularies (the no-tokenizer fallback).
_WORDS = ("the of and to in is for on that with as was at by it from be this are or an have not "
          "but had his they you were her she all one their there been has more when will would who "
          "so no if out up what about which can them some time into than its only other new over "
          "also two may any these first then do use way well year make day most back after work").split()


@dataclass
class Sample:
    prompt: str
    prompt_len: int
    output_len: int


def add_dataset_args(parser: argparse.ArgumentParser, default_num: int = 1000) -> None:
    parser.add_argument("--dataset", "--dataset-name", default="random", choices=DATASETS,
                        help="where prompts come from")
    parser.add_argument("--dataset-path", default=None, help="file for sharegpt / jsonl")
    parser.add_argument("--input-len", "--random-input-len", type=int, default=1024,
                        help="random: prompt tokens (center of the range with --range-ratio)")
    parser.add_argument("--output-len", "--random-output-len", type=int, default=None,
                        help="output tokens (random: default 128; sharegpt/jsonl: overrides the file)")
    parser.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer path or name (default: the model's); a shape name works too")


def check_dataset_args(args: argparse.Namespace) -> None:
    """add_dataset_args' values that cannot be honoured, as a ValueError naming the flag, before a model
    loads or a server is asked anything."""
    if args.input_len < 1:
        raise ValueError(f"--input-len {args.input_len}: must be >= 1")
    if args.output_len is not None and args.output_len < 1:
        raise ValueError(f"--output-len {args.output_len}: must be >= 1")
    if not 0.0 <= args.range_ratio < 1.0:
        raise ValueError(f"--range-ratio {args.range_ratio}: must be in [0, 1)")
    if args.dataset != "random":
        _require_dataset_path(args)


def _require_dataset_path(args: argparse.Namespace) -> None:
    if not args.dataset_path or not os.path.isfile(args.dataset_path):
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path to an existing file, "
                         f"got {args.dataset_path!r}")


def sample_lengths(num: int, length: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """`num` integers uniform in [round(length*(1-r)), round(length*(1+r))], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    low = max(1, round(length * (1.0 - range_ratio)))
    high = max(low, round(length * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=num)


def load_tokenizer(name: Optional[str], trust_remote_code: bool = False):
    """A HF tokenizer for `name` (path, hub id or shape name), or None with a warning."""
    if not name:
        return None
    from transformers import AutoTokenizer

    from meshserve.bench.shapes import resolve_model
    try:
        return AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer", reported below
        logger.warning("No tokenizer for %r (%s: %s); prompt lengths will be approximate word counts",
                       name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _exact_prompt(tokenizer, target: int, rng: np.random.Generator, pool: np.ndarray,
                  max_attempts: int = 4, max_rounds: int = 16) -> tuple[str, int]:
    """Text of random tokens that re-encodes to exactly `target` tokens.

    Decoding and re-encoding changes the count (pieces merge or split at the seams), so trim or
    top up with more random ids until the count settles. A cut through a multi-byte character
    decodes to U+FFFD, which re-encodes longer, so each overshoot cuts one token deeper; the rare
    draw that still oscillates is thrown away and redrawn. Returns the last count if none settles.
    """
    text, count = "", 0
    for _ in range(max_attempts):
        ids, overshoots = rng.choice(pool, target).tolist(), 0
        for _ in range(max_rounds):
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            encoded = tokenizer.encode(text, add_special_tokens=False)
            count = len(encoded)
            if count == target:
                return text, count
            if count > target:
                ids = encoded[:max(1, target - overshoots)]
                overshoots += 1
            else:
                ids = encoded + rng.choice(pool, target - count).tolist()
    return text, count


def random_samples(tokenizer, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[Sample]:
    """Prompts of random tokens; with a tokenizer each has exactly its drawn number of tokens."""
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(num, input_len, range_ratio, rng)
    out_lens = sample_lengths(num, output_len, range_ratio, rng)
    if tokenizer is None:
        logger.warning("No tokenizer: random prompts are common English words, about one token each; "
                       "prompt_len is the word count, not an exact token count")
        return [Sample(" ".join(rng.choice(_WORDS, int(n)).tolist()), int(n), int(o))
                for n, o in zip(in_lens, out_lens)]
    num_added = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    specials = _special_ids(tokenizer)
    pool = np.array([i for i in range(len(tokenizer)) if i not in specials])
    samples, inexact = [], 0
    for n, o in zip(in_lens, out_lens):
        target = max(1, int(n) - num_added)
        text, count = _exact_prompt(tokenizer, target, rng, pool)
        inexact += count != target
        samples.append(Sample(text, count + num_added, int(o)))
    if inexact:
        logger.warning("%d of %d random prompts could not be made exactly the asked length; "
                       "their prompt_len is the measured one", inexact, num)
    return samples


def _count_tokens(tokenizer, text: str, add_special_tokens: bool = True) -> int:
    """Prompts count the BOS the server adds; outputs don't."""
    if tokenizer is None:
        return max(1, round(len(text.split()) * 1.3))  # rough tokens-per-word of English BPEs
    return len(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _take(samples: list[Sample], num: int, source: str, rng: Optional[np.random.Generator] = None) -> list[Sample]:
    """`num` samples, shuffled when `rng` is given, cycling through them if the file holds fewer."""
    if not samples:
        raise ValueError(f"{source} holds no usable samples")
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    if num > len(samples):
        logger.info("%s has %d samples; reusing them to make %d requests", source, len(samples), num)
        order = np.resize(order, num)
    return [samples[i] for i in order[:num]]


def sharegpt_samples(path: str, tokenizer, num: int, output_len: Optional[int] = None,
                     seed: int = 0) -> list[Sample]:
    """First human turn as the prompt; the following gpt turn's length as output_len."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'conversations': [...]}} entries")
    if tokenizer is None:
        logger.warning("No tokenizer: ShareGPT token counts are estimated from word counts")
    samples: list[Sample] = []
    for entry in data:
        turns = entry.get("conversations") or entry.get("conversation") or []
        human = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
        if human is None:
            continue
        prompt = turns[human].get("value", "")
        reply = next((t.get("value", "") for t in turns[human + 1:] if t.get("from") in ("gpt", "assistant")), None)
        if output_len is None and reply is None:
            continue
        prompt_len = _count_tokens(tokenizer, prompt)
        out_len = output_len if output_len is not None else _count_tokens(tokenizer, reply, False)
        # Like vLLM: drop degenerate pairs whose lengths would say nothing about speed.
        if prompt_len < 4 or out_len < (1 if output_len is not None else 4):
            continue
        samples.append(Sample(prompt, prompt_len, out_len))
    return _take(samples, num, path, np.random.default_rng(seed))


def jsonl_samples(path: str, tokenizer, num: int, output_len: Optional[int] = None) -> list[Sample]:
    """Lines of {"prompt": str, "output_len": int (optional)} in file order; --output-len overrides."""
    samples: list[Sample] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row: dict[str, Any] = json.loads(line)
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' string") from None
            out_len = output_len if output_len is not None else row.get("output_len")
            if out_len is None:
                raise ValueError(f"{path}:{lineno}: no 'output_len' in the line and no --output-len given")
            samples.append(Sample(prompt, _count_tokens(tokenizer, prompt), int(out_len)))
    return _take(samples, num, path)


def build_samples(args: argparse.Namespace, tokenizer, num: int) -> list[Sample]:
    """The requests that the parsed dataset flags ask for."""
    if args.dataset == "random":
        out_len = args.output_len if args.output_len is not None else 128
        return random_samples(tokenizer, num, args.input_len, out_len, args.range_ratio, args.seed)
    _require_dataset_path(args)
    if args.dataset == "sharegpt":
        return sharegpt_samples(args.dataset_path, tokenizer, num, args.output_len, args.seed)
    return jsonl_samples(args.dataset_path, tokenizer, num, args.output_len)


def describe(samples: Sequence[Sample]) -> str:
    ins = [s.prompt_len for s in samples]
    outs = [s.output_len for s in samples]
    return (f"{len(samples)} requests, prompt tokens {min(ins)}-{max(ins)} (mean {np.mean(ins):.0f}), "
            f"output tokens {min(outs)}-{max(outs)} (mean {np.mean(outs):.0f})")

"""Exact tokenization of long prompts across several cores.

An 8k-token prompt takes a fast tokenizer 15-20 ms on one core (the CI machine), all of it before
the request reaches the engine, so it lands in TTFT. Byte-level BPE tokenizers (Llama 3, Qwen2/3,
SmolLM2, GPT-2) tokenize each pre-token on its own, and their pre-tokenizer regexes always end a
pre-token before a space that follows a non-space character. Cutting the text at such spaces and
encoding the pieces with `encode_batch` (the Rust library's thread pool) gives the same ids as one
`encode` call. The cut is safe only for pre-tokenizers whose regex we know; every other tokenizer,
and every short text, takes the plain `tokenizer.encode`.
"""
from __future__ import annotations

import json
import os
from typing import Optional

# Split patterns (Sequence[Split, ByteLevel(use_regex=False)]) for which the cut rule is proven: no
# alternative matches a space after a non-space character, and the only lookahead, `\s+(?!\S)`,
# matches whitespace, which a piece never ends with. ByteLevel(use_regex=True) is GPT-2's regex,
# for which the same holds.
_KNOWN_SPLITS = {
    # Llama 3 / 3.1 / 3.2
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # Qwen2 / Qwen2.5 / Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
MIN_CHARS = 4096  # shorter texts take one encode call: the pieces would cost more than they save
PIECE_CHARS = 2048
_PROBE = "Hello world!  It's 2026:\n\tnumbers 12345, émigré naïve 東京 ... <end>\n\n  done "


def _byte_level_bpe(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        ok = pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", ())) == 2:
        split, level = pre["pretokenizers"]
        ok = (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
              and (split.get("pattern") or {}).get("Regex") in _KNOWN_SPLITS
              and level.get("type") == "ByteLevel" and not level.get("use_regex", True)
              and not level.get("add_prefix_space", False))
    else:
        ok = False
    norm = spec.get("normalizer")
    ok = ok and (norm is None or norm.get("type") == "NFC")
    ok = ok and (spec.get("model") or {}).get("type") == "BPE"
    # An added token that holds whitespace or strips it could straddle a cut.
    return ok and all(not any(c.isspace() for c in t["content"]) and not t.get("lstrip") and not t.get("rstrip")
                      for t in spec.get("added_tokens", ()))


class PromptEncoder:
    """`encode(text, add_special_tokens)` equal to `tokenizer.encode`, long texts on several cores."""

    def __init__(self, tokenizer, threads: Optional[int] = None):
        self.tokenizer = tokenizer
        self.threads = threads or _usable_cpus()
        self.backend = None
        self.prefix: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # TOKENIZERS_PARALLELISM=false makes encode_batch serial: the pieces would only cost.
        serial = os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "off", "no")
        if backend is None or self.threads < 2 or serial:
            return
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # noqa: BLE001 - a tokenizer we cannot inspect takes the plain path
            return
        if not _byte_level_bpe(spec):
            return
        # The wrapper must add nothing but a fixed prefix of special tokens to what the backend makes.
        plain = backend.encode(_PROBE, add_special_tokens=False).ids
        with_special = tokenizer.encode(_PROBE, add_special_tokens=True)
        if tokenizer.encode(_PROBE, add_special_tokens=False) != plain or with_special[-len(plain):] != plain:
            return
        self.prefix = with_special[:len(with_special) - len(plain)]
        self.backend = backend

    @property
    def parallel(self) -> bool:
        return self.backend is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.backend is None or len(text) < MIN_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        pieces = split_text(text, max(2, min(self.threads, len(text) // PIECE_CHARS)))
        ids = list(self.prefix) if add_special_tokens else []
        for enc in self.backend.encode_batch(pieces, add_special_tokens=False):
            ids.extend(enc.ids)
        return ids


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the CPUs this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def split_text(text: str, num_pieces: int) -> list[str]:
    """Cut `text` into about `num_pieces` pieces, each cut just before a space that follows a
    non-whitespace character (a pre-token boundary for the tokenizers above)."""
    cuts, start, n = [0], 0, len(text)
    for k in range(1, num_pieces):
        i = text.find(" ", max(start + 1, k * n // num_pieces))
        while i > 0 and text[i - 1].isspace():
            i = text.find(" ", i + 1)
        if i <= 0:
            break
        cuts.append(i)
        start = i
    cuts.append(n)
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]

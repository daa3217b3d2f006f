"""The `meshserve` command line: serve, bench, disaggregated."""
from __future__ import annotations

import argparse
import re

from meshserve.errors import nearest

# vLLM's spellings of what these commands name the TensorRT-LLM way: an unknown flag that is one of
# them is answered with ours (a suggestion, not an alias: --gpu-memory-utilization is a share of the
# whole GPU, ours of the memory left after the weights)
VLLM_FLAGS = {
    "--tensor-parallel-size": "--tp_size", "-tp": "--tp_size", "--pipeline-parallel-size": "--pp_size",
    "-pp": "--pp_size", "--max-model-len": "--max_seq_len", "--max-num-seqs": "--max_batch_size",
    "--max-num-batched-tokens": "--max_num_tokens", "--gpu-memory-utilization": "--kv_cache_free_gpu_memory_fraction",
    "--enable-expert-parallel": "--ep_size", "--save-result": "--result-json", "--result-filename": "--result-json",
}
# vLLM flags whose setting lives in the --config YAML here (or needs nothing): what to do instead
VLLM_SETTINGS = {
    "--block-size": "set kv_cache_config: {tokens_per_block: N} in the --config YAML",
    "--enforce-eager": "set cuda_graph_config: {enable: false} in the --config YAML",
    "--enable-prefix-caching": "nothing to set: prefix caching is on (kv_cache_config.enable_block_reuse)",
    "--no-enable-prefix-caching": "set kv_cache_config: {enable_block_reuse: false} in the --config YAML",
    "--enable-chunked-prefill": "nothing to set: chunked prefill is on (enable_chunked_prefill in the --config YAML)",
    "--no-enable-chunked-prefill": "set enable_chunked_prefill: false in the --config YAML",
    "--swap-space": "nothing to set: preempted requests are recomputed, not swapped to CPU memory",
    "--download-dir": "set HF_HUB_CACHE (or HF_HOME) to the Hugging Face cache folder",
    "--disable-log-requests": "nothing to set: this server does not log each request (--log_level warning quiets the rest)",
    "--backend": "bench serve talks OpenAI's API; --endpoint /v1/completions or /v1/chat/completions picks the route",
    "--percentile-metrics": "bench serve reports the percentiles of every metric; --percentiles picks which",
    "--data-parallel-size": "run one server per replica; --enable_attention_dp splits attention's requests over the "
                            "ranks of one server",
}


def suggest_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'; did you mean ...?' for the unknown flags among `unknown` that are close to one of the
    parser's (or are vLLM's name for it), else ''."""
    def norm(flag: str) -> str:
        return "--" + flag.lstrip("-").replace("-", "_")

    names = {}  # normalised spelling -> the flag as --help lists it first
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        for o in longs:
            names.setdefault(norm(o), longs[0])
    hints, notes = [], []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-"):
            continue
        setting = VLLM_SETTINGS.get(norm(flag).replace("_", "-"))
        if setting is not None:
            notes.append(f"{flag} (vLLM's): {setting}")
            continue
        ours = VLLM_FLAGS.get(flag) or VLLM_FLAGS.get(norm(flag).replace("_", "-"))
        if ours not in names.values():
            close = nearest(norm(flag), names) if len(flag.lstrip("-")) >= 3 else None  # "--x": too short
            ours = names.get(close)
        if ours is not None:
            hints.append(f"{ours} for {flag}")
    return (f"; did you mean {', '.join(hints)}?" if hints else "") + "".join(f"; {n}" for n in notes)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (a bad flag value, an unknown flag, a missing argument) are one
    line on stderr naming the flag and the value, exit status 2: no usage block (`--help` has it).
    An unknown flag close to a known one (or vLLM's name for one) gets a suggestion.
    Subparsers made by add_subparsers inherit the class."""

    def error(self, message: str):
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            message += suggest_flags(self, m.group(1).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

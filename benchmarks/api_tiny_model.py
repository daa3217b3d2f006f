#!/usr/bin/env python
"""Write a one-layer, width-32 model that keeps the llama-3.1-8b shape's tokenizer to the given
folder (default /tmp/meshserve_api_overhead_model) and print its path: an engine that costs next to
nothing, so a server benchmark measures the API server's text path (api_overhead.sh,
long_prompt_stall.sh)."""
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshserve.bench.shapes import resolve_model  # noqa: E402


def main(dst: str = "/tmp/meshserve_api_overhead_model") -> None:
    src = resolve_model("llama-3.1-8b")
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    print(dst)


if __name__ == "__main__":
    main(*sys.argv[1:])

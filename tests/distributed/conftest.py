import json
import os

import pytest

from helpers import build_checkpoint, hf_greedy, make_prompts

MAX_NEW = 8


@pytest.fixture(scope="session")
def tp_checkpoint(tmp_path_factory):
    """A tiny Llama whose vocab (322) is not a multiple of 4 and whose 2 kv heads are fewer than
    tp=4, with prompts.json and transformers' greedy ids beside it."""
    path = str(tmp_path_factory.mktemp("tp-llama"))
    hf = build_checkpoint(path, "llama", vocab_size=322, num_key_value_heads=2)
    prompts = make_prompts(6, 320, 15, seed=1)
    with open(os.path.join(path, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    return path, prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]

"""vLLM's generation_config="auto": the sampling fields of a model's generation_config.json are the
defaults of a call that gives no SamplingParams (LLM) or a request that leaves them out (server).
The reference is transformers' own generate, which reads the same file: greedy (temperature 0) with
its repetition_penalty and max_new_tokens. generation_config="vllm" ignores the file."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from helpers import build_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
GEN = {"temperature": 0.0, "repetition_penalty": 1.5, "max_new_tokens": 7, "top_k": 50}
PROMPT = [5, 17, 33, 90, 101, 7, 17, 33]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "tiny-gen")
    build_checkpoint(path, "llama", max_position_embeddings=512)
    with open(os.path.join(path, "generation_config.json")) as f:
        cfg = json.load(f)
    cfg.update(GEN)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def reference(model) -> list[int]:
    """transformers' generate with the file's settings (greedy: do_sample off), EOS left out."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                      do_sample=False, repetition_penalty=GEN["repetition_penalty"],
                      max_new_tokens=GEN["max_new_tokens"], eos_token_id=None, pad_token_id=0)
    ids = out[0, len(PROMPT):].tolist()
    plain = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                        do_sample=False, repetition_penalty=1.0, max_new_tokens=GEN["max_new_tokens"],
                        eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ids != plain  # the penalty changes this output, so the test sees whether it was applied
    return ids


def test_llm_without_sampling_params_takes_the_generation_config(model, reference):
    from meshserve import LLM
    llm = LLM(model=model, max_seq_len=256, max_batch_size=2)
    try:
        d = llm.get_default_sampling_params()
        assert (d.temperature, d.repetition_penalty, d.max_tokens, d.top_k) == (0.0, 1.5, 7, 50)
        out = llm.generate([{"prompt_token_ids": PROMPT}], use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()
    assert out.token_ids[:len(reference)] == reference[:len(out.token_ids)]  # an EOS may end it sooner
    assert len(out.token_ids) == len(reference) or out.finish_reason == "stop"


def test_vllm_mode_ignores_the_file(model):
    from meshserve import LLM, SamplingParams
    llm = LLM(model=model, max_seq_len=256, max_batch_size=2, generation_config="vllm")
    try:
        assert llm.get_default_sampling_params() == SamplingParams()
    finally:
        llm.shutdown()


def test_a_folder_without_a_generation_config_is_refused(tmp_path):
    from meshserve.config import build_llm_args
    with pytest.raises(ValueError, match="generation_config=.* expected 'auto'"):
        build_llm_args("LLM()", model="x", generation_config=str(tmp_path))


def test_the_server_takes_them_for_fields_a_request_leaves_out(model, reference):
    import httpx
    from serve_util import start_server
    srv = start_server(model, "--max_seq_len", "256")
    try:
        with httpx.Client(base_url=srv.base_url, headers=srv.headers, timeout=60) as http:
            body = {"model": "tiny-gen", "messages": [{"role": "user", "content": "hi there"}], "ignore_eos": True,
                    "return_token_ids": True}
            chat = http.post("/v1/chat/completions", json=body).json()
            assert chat["usage"]["completion_tokens"] == GEN["max_new_tokens"]  # max_new_tokens, not the context
            again = http.post("/v1/chat/completions", json=body).json()
            assert again["choices"][0]["token_ids"] == chat["choices"][0]["token_ids"]  # temperature 0: greedy
            comp = http.post("/v1/completions", json={"model": "tiny-gen", "prompt": PROMPT, "max_tokens": 7,
                                                      "ignore_eos": True, "return_token_ids": True}).json()
            assert comp["choices"][0]["token_ids"] == reference
    finally:
        srv.stop()

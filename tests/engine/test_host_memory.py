"""A CPU model whose weights exceed the host's available memory is refused before it loads, with one
line naming the bytes needed and the bytes available (instead of minutes of filling memory and a
rank killed by the kernel); what fits still loads."""
import subprocess
import sys
import time

import pytest
import torch

from helpers import build_checkpoint
from meshserve import LLM
from meshserve.config import LlmArgs
from meshserve.engine import setup
from meshserve.models.config import ModelConfig

KV = {"tokens_per_block": 4, "max_tokens": 256}


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3"])
def test_weight_bytes_equal_transformers_parameters(tmp_path, arch):
    """The estimate against transformers' own model of the checkpoint: its parameters' bytes, plus
    at most our rotary tables (buffers transformers does not count as parameters)."""
    hf = build_checkpoint(str(tmp_path), arch, tokenizer=False)
    ref = sum(p.numel() * p.element_size() for p in hf.parameters())  # fp32 (tied weights counted once)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    need = setup.model_weight_bytes(cfg, torch.float32)
    assert ref <= need <= ref + 2 * cfg.max_position_embeddings * 1024 * 4
    half = setup.model_weight_bytes(cfg, torch.bfloat16)  # the rotary tables stay float32
    assert ref // 2 <= half <= ref // 2 + 2 * cfg.max_position_embeddings * 1024 * 4 and half < need


def test_check_refuses_only_what_does_not_fit(tmp_path):
    build_checkpoint(str(tmp_path), "llama", tokenizer=False)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    args = LlmArgs(model=str(tmp_path), device="cpu", dtype="float32")
    need = setup.model_weight_bytes(cfg, torch.float32)
    cpu = torch.device("cpu")
    setup.check_host_memory(args, cfg, cpu, None, available=need)  # exactly enough: accepted
    with pytest.raises(ValueError, match=r"weights need .* MiB in float32 .* dtype='bfloat16'"):
        setup.check_host_memory(args, cfg, cpu, None, available=need - 1)
    bf16 = LlmArgs(model=str(tmp_path), device="cpu", dtype="bfloat16")
    half = setup.model_weight_bytes(cfg, torch.bfloat16)
    with pytest.raises(ValueError, match=r"in bfloat16 .*available \(MemAvailable\): choose a smaller model, or run"):
        setup.check_host_memory(bf16, cfg, cpu, None, available=half - 1)
    setup.check_host_memory(bf16, cfg, cpu, None, available=half)
    # not checked: GPUs (their own OOM error), Ray ranks (other nodes), no /proc/meminfo
    setup.check_host_memory(args, cfg, torch.device("cuda"), None, available=0)
    ray = LlmArgs(model=str(tmp_path), device="cpu", orchestrator_type="ray")
    setup.check_host_memory(ray, cfg, cpu, None, available=0)


def test_a_tensor_larger_than_the_host_can_map_is_the_same_refusal(tmp_path, monkeypatch):
    build_checkpoint(str(tmp_path), "llama", tokenizer=False)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    args = LlmArgs(model=str(tmp_path), device="cpu", dtype="float32")

    def too_big(*_):  # what torch's CPU allocator raises for one allocation over the overcommit limit
        torch.empty(2**62, dtype=torch.uint8)

    monkeypatch.setattr(setup, "model_weight_bytes", too_big)
    with pytest.raises(ValueError, match=r"do not fit this host's memory in float32: one of its tensors alone"):
        setup.check_host_memory(args, cfg, torch.device("cpu"), None, available=2**30)


def test_llm_refuses_before_loading_and_still_loads_what_fits(tmp_path, monkeypatch):
    build_checkpoint(str(tmp_path), "llama")
    monkeypatch.setattr(setup, "host_memory_available", lambda: 1024)
    with pytest.raises(ValueError, match=r"this host has 0.0 MiB of memory available"):
        LLM(str(tmp_path), show_progress=False, kv_cache_config=KV)
    with pytest.raises(ValueError, match=r"weights need"):  # spawned ranks: checked once, before spawning
        LLM(str(tmp_path), show_progress=False, kv_cache_config=KV, tensor_parallel_size=2)
    monkeypatch.undo()
    with LLM(str(tmp_path), show_progress=False, kv_cache_config=KV) as llm:
        assert llm.generate([[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids


def test_serve_refuses_a_70b_shape_on_this_host_in_seconds():
    """The real MemAvailable: Llama-3.1-70B's shape in float32 is 263 GiB, more than this machine has."""
    avail = setup.host_memory_available()
    assert avail is not None and avail < 263 * 2**30, "this test assumes a host with less than 263 GiB available"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "meshserve", "serve", "llama-3.1-70b", "--load_format", "dummy",
                        "--device", "cpu", "--port", "0"], capture_output=True, text=True, timeout=180)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "the model's weights need 262.9 GiB in float32" in err and "MemAvailable" in err, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 120

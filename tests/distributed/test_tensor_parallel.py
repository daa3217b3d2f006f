"""Tensor parallelism on CPU ranks (gloo): greedy ids at TP=2 and TP=4 equal TP=1 and transformers,
with ranks spawned by LLM, started by torchrun, and started by mpirun; a killed worker fails the
call within 10 s and leaves nothing running; invalid layouts are errors naming the numbers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import free_port
from helpers import build_checkpoint, hf_greedy, make_prompts

MAX_NEW = 8
from meshserve import LLM, SamplingParams
from meshserve.distributed.launch import local_mpirun

SCRIPT = os.path.join(os.path.dirname(__file__), "tp_script.py")
KV = {"tokens_per_block": 4, "max_tokens": 2048}
SP = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

ARCH_CASES = {
    "llama-vocab-322-kv2": ("llama", dict(vocab_size=322, num_key_value_heads=2)),
    "qwen2-bias-mqa": ("qwen2", dict(num_key_value_heads=1, vocab_size=323)),
    "qwen3-qk-norm-tied": ("qwen3", dict(tie_word_embeddings=True, vocab_size=321)),
    "mistral": ("mistral", dict(sliding_window=None)),
}


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_tp_matches_tp1_and_transformers(tmp_path, name):
    arch, overrides = ARCH_CASES[name]
    hf = build_checkpoint(str(tmp_path), arch, **overrides)
    prompts = make_prompts(6, 320, 15, seed=2)
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    for tp in (1, 2, 4):
        with LLM(str(tmp_path), tensor_parallel_size=tp, kv_cache_config=KV, show_progress=False) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        assert got == ref, f"tp={tp}"


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        env.pop(k, None)
    env.update(extra)
    return env


def test_torchrun_launch(tmp_path, tp_checkpoint):
    ckpt, _, ref = tp_checkpoint
    out = tmp_path / "out.json"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", SCRIPT, ckpt, str(out), "2"],
                   check=True, timeout=240, env=_env())
    assert json.loads(out.read_text()) == ref


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed (scripts/test.sh installs it)")
def test_mpirun_launch(tmp_path, tp_checkpoint):
    ckpt, _, ref = tp_checkpoint
    out = tmp_path / "out.json"
    port = free_port()
    cmd = local_mpirun() + ["-np", "4", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           sys.executable, SCRIPT, ckpt, str(out), "4"]
    subprocess.run(cmd, check=True, timeout=240, env=_env(PYTHONPATH=os.pathsep.join(sys.path)))
    assert json.loads(out.read_text()) == ref


def test_killed_worker_fails_fast_and_leaves_nothing(tp_checkpoint):
    ckpt = tp_checkpoint[0]
    llm = LLM(ckpt, tensor_parallel_size=2, kv_cache_config=KV, show_progress=False)
    workers = list(llm._core.executor.procs.values())
    killed_at = []

    def kill():
        time.sleep(0.5)
        killed_at.append(time.monotonic())
        os.kill(workers[0].pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    with pytest.raises(RuntimeError, match="rank 1"):
        llm.generate([[5] * 10] * 16, SamplingParams(max_tokens=240, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 10
    with pytest.raises(RuntimeError, match="failed earlier"):
        llm.generate([5, 6], SP, use_tqdm=False)
    llm.shutdown()
    time.sleep(0.5)
    assert all(not psutil.pid_exists(p.pid) or psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE
               for p in workers)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size=3 must divide num_attention_heads=4"),
    (dict(tensor_parallel_size=8), "tensor_parallel_size=8 must divide num_attention_heads=4"),
])
def test_invalid_layouts_name_the_numbers(tp_checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tp_checkpoint[0], show_progress=False, **kwargs)


def test_more_ranks_than_gpus_is_an_error(monkeypatch):
    import torch
    from meshserve.config import LlmArgs
    from meshserve.executor.multiproc import check_world

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="needs 4 GPUs, but only 2 are visible"):
        check_world(LlmArgs(tensor_parallel_size=4), "cuda", None, 4)


def test_one_rank_through_the_multiprocess_executor(tp_checkpoint):
    ckpt, prompts, ref = tp_checkpoint
    with LLM(ckpt, orchestrator_type="mp", kv_cache_config=KV, show_progress=False) as llm:
        assert type(llm._core.executor).__name__ == "MultiProcExecutor"
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert got == ref

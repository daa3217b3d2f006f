"""Start-up of spawned ranks: a script that builds LLM(tensor_parallel_size=N) at module level,
without the `__main__` guard, kills its spawned workers while they bootstrap; rank 0 must fail
within seconds with a message naming the guard instead of waiting in the rendezvous forever.
The same script with the guard runs (the control case, so the test can fail on the guard alone)."""
import os
import subprocess
import sys
import textwrap
import time

from helpers import build_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(tmp_path, body: str, timeout: float):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        env.pop(k, None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)
    return proc, time.monotonic() - t0


def test_module_level_llm_without_main_guard_fails_fast_naming_the_guard(tmp_path):
    ckpt = tmp_path / "ckpt"
    build_checkpoint(str(ckpt), "llama")
    proc, took = _run(tmp_path, f"""
        from meshserve import LLM
        llm = LLM({str(ckpt)!r}, tensor_parallel_size=2, show_progress=False,
                  kv_cache_config={{"tokens_per_block": 4, "max_tokens": 256}})
        print("generated", llm.generate([[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids)
    """, timeout=50)
    assert proc.returncode != 0
    assert "__main__" in proc.stderr and "worker rank 1 exited" in proc.stderr, proc.stderr[-3000:]
    # the children need a few seconds to import torch before they die; rank 0 must not wait longer
    assert took < 30, took


def test_same_script_with_main_guard_runs_and_its_log_level_reaches_the_workers(tmp_path):
    ckpt = tmp_path / "ckpt"
    build_checkpoint(str(ckpt), "llama")
    proc, _ = _run(tmp_path, f"""
        import logging
        from meshserve import LLM, SamplingParams
        if __name__ == "__main__":
            logging.basicConfig(level="DEBUG")
            llm = LLM({str(ckpt)!r}, tensor_parallel_size=2, show_progress=False,
                      kv_cache_config={{"tokens_per_block": 4, "max_tokens": 256}})
            out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
            print("generated", len(out[0].outputs[0].token_ids))
            llm.shutdown()
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 3" in proc.stdout
    # a debug line that only a worker rank logs, from its own process
    assert "[rank 1]: rank 1/2 joined gloo process group" in proc.stderr, proc.stderr[-3000:]


def test_a_script_that_never_shuts_its_llm_down_still_exits(tmp_path):
    """No shutdown() and no `with`: at exit the LLM's ranks are stopped before multiprocessing joins
    them (they wait for rank 0's next command, so that join alone would wait forever)."""
    ckpt = tmp_path / "ckpt"
    build_checkpoint(str(ckpt), "llama")
    proc, _ = _run(tmp_path, f"""
        from meshserve import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({str(ckpt)!r}, tensor_parallel_size=2, show_progress=False,
                      kv_cache_config={{"tokens_per_block": 4, "max_tokens": 256}})
            out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
            print("generated", len(out[0].outputs[0].token_ids))
    """, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 2" in proc.stdout

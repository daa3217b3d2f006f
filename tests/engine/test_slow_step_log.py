"""slow_step_ms (LLM keyword, serve --slow_step_ms) reaches the engine: at ~0 every step is slow and
one line names a step's shape; at 0 nothing is logged."""
import logging

import pytest

from helpers import build_checkpoint
from meshserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("slow"))
    build_checkpoint(path, "llama")
    return path


@pytest.mark.parametrize("slow_step_ms, logged", [(0.001, True), (0, False)])
def test_slow_step_threshold_is_the_engines_setting(ckpt, caplog, slow_step_ms, logged):
    with caplog.at_level(logging.INFO, logger="meshserve.engine.engine_core"):
        with LLM(ckpt, show_progress=False, kv_cache_config={"tokens_per_block": 4, "max_tokens": 256},
                 slow_step_ms=slow_step_ms) as llm:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if " took " in r.getMessage()]
    assert bool(lines) == logged, lines
    if logged:
        assert "sequences" in lines[0] and "tokens" in lines[0]

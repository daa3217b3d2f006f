"""Start-up failures are one line, never a traceback: `meshserve serve` prints the engine's (or a
worker rank's) error once and exits non-zero; LLM(...) raises one exception with that message.
A bug (an unexpected exception) is one line plus a hint; --log-level debug shows its traceback."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from serve_util import REPO

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK")}
ENV.update(PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), OMP_NUM_THREADS="1")
MISSING = "model.layers.1.mlp.down_proj.weight"  # a weight of the last layer: pipeline stage 1 only


def _copy(src: str, dst, edit_config=None) -> str:
    shutil.copytree(src, dst)
    if edit_config is not None:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return str(dst)


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory) -> dict:
    """Model folders that fail while starting, by name."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken")
    missing = _copy(tiny_model, root / "missing")
    weights = os.path.join(missing, "model.safetensors")
    tensors = load_file(weights)
    del tensors[MISSING]
    save_file(tensors, weights, metadata={"format": "pt"})
    bad_json = _copy(tiny_model, root / "bad-json")
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write("{not json")

    def odd_hidden(cfg):
        cfg.update(hidden_size=66)
        cfg.pop("head_dim", None)

    bad_tokenizer = _copy(tiny_model, root / "bad-tokenizer")
    with open(os.path.join(bad_tokenizer, "tokenizer.json"), "w") as f:
        f.write("{not json")
    return {"missing": missing, "bad_json": bad_json, "odd_hidden": _copy(tiny_model, root / "odd-hidden", odd_hidden),
            "bad_tokenizer": bad_tokenizer}


def serve(*argv: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve", "serve", *argv, "--port", "0"], capture_output=True,
                          text=True, env=env or ENV, timeout=timeout)


def the_error_line(r: subprocess.CompletedProcess) -> str:
    """The one `meshserve serve: error:` line; nothing else in stderr is an error or a traceback."""
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr, r.stderr[-3000:]
    # a progress bar ends with "\r" and its blank-out, on the line the next message starts
    lines = [line.split("\r")[-1] for line in r.stderr.splitlines()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("meshserve serve: error: "), r.stderr[-3000:]
    return errors[0]


def test_a_checkpoint_missing_a_tensor_is_one_line(broken):
    r = serve(broken["missing"])
    assert r.returncode == 1
    line = the_error_line(r)
    assert "the engine failed to start: Checkpoint " in line and MISSING in line and "lacks 1 weights" in line
    assert "ValueError" not in line


def test_a_tokenizer_that_cannot_load_is_one_line_and_stops_the_engine(broken):
    """The tokenizer loads while the engine process loads the model; when it cannot load, the engine
    process is stopped and the error names the folder (exit 2, as for other bad settings)."""
    import re

    import psutil

    r = serve(broken["bad_tokenizer"])
    assert r.returncode == 2, r.stderr[-3000:]
    line = the_error_line(r)
    assert line.startswith(f"meshserve serve: error: tokenizer {broken['bad_tokenizer']}: cannot load it: "), line
    started = re.findall(r"engine process (\d+) prestarted", r.stderr)  # started with the front, before the checks
    assert len(started) == 1, r.stderr[-3000:]
    for pid in map(int, started):  # the engine began loading beside the tokenizer, and is gone
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_a_kv_cache_that_does_not_fit_names_the_setting(tiny_model, tmp_path):
    config = tmp_path / "kv.yml"
    config.write_text("kv_cache_config:\n  cpu_kv_cache_gb: 0.0000001\n")
    r = serve(tiny_model, "--config", str(config))
    assert r.returncode == 1
    line = the_error_line(r)
    assert "no room for the KV cache: 0 blocks" in line and "kv_cache_config.cpu_kv_cache_gb=1e-07" in line, line


def test_a_worker_rank_that_fails_loading_is_reported_not_the_broken_collective(broken):
    # pipeline stage 1 (rank 1, a spawned process) holds the layer whose weight is missing; rank 0's
    # rendezvous breaks when it exits, and the user must see rank 1's reason
    r = serve(broken["missing"], "--pp_size", "2")
    assert r.returncode == 1
    line = the_error_line(r)
    assert "worker rank 1 failed while starting: Checkpoint " in line and MISSING in line, line
    assert "Connection" not in line and "gloo" not in line


@pytest.mark.parametrize("case,message", [
    ("bad_json", "config.json: not valid JSON: Expecting property name"),
    ("odd_hidden", "hidden_size=66 must be a multiple of num_attention_heads=4"),
])
def test_an_invalid_model_config_is_one_line(broken, case, message):
    r = serve(broken[case])
    assert r.returncode == 2
    assert message in the_error_line(r)


@pytest.fixture(scope="module")
def planted_bug_env(tmp_path_factory) -> dict:
    """A bug while sizing the KV cache, planted in every process of the run through sitecustomize."""
    folder = tmp_path_factory.mktemp("planted")
    (folder / "sitecustomize.py").write_text(
        "from meshserve.worker.model_runner import ModelRunner\n"
        "def broken(self, *args):\n"
        "    raise KeyError('planted bug')\n"
        "ModelRunner.available_kv_blocks = broken\n")
    return dict(ENV, PYTHONPATH=os.pathsep.join([str(folder), ENV["PYTHONPATH"]]))


def test_an_unexpected_exception_is_one_line_with_a_hint(tiny_model, planted_bug_env):
    r = serve(tiny_model, env=planted_bug_env)
    assert r.returncode == 1
    line = the_error_line(r)
    assert "the engine failed to start: KeyError: 'planted bug' (run with --log-level debug for the traceback)" in line


def test_debug_logging_shows_the_traceback_of_an_unexpected_exception(tiny_model, planted_bug_env):
    r = serve(tiny_model, "--log-level", "debug", env=planted_bug_env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "raise KeyError('planted bug')" in r.stderr


# ---- LLM(...) ------------------------------------------------------------------------------------------
def llm_error(capfd, model: str, **kwargs) -> BaseException:
    from meshserve import LLM

    with pytest.raises(Exception) as info:
        LLM(model, show_progress=False, **kwargs)
    err = info.value
    assert "\n" not in str(err) and err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    logged = capfd.readouterr().err  # worker ranks log to the inherited stderr
    assert "Traceback" not in logged and "ERROR" not in logged, logged[-3000:]
    return err


def test_llm_raises_one_exception_with_the_reason(broken, tiny_model, capfd):
    err = llm_error(capfd, broken["missing"])
    assert isinstance(err, ValueError) and MISSING in str(err)
    err = llm_error(capfd, tiny_model, kv_cache_config={"cpu_kv_cache_gb": 1e-7})
    assert isinstance(err, ValueError) and "kv_cache_config.cpu_kv_cache_gb=1e-07" in str(err)
    err = llm_error(capfd, broken["bad_json"])
    assert isinstance(err, ValueError) and "config.json: not valid JSON" in str(err)


def test_llm_reports_a_worker_ranks_startup_error(broken, capfd):
    logging.getLogger().setLevel(logging.WARNING)
    err = llm_error(capfd, broken["missing"], pipeline_parallel_size=2)
    assert isinstance(err, RuntimeError) and str(err).startswith("worker rank 1 failed while starting: Checkpoint ")
    assert MISSING in str(err)

"""What a new user hit first: the `meshserve-launch` entry point, `meshserve disaggregated -c`,
Hub ids such as TinyLlama/TinyLlama-1.1B-Chat-v1.0 (from a Hugging Face cache laid out here, offline),
one-line CLI errors, and a terminal free of slow-step, GC-pause and leaked-semaphore noise."""
from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys

import httpx
import pytest
import torch

from helpers import build_checkpoint, hf_greedy
from serve_util import REPO, free_port, start_server
from meshserve.commands import launch
from meshserve.commands import main as cli
from meshserve.commands import serve

REPO_ID = "tiny-org/tiny-chat"
REVISION = "89abcdef0123456789abcdef0123456789abcdef"
# the variables through which a launcher places a process; a test's child sees only those it sets
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(HF_HOME, snapshot folder, transformers model) for REPO_ID, cached as huggingface_hub does."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    model = build_checkpoint(str(snapshot), "llama", max_position_embeddings=2048)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return str(home), str(snapshot), model


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HOME", hub_cache[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return hub_cache


# ---- Hub ids ----------------------------------------------------------------------------------------
def test_llm_loads_a_hub_id_from_the_cache_offline(offline, tiny_tokenizer):
    from meshserve import LLM, SamplingParams

    _, snapshot, model = offline
    ids = tiny_tokenizer.encode("Paris is the capital of")
    with LLM(model=REPO_ID, tokenizer=REPO_ID, show_progress=False) as llm:
        assert llm.model_path == snapshot
        out = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        assert llm.tokenizer.encode("Paris is the capital of") == ids
    assert out[0].outputs[0].token_ids == hf_greedy(model, ids, 8)


def test_serve_loads_a_hub_id_from_the_cache_offline(offline, tiny_tokenizer):
    _, snapshot, model = offline
    srv = start_server(REPO_ID, api_key=None)  # the child inherits HF_HOME and HF_HUB_OFFLINE
    try:
        listed = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]
        assert (listed["id"], listed["root"]) == ("tiny-chat", snapshot)  # served as the seed's client names it
        ids = tiny_tokenizer.encode("Berlin is the capital of")
        r = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
            "model": "tiny-chat", "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": False})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tiny_tokenizer.decode(hf_greedy(model, ids, 6))
        assert "free_gpu_memory_fraction" not in srv.log_tail(400)  # left at its default: nothing to say
        # the full Hub id, as vLLM users send it, names the same model; another name is a 404
        r = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
            "model": REPO_ID, "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": False})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tiny_tokenizer.decode(hf_greedy(model, ids, 6))
        r = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={"model": "other/tiny-chat", "prompt": ids})
        assert r.status_code == 404 and "tiny-chat" in r.text
        # a route it does not serve names itself and the ones it does; a wrong method, the right one
        r = httpx.post(srv.base_url + "/v1/embeddings", timeout=10, json={"model": "tiny-chat", "input": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        msg = r.json()["error"]["message"]
        assert msg.startswith("POST /v1/embeddings is not served here") and "POST /v1/chat/completions" in msg
        r = httpx.get(srv.base_url + "/v1/completions", timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
        assert r.json()["error"]["message"] == "GET /v1/completions: method not allowed; /v1/completions takes POST"
    finally:
        srv.stop()


# ---- one-line CLI errors ----------------------------------------------------------------------------
def one_line_error(capsys, argv: list[str]) -> str:
    assert serve.main(serve.build_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("meshserve serve: error: "), err
    return err


def test_malformed_yaml_config_is_one_line_naming_the_place(tmp_path, capsys):
    bad = tmp_path / "config.yml"
    bad.write_text("kv_cache_config: [1, 2\nmax_batch_size: 8\n")
    err = one_line_error(capsys, ["--config", str(bad)])
    assert f"--config {bad}: not valid YAML" in err and "line 2" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_one_line(tiny_model, capsys):
    err = one_line_error(capsys, [tiny_model, "--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in err and "auto or cpu" in err


def test_a_shape_without_random_weights_is_one_line(capsys):
    err = one_line_error(capsys, ["llama-3.1-8b"])
    assert "benchmark shape" in err and "--load_format dummy" in err


@pytest.mark.parametrize("argv, hint", [
    (["m", "--tensor-parallel-size", "2"], "did you mean --tp_size for --tensor-parallel-size?"),  # vLLM's names
    (["m", "--max-model-len=4096", "-tp", "2"], "did you mean --max_seq_len for --max-model-len, --tp_size for -tp?"),
    (["m", "--gpu-memory-utilization", "0.9"], "did you mean --kv_cache_free_gpu_memory_fraction for"),
    (["m", "--moe_tensor_parallel_size", "2"], "did you mean --moe_tp_size for --moe_tensor_parallel_size?"),  # typos
    (["m", "--kv-cache-dtipe", "fp8"], "did you mean --kv_cache_dtype for --kv-cache-dtipe?"),
    (["m", "--x", "1"], None), (["m", "--frobnicate", "1"], None),  # nothing close: no suggestion
    (["m", "--block-size", "32"], "--block-size (vLLM's): set kv_cache_config: {tokens_per_block: N} in the --config"),
    (["m", "--enforce-eager"], "--enforce-eager (vLLM's): set cuda_graph_config: {enable: false} in the --config"),
])
def test_an_unknown_flag_gets_the_flag_it_is_close_to(capsys, argv, hint):
    with pytest.raises(SystemExit) as exc:
        serve.build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and err.startswith("meshserve serve: error: unrecognized arguments: ")
    assert (hint in err) if hint else ("did you mean" not in err), err
    assert err.endswith("(see meshserve serve --help)")


def test_every_yaml_setting_a_vllm_flag_points_at_exists():
    """The YAML each VLLM_SETTINGS hint says to set is taken by the engine's config as it is written."""
    import re

    import yaml

    from meshserve.commands import VLLM_SETTINGS
    from meshserve.config import build_llm_args
    snippets = [m.group(1) for hint in VLLM_SETTINGS.values() for m in [re.match(r"set (.*) in the --config YAML", hint)]
                if m]
    assert len(snippets) >= 4
    for snippet in snippets:
        build_llm_args(**yaml.safe_load(snippet.replace("N", "16")))  # raises on a key that does not exist


def test_an_uncached_hub_id_offline_is_one_line(offline, capsys):
    err = one_line_error(capsys, ["tiny-org/not-downloaded"])
    assert "'tiny-org/not-downloaded' is not in the Hugging Face cache at " in err
    assert os.path.join(offline[0], "hub", "models--tiny-org--not-downloaded") in err
    assert "HF_HUB_OFFLINE is set" in err


@pytest.mark.parametrize("model,message", [
    ("./no/such/model", "model './no/such/model': no such file or folder"),
    ("qwen3-0.6b", "needs load_format='dummy'"),
])
def test_bench_throughput_refuses_in_one_line_without_a_traceback(model, message):
    r = subprocess.run([sys.executable, "-m", "meshserve", "bench", "throughput", model, "--num-requests", "1"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_throughput_defaults_to_the_embedded_model(monkeypatch):
    import meshserve
    from meshserve.bench.throughput import model_for_llm

    created = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            created.update(kwargs)
            raise ValueError("stop here")

    monkeypatch.setattr(meshserve, "LLM", FakeLLM)
    args = cli.build_parser().parse_args(["bench", "throughput", "--num-requests", "2"])
    assert model_for_llm(args) is None
    with pytest.raises(SystemExit, match="meshserve bench throughput: error: stop here"):
        args.bench_main(args)
    assert "model" in created and created["model"] is None  # LLM(model=None): the embedded model


def test_free_gpu_memory_fraction_on_cpu_is_logged_as_ignored(tiny_model, caplog):
    from meshserve import LLM
    from meshserve.llmapi import KvCacheConfig

    with caplog.at_level(logging.WARNING, logger="meshserve.engine.setup"):
        LLM(model=tiny_model, device="cpu", show_progress=False).shutdown()
        assert not any("free_gpu_memory_fraction" in r.getMessage() for r in caplog.records)
        with LLM(model=tiny_model, device="cpu", show_progress=False,
                 kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5, cpu_kv_cache_gb=0.25)) as llm:
            kv_tokens = llm._core.limits.kv_capacity_tokens
    (line,) = [r.getMessage() for r in caplog.records if "free_gpu_memory_fraction" in r.getMessage()]
    assert line.startswith("kv_cache_config.free_gpu_memory_fraction=0.5 is ignored on cpu") and "0.25 GiB" in line
    assert kv_tokens > 0


# ---- entry points -----------------------------------------------------------------------------------
def test_every_console_script_names_a_function_that_exists():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"meshserve", "meshserve-launch"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_disaggregated_parses_the_seed_config_and_names_a_bad_key(tmp_path, capsys):
    from meshserve.disagg.orchestrator import load_config

    config = tmp_path / "disagg-config.yml"
    seed = ("hostname: localhost\nport: 8000\nbackend: pytorch\ncontext_servers:\n  num_instances: 1\n"
            "  urls:\n    - \"localhost:8001\"\ngeneration_servers:\n  num_instances: 1\n  urls:\n"
            "    - \"localhost:8003\"\n")
    config.write_text(seed)
    parsed = load_config(str(config))  # serving it is tests/disagg/test_orchestrator.py's business
    assert (parsed.hostname, parsed.port, parsed.context.urls, parsed.generation.urls) == (
        "localhost", 8000, ["localhost:8001"], ["localhost:8003"])
    config.write_text(seed + "max_retrys: 2\n")
    assert cli.main(["disaggregated", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"meshserve disaggregated: error: {config}: unknown key 'max_retrys' (did you mean 'max_retries'?); "
                                             f"accepted: hostname, port, backend, context_servers")
    assert cli.main(["disaggregated", "--config", str(tmp_path / "missing.yml")]) == 2
    assert capsys.readouterr().err.strip() == f"meshserve disaggregated: error: -c {tmp_path / 'missing.yml'}: no such file"


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("node1,node2", "node1"), ("gpu[03-04,7],cpu1", "gpu03"), ("n[1-2]-ib", "n1-ib"),
    ("rack[2-3]n[10-11]", "rack2n10"),
])
def test_launcher_takes_rank_0s_host_from_a_multi_node_slurm_step(nodelist, first):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": nodelist}
    assert launch.launch_env(env) == {"MASTER_ADDR": first}
    assert launch.launch_env({**env, "MASTER_ADDR": "10.0.0.1"}) == {}  # given: kept
    assert launch.launch_env({**env, "SLURM_STEP_NUM_NODES": "1"}) == {}  # one host: loopback works


def test_slurm_jobs_sharing_a_node_rendezvous_on_different_ports():
    """Without MASTER_PORT, two Slurm jobs (or two steps of one job) on one node must not both take
    29500; every task of one step must agree on the port; MASTER_PORT, when set, wins."""
    from meshserve.distributed.launch import detect_launch

    def port(**kw):
        env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", **kw}
        return detect_launch(env).master_port

    a, b = port(SLURM_JOB_ID="4242", SLURM_STEP_ID="0"), port(SLURM_JOB_ID="4243", SLURM_STEP_ID="0")
    assert a != b and 15000 <= min(a, b) and max(a, b) < 35000
    assert port(SLURM_JOB_ID="4242", SLURM_STEP_ID="1") != a  # a second srun step of the job
    assert port(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_LOCALID="0") == a  # rank 0 agrees
    assert port(SLURM_JOB_ID="4242", SLURM_STEP_ID="batch") == port(SLURM_JOB_ID="4242", SLURM_STEP_ID="0")
    assert port(SLURM_JOB_ID="4242", MASTER_PORT="31234") == 31234
    assert port() == 29500  # no job id: torchrun's default
    torchrun = detect_launch({"RANK": "1", "WORLD_SIZE": "2", "SLURM_JOB_ID": "4242"})
    assert torchrun.master_port == 29500  # torchrun inside a Slurm job keeps torchrun's default


def test_launcher_refuses_a_multi_host_mpi_job_without_master_addr():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(ValueError, match="mpirun -x MASTER_ADDR="):
        launch.launch_env(env)
    assert launch.launch_env({**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "16"}) == {}


def test_launcher_execs_the_command_with_the_rendezvous_set():
    env = child_env(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu[03-04]")
    code = "import os, sys; print(os.environ['MASTER_ADDR']); sys.exit(7)"
    r = subprocess.run([sys.executable, "-m", "meshserve.commands.launch", sys.executable, "-c", code],
                       capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode, r.stdout.split()[0]) == (7, "gpu03"), r.stderr  # its exit status is the command's
    r = subprocess.run([sys.executable, "-m", "meshserve.commands.launch"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("meshserve-launch: error: no command given")
    assert r.stderr.strip().count("\n") == 0
    r = subprocess.run([sys.executable, "-m", "meshserve.commands.launch", "no-such-command-here"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 127 and "cannot run 'no-such-command-here'" in r.stderr


_SCRIPT = """
import json, sys
from meshserve import LLM, SamplingParams

if __name__ == "__main__":
    print("SCRIPT-START", flush=True)
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    with LLM(model=sys.argv[1], tensor_parallel_size=2, show_progress=False, **extra) as llm:
        out = llm.generate([json.loads(sys.argv[2])], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    print("TOKENS", json.dumps(out[0].outputs[0].token_ids), flush=True)
"""


@pytest.mark.parametrize("every_rank", [False, True], ids=["rank0-runs-the-script", "every-rank"])
def test_two_slurm_ranks_under_the_launcher_generate_what_transformers_does(tiny_model, tiny_tokenizer, tmp_path,
                                                                           every_rank):
    """srun -N 2 -n 2 meshserve-launch python script.py, emulated: each rank gets Slurm's variables
    and no MASTER_ADDR; the launcher finds rank 0's host in the node list, rank 0 runs the engine and
    rank 1 serves it: without running the script at all (it takes the job from rank 0's store, as
    trtllm-llmapi-launch's workers do), or with --every-rank after running it up to LLM(). Greedy
    tokens equal transformers on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    script = tmp_path / "generate.py"
    script.write_text(_SCRIPT)
    ids = tiny_tokenizer.encode("Paris is the capital of")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = child_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="2",
                        SLURM_STEP_NODELIST="localhost,localhost", MASTER_PORT=port)
        flag = ["--every-rank"] if every_rank else []
        procs.append(subprocess.Popen([sys.executable, "-m", "meshserve.commands.launch", *flag, sys.executable,
                                       str(script), tiny_model, json.dumps(ids)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "TOKENS" not in outs[1][0]  # rank 1 served rank 0's engine and never ran past LLM()
    assert "SCRIPT-START" in outs[0][0] and ("SCRIPT-START" in outs[1][0]) == every_rank
    tokens = json.loads(outs[0][0].split("TOKENS", 1)[1])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    assert tokens == hf_greedy(model, ids, 6)


def test_a_slow_busy_run_keeps_the_terminal_quiet(tiny_model, tmp_path):
    """Every step "slow" and every collection "long" (thresholds near 0), two spawned ranks, no
    logging configured (as examples/quickstart.py): stderr holds no slow-step or GC-pause line and
    no leaked-semaphore warning at exit."""
    script = tmp_path / "quiet.py"
    script.write_text(_SCRIPT)
    env = child_env(MESHSERVE_GC_WARN_MS="0.001")
    r = subprocess.run([sys.executable, str(script), tiny_model, "[5, 6, 7, 8]", '{"slow_step_ms": 0.001}'],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0 and "TOKENS" in r.stdout, r.stderr[-2000:]
    for noise in ("took", "garbage collection", "leaked semaphore", "Traceback"):
        assert noise not in r.stderr, r.stderr[-2000:]


def test_a_launched_job_description_signed_with_another_secret_is_refused():
    """Ranks that skip the command take the job from rank 0's store: with MESHSERVE_SECRET set, one
    signed with another key (or tampered with) is an error, not a job."""
    import torch.distributed as dist
    from meshserve.worker.main import fetch_launch_spec, publish_launch_spec

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    publish_launch_spec(store, {"tensor_parallel_size": 2}, "/models/x", "secret-a")
    assert fetch_launch_spec(store, "secret-a") == ({"tensor_parallel_size": 2}, "/models/x")
    with pytest.raises(RuntimeError, match="set the same MESHSERVE_SECRET on every rank"):
        fetch_launch_spec(store, "secret-b")

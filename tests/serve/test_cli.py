"""`meshserve serve` flags and YAML onto LlmArgs: the seed's trtllm-serve examples, both flag
spellings, unknown keys, parallel flags that have not landed, and the entry points."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from serve_util import REPO
from meshserve.commands import serve
from meshserve.commands.serve import build_parser, llm_args_from_cli

ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def parse(*argv: str):
    return llm_args_from_cli(build_parser().parse_args(list(argv)))


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SEED_CONFIG = """enable_attention_dp: true
pytorch_backend_config:
  enable_overlap_scheduler: true
kv_cache_config:
  free_gpu_memory_fraction: 0.95
"""
SEED_CONTEXT_CONFIG = """disable_overlap_scheduler: true  # Not supported for context servers
cache_transceiver_config:
  backend: NIXL  # or UCX, MPI
  max_tokens_in_buffer: 8192
"""
SEED_ATTENTION_DP = """enable_attention_dp: true
attention_dp_config:
  enable_balance: true
  timeout_iters: 10
  batching_wait_iters: 5
"""


def test_seed_examples_map_onto_llm_args(tmp_path):
    args = parse("meta-llama/Llama-3.1-70B-Instruct", "--tp_size", "4", "--max_batch_size", "128",
                 "--max_num_tokens", "16384", "--kv_cache_free_gpu_memory_fraction", "0.95")
    assert (args.model, args.tensor_parallel_size, args.max_batch_size, args.max_num_tokens) == \
        ("meta-llama/Llama-3.1-70B-Instruct", 4, 128, 16384)
    assert args.kv_cache_config.free_gpu_memory_fraction == 0.95

    cfg = write(tmp_path, "config.yml", SEED_CONFIG)
    args = parse("meta-llama/Llama-3.1-405B-Instruct", "--tp_size", "4", "--pp_size", "2", "--max_batch_size", "64",
                 "--config", cfg)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.max_batch_size) == (4, 2, 64)
    assert args.enable_attention_dp and args.pytorch_backend_config.enable_overlap_scheduler
    assert args.kv_cache_config.free_gpu_memory_fraction == 0.95

    args = parse("deepseek-ai/DeepSeek-V3", "--tp_size", "16", "--ep_size", "4", "--max_batch_size", "161",
                 "--config", cfg)
    assert (args.tensor_parallel_size, args.moe_expert_parallel_size, args.max_batch_size) == (16, 4, 161)

    ctx = write(tmp_path, "context-config.yml", SEED_CONTEXT_CONFIG)
    ns = build_parser().parse_args(["TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--host", "localhost", "--port", "8001",
                                    "--backend", "pytorch", "--config", ctx])
    args = llm_args_from_cli(ns)
    assert (ns.host, ns.port, args.backend) == ("localhost", 8001, "pytorch")
    assert args.disable_overlap_scheduler and not args.overlap_scheduler
    assert args.cache_transceiver_config.backend == "NIXL"
    assert args.cache_transceiver_config.max_tokens_in_buffer == 8192

    args = parse("m", "--config", write(tmp_path, "adp.yml", SEED_ATTENTION_DP))
    assert args.attention_dp_config.enable_balance and args.attention_dp_config.timeout_iters == 10
    assert args.attention_dp_config.batching_wait_iters == 5


def test_dashed_and_underscored_flags_are_the_same(tmp_path):
    flags = [("tp_size", "2"), ("pp_size", "2"), ("ep_size", "2"), ("cp_size", "1"), ("max_batch_size", "7"),
             ("max_num_tokens", "99"), ("max_seq_len", "300"), ("kv_cache_free_gpu_memory_fraction", "0.5"),
             ("load_format", "dummy"), ("max_waiting_requests", "3"), ("moe_tp_size", "1"), ("slow_step_ms", "120")]
    under = [x for name, v in flags for x in (f"--{name}", v)]
    dashed = [x for name, v in flags for x in (f"--{name.replace('_', '-')}", v)]
    assert parse("m", *under, "--trust_remote_code") == parse("m", *dashed, "--trust-remote-code")
    assert parse("m", "--slow_step_ms", "120").slow_step_ms == 120.0
    a = build_parser().parse_args(["--served_model_name", "x", "--api_key", "k", "--extra_llm_api_options", "c"])
    b = build_parser().parse_args(["--served-model-name", "x", "--api-key", "k", "--config", "c"])
    assert (a.served_model_name, a.api_key, a.config) == (b.served_model_name, b.api_key, b.config) == ("x", "k", "c")


def test_flags_override_yaml_and_merge_nested_keys(tmp_path):
    cfg = write(tmp_path, "c.yml", "max_batch_size: 10\nkv_cache_config:\n  tokens_per_block: 16\n")
    args = parse("m", "--config", cfg, "--max-batch-size", "20", "--kv_cache_free_gpu_memory_fraction", "0.3")
    assert args.max_batch_size == 20
    assert args.kv_cache_config.tokens_per_block == 16 and args.kv_cache_config.free_gpu_memory_fraction == 0.3
    assert parse("m", "--config", cfg).max_batch_size == 10
    args = parse("m", "--config", cfg, "--kv-cache-dtype", "fp8", "--quantization", "fp8")
    assert args.kv_cache_config.dtype == "fp8" and args.kv_cache_config.tokens_per_block == 16
    assert args.quantization == "fp8"


@pytest.mark.parametrize("text,key,accepted", [
    ("enable_attention_dpp: true\n", "enable_attention_dpp", "enable_attention_dp"),
    ("kv_cache_config:\n  free_memory: 0.5\n", "kv_cache_config.free_memory", "free_gpu_memory_fraction"),
    ("pytorch_backend_config:\n  overlap: true\n", "pytorch_backend_config.overlap", "enable_overlap_scheduler"),
])
def test_unknown_yaml_key_is_an_error_naming_it_and_the_accepted_ones(tmp_path, text, key, accepted):
    with pytest.raises(ValueError) as e:
        parse("m", "--config", write(tmp_path, "bad.yml", text))
    assert repr(key) in str(e.value) and "accepted keys" in str(e.value) and accepted in str(e.value)


def test_a_yaml_key_given_twice_is_an_error_naming_it_and_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: the first value was accepted and silently ignored."""
    path = write(tmp_path, "dup.yml", "max_batch_size: 4\nkv_cache_config:\n  max_tokens: 64\n  max_tokens: 128\n")
    with pytest.raises(ValueError) as e:
        parse("m", "--config", path)
    assert str(e.value) == (f"--config {path}: not valid YAML: duplicate key 'max_tokens' (each key may be given "
                            f"once) at line 4, column 3")
    merged = write(tmp_path, "merge.yml", "base: &kv {max_tokens: 64, tokens_per_block: 8}\n")
    from meshserve.config import load_yaml_config  # a merge (`<<: *anchor`) may still override what it brings
    assert load_yaml_config(merged) == {"base": {"max_tokens": 64, "tokens_per_block": 8}}
    over = write(tmp_path, "over.yml", "x: &kv {max_tokens: 64, tokens_per_block: 8}\nkv_cache_config:\n"
                                       "  <<: *kv\n  max_tokens: 128\n")
    assert load_yaml_config(over)["kv_cache_config"] == {"max_tokens": 128, "tokens_per_block": 8}


@pytest.mark.parametrize("argv,message", [
    (["--backend", "tensorrt"], "backend"),
    (["--max_beam_width", "0"], "--max_beam_width 0: expected an integer >= 1"),
    (["--allow_credentials"], "--allow_credentials without --allowed_origins"),
    (["--allowed_headers", "x-a,x-b"], "--allowed_headers without --allowed_origins"),
    (["--max_batch_size", "0"], "max_batch_size"),
    (["--dtype", "int3"], "dtype"),
    (["--quantization", "awq"], "quantization='awq' is not supported; accepted: fp8"),
    (["--kv_cache_dtype", "fp4"], "kv_cache_config.dtype='fp4' is not supported; accepted: auto, fp8"),
    (["--config", "/nonexistent.yml"], "no such file"),
])
def test_bad_flag_values_are_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse("m", *argv)


def test_cli_error_exits_2_with_the_message(tmp_path):
    bad = write(tmp_path, "bad.yml", "max_batch_sizes: 3\n")
    r = subprocess.run([sys.executable, "-m", "meshserve", "serve", "--config", bad], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    assert "unknown key 'max_batch_sizes'" in r.stderr and "max_batch_size" in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["--cp_size", "8"], "context_parallel_size=8 must divide the 4 attention heads"),
    (["--ep-size", "2"], "moe_expert_parallel_size"),
    (["--tp_size", "3"], "tensor_parallel_size=3 must divide num_attention_heads=4"),
    (["--config", "mpi.yml"], "cache_transceiver_config.backend='MPI' cannot be used here"),  # not under mpirun
    # an address the KV endpoints cannot bind: was an OSError naming no field, after loading the model
    (["--config", "host.yml"], "cache_transceiver_config.host='no.such.host.invalid': the KV transfer endpoints "
                               "cannot listen there"),
    (["--config", "remote.yml"], "cache_transceiver_config.host='192.0.2.1': the KV transfer endpoints cannot "
                                 "listen there (Cannot assign requested address)"),
    # a timeout sockets cannot take: was accepted, then every pull failed with an OverflowError
    (["--config", "timeout.yml"], "cache_transceiver_config.kv_transfer_timeout_ms=100000000000000000000: Input "
                                  "should be less than or equal to 2147483647"),
    # CUDA IPC with CPU caches: was refused only once the engine had loaded the model (exit 1)
    (["--config", "ipc.yml"], "cache_transceiver_config.cuda_ipc=true: the CUDA IPC path moves GPU caches, and "
                              "this server's are on cpu; accepted here: auto or false"),
    (["--shutdown_timeout", "-1"], "--shutdown_timeout -1: expected a number of seconds >= 0"),
    (["--shutdown_timeout", "nan"], "--shutdown_timeout nan: expected a number of seconds >= 0"),
    (["--request_header_timeout", "0"], "--request_header_timeout 0: expected a number of seconds > 0"),
    (["--request_body_timeout", "-2"], "--request_body_timeout -2: expected a number of seconds > 0"),
    (["--request_header_timeout", "inf"], "--request_header_timeout inf: expected a number of seconds > 0"),
])
def test_parallel_layouts_the_engine_cannot_run_fail_before_starting(tiny_model, capsys, argv, message, tmp_path):
    argv = [str(tmp_path / a) if a.endswith(".yml") else a for a in argv]
    write(tmp_path, "context.yml", SEED_CONTEXT_CONFIG)
    write(tmp_path, "mpi.yml", "cache_transceiver_config:\n  backend: MPI\n")
    write(tmp_path, "host.yml", "cache_transceiver_config:\n  host: no.such.host.invalid\n")
    write(tmp_path, "remote.yml", "cache_transceiver_config:\n  host: 192.0.2.1\n")  # TEST-NET-1: not this host's
    write(tmp_path, "timeout.yml", "cache_transceiver_config:\n  kv_transfer_timeout_ms: 100000000000000000000\n")
    write(tmp_path, "ipc.yml", "cache_transceiver_config:\n  cuda_ipc: true\n")
    assert serve.main(build_parser().parse_args([tiny_model, *argv])) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["serve", "--port", "x"], "meshserve serve: error: argument --port: invalid int value: 'x' "
                               "(see meshserve serve --help)"),
    (["serve", "--log_level", "loud"], "meshserve serve: error: argument --log_level/--log-level: invalid choice: "
                                       "'loud' (choose from 'debug', 'info', 'warning', 'error', 'critical') "
                                       "(see meshserve serve --help)"),
    (["disaggregated", "-c", "x.yml", "-t", "abc"], "meshserve disaggregated: error: argument -t/--request_timeout/"
                                                    "--request-timeout: invalid float value: 'abc' "
                                                    "(see meshserve disaggregated --help)"),
    (["serve", "--bogus"], "meshserve serve: error: unrecognized arguments: --bogus (see meshserve serve --help)"),
    (["bench", "soak", "--bogus", "1"], "meshserve bench soak: error: unrecognized arguments: --bogus 1 "
                                        "(see meshserve bench soak --help)"),
])
def test_a_bad_flag_is_one_line_and_exit_status_2(capsys, argv, expected):
    """README: "A bad flag ... is one line on stderr and exit status 2" (argparse printed its usage block)."""
    from meshserve.commands import main as cli
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == expected + "\n"
    with pytest.raises(SystemExit):  # the module entry point's own parser too
        build_parser().parse_args(["--port", "x"])
    assert capsys.readouterr().err == "meshserve serve: error: argument --port: invalid int value: 'x' " \
                                      "(see meshserve serve --help)\n"


def test_parallel_flag_error_from_the_module_entry_point(tiny_model):
    r = subprocess.run([sys.executable, "-m", "meshserve.commands.serve", tiny_model, "--cp-size", "8"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "context_parallel_size=8 must divide" in r.stderr, r.stderr


@pytest.mark.parametrize("entry", [["-m", "meshserve", "serve"], ["-m", "meshserve.commands.serve"]])
def test_entry_points_show_every_flag_in_both_spellings(entry):
    r = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("tp_size", "pp_size", "ep_size", "cp_size", "max_batch_size", "max_num_tokens", "max_seq_len",
                 "kv_cache_free_gpu_memory_fraction", "trust_remote_code", "served_model_name", "api_key"):
        assert f"--{flag}" in r.stdout and f"--{flag.replace('_', '-')}" in r.stdout, flag
    for flag in ("--host", "--port", "--backend", "--config", "--dtype", "--log_level"):
        assert flag in r.stdout


def test_engine_startup_failure_exits_1_with_the_engine_error(tiny_model):
    # passes the front's checks; the engine process rejects it while building the engine
    r = subprocess.run([sys.executable, "-m", "meshserve", "serve", tiny_model, "--max_seq_len", "4096",
                        "--port", "0"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1
    assert "the engine failed to start" in r.stderr and "max_seq_len=4096" in r.stderr, r.stderr[-2000:]


def test_a_port_in_use_fails_at_once_naming_it(tiny_model):
    """The HTTP port is bound before the model loads: taken, it is an error naming it, exit 2, and
    the engine never starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "meshserve", "serve", tiny_model, "--host", "127.0.0.1",
                            "--port", str(port)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--host 127.0.0.1 --port {port}: cannot listen there: Address already in use" in r.stderr, r.stderr
    assert "engine process" not in r.stderr


def test_trust_request_chat_template_renders_a_requests_template(tiny_model, tiny_tokenizer):
    """--trust_request_chat_template (vLLM's flag): a chat request's own template is rendered (without
    the flag it is a 400, tests/serve/test_fuzz.py)."""
    import httpx

    from serve_util import start_server

    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    srv = start_server(tiny_model, "--trust-request-chat-template")
    try:
        r = httpx.post(srv.base_url + "/v1/chat/completions", headers=srv.headers, timeout=60, json={
            "model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
            "chat_template": template})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tiny_tokenizer.encode("<<Hi>>", add_special_tokens=False))
    finally:
        srv.stop()

"""`meshserve serve [MODEL]`: the OpenAI-compatible server (trtllm-serve's flags and YAML).

Flags map onto LlmArgs; `--config FILE.yml` (alias `--extra_llm_api_options`) holds any LlmArgs
field. Precedence: a flag given on the command line, then the YAML, then the defaults. Every flag
works spelt with underscores or dashes. `python -m meshserve.commands.serve ...` is the same.
The engine runs in its own process (AsyncEngine); this process runs uvicorn, tokenizes and
detokenizes. Under mpirun / srun / torchrun, rank 0 serves and the other ranks hold model shards
for its engine (`mpirun -np 2 python -m meshserve.commands.serve MODEL --tp_size 2`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import NoReturn, Optional, Sequence

from meshserve.commands import OneLineErrorParser
from meshserve.commands.front_door import _flag, add_cors_flags, add_http_limit_flags, cors_settings, http_limits_error
from meshserve.errors import DEBUG_HINT, describe

logger = logging.getLogger("meshserve.serve")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# uvicorn's keep-alive (default 5 s) for idle client connections: longer than the orchestrator's pool
# keeps them (30 s), so this end never closes one first. Otherwise a request sent on a pooled
# connection while the server's timer fires (a front whose event loop was busy when both came due)
# is reset unanswered, and the orchestrator takes a healthy server for a failed one.
KEEP_ALIVE_S = 75

# flag -> (LlmArgs field, type, help); `None` field: a serve option, not an engine one
_ENGINE_FLAGS = [
    ("tokenizer", "tokenizer", str, "tokenizer folder (default: the model's)"),
    ("revision", "revision", str, "the Hub revision (branch, tag or commit) of a model given as a Hub id"),
    ("tokenizer_revision", "tokenizer_revision", str, "the Hub revision of a tokenizer given as a Hub id"),
    ("backend", "backend", str, "engine backend; only `pytorch` exists"),
    ("generation_config", "generation_config", str,
     "auto (default: a request's unset sampling fields take the model's generation_config.json values, as "
     "vLLM's), vllm (the built-in defaults), or a folder holding a generation_config.json"),
    ("tp_size", "tensor_parallel_size", int, "tensor parallel size"),
    ("pp_size", "pipeline_parallel_size", int, "pipeline parallel size"),
    ("ep_size", "moe_expert_parallel_size", int, "MoE expert parallel size"),
    ("moe_tp_size", "moe_tensor_parallel_size", int, "MoE tensor parallel size"),
    ("cp_size", "context_parallel_size", int, "context parallel size"),
    ("orchestrator_type", "orchestrator_type", str,
     "how worker ranks start: unset (spawned here, or by torchrun/mpirun/srun) or ray (Ray actors)"),
    ("max_batch_size", "max_batch_size", int, "most sequences in one engine step"),
    ("max_n", "max_n", int, "most sequences one request may ask for with n / best_of (default: max_batch_size)"),
    ("max_num_tokens", "max_num_tokens", int, "most tokens in one engine step"),
    ("max_seq_len", "max_seq_len", int, "prompt + output limit (default: the model's max_position_embeddings)"),
    ("scheduling_policy", "scheduling_policy", str,
     "fcfs (default: arrival order) or priority (a request's `priority`, lower first, as vLLM's)"),
    ("dtype", "dtype", str, "auto, float32, bfloat16 or float16"),
    ("load_format", "load_format", str, "auto, safetensors, gguf or dummy (random weights)"),
    ("quantization", "quantization", str,
     "fp8: linear layers' weights in FP8, quantised at load (an FP8 checkpoint is FP8 without it)"),
    ("device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("seed", "seed", int, "seed of the weights of load_format=dummy and of unseeded sampling"),
    ("stream_interval", "stream_interval", int,
     "stream every N tokens (the first one and the last at once; default 1: every token)"),
    ("slow_step_ms", "slow_step_ms", float,
     "log an engine step slower than this many ms with its shape (INFO, one line per 30 s; 0: never; default 1000)"),
    ("max_waiting_requests", "max_waiting_requests", int,
     "answer 503 + Retry-After when this many requests wait for their first token (default: no limit)"),
]


def uvicorn_config(app, host: str, port: int, ns: argparse.Namespace):
    """uvicorn's config for a front door: keep-alive as vLLM's, the request-header deadline of
    --request_header_timeout (uvicorn has none of its own), access lines at debug only."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from meshserve.serve.middleware import header_timeout_protocol
    return uvicorn.Config(app, host=host, port=port, log_level=ns.log_level,
                          timeout_graceful_shutdown=ns.shutdown_timeout, access_log=ns.log_level == "debug",
                          timeout_keep_alive=KEEP_ALIVE_S,
                          http=header_timeout_protocol(AutoHTTPProtocol, ns.request_header_timeout))


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF checkpoint folder, .gguf file or benchmark shape (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    _flag(parser, "host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    _flag(parser, "port", type=int, default=8000, help="port to bind (default: %(default)s)")
    for flag, _, typ, help_text in _ENGINE_FLAGS:
        _flag(parser, flag, type=typ, default=None, help=help_text)
    _flag(parser, "kv_cache_free_gpu_memory_fraction", type=float, default=None,
          help="fraction of free GPU memory for the KV cache (kv_cache_config.free_gpu_memory_fraction)")
    _flag(parser, "kv_cache_dtype", default=None,
          help="auto or fp8: the KV cache's element type (kv_cache_config.dtype; fp8 halves its bytes per token)")
    _flag(parser, "max_beam_width", type=int, default=None,
          help="the most beams a request may ask (n with use_beam_search; TensorRT-LLM's name; default: no "
               "limit but max_n)")
    _flag(parser, "gpus_per_node", type=int, default=None, help="accepted for trtllm-serve compatibility; "
          "ranks are placed by the launcher")
    _flag(parser, "trust_remote_code", action="store_true", default=None, help="allow custom tokenizer code")
    _flag(parser, "enable_attention_dp", action="store_true", default=None,
          help="attention data parallelism: every rank runs its own requests through replicated attention, the "
               "experts stay split over tp_size x ep_size (YAML: enable_attention_dp, attention_dp_config)")
    _flag(parser, "cp_type", default=None, help="with --cp_size: ULYSSES (default; heads split over the cp ranks), "
          "RING (the KV cache split by sequence) or HELIX (RING's cache, the MLP over tp x cp); any case "
          "(YAML: cp_config: {cp_type: ...})")
    _flag(parser, "served_model_name", default=None,
          help="model name clients send and /v1/models lists (default: the model folder's name)")
    _flag(parser, "api_key", default=os.environ.get("MESHSERVE_API_KEY"),
          help="require `Authorization: Bearer KEY` on every route but /health (default: $MESHSERVE_API_KEY)")
    _flag(parser, "config", "extra_llm_api_options", default=None, metavar="FILE.yml",
          help="YAML of LlmArgs fields (enable_attention_dp, kv_cache_config, pytorch_backend_config, ...)")
    _flag(parser, "secret_file", default=None, metavar="FILE",
          help="with cache_transceiver_config and no MESHSERVE_SECRET: the orchestrator's key file, copied here "
               "(mode 0600; default: $MESHSERVE_SECRET_FILE, else ~/.cache/meshserve/disagg.key, made when missing)")
    _flag(parser, "chat_template", default=None, help="a Jinja chat template, or a file holding one")
    _flag(parser, "trust_request_chat_template", action="store_true",
          help="render a chat request's own chat_template (as vLLM's flag; off: such a request is a 400, since a "
               "template is a program and one request's could take the server's memory or CPU)")
    _flag(parser, "enable_auto_tool_choice", action="store_true",
          help="answer tool_choice 'auto' (the default when a chat request gives tools): the model decides, and "
               "--tool_call_parser splits its text into content and tool calls (as vLLM's flags)")
    _flag(parser, "tool_call_parser", default=None, metavar="NAME",
          help="the model's tool-call format for --enable_auto_tool_choice (as vLLM's names): hermes (Qwen2.5/3, "
               "Hermes), qwen3_coder, llama3_json / llama4_json, pythonic / llama4_pythonic, mistral, deepseek_v3, "
               "deepseek_v31")
    _flag(parser, "reasoning_parser", default=None, metavar="NAME",
          help="split a chat answer's <think>...</think> into message.reasoning_content (as vLLM's flag): "
               "deepseek_r1, qwen3, or deepseek_v3 (DeepSeek-V3.1: deepseek_r1 for requests with "
               "chat_template_kwargs {\"thinking\": true}, else no split)")
    _flag(parser, "enable_prompt_tokens_details", action="store_true",
          help="report usage.prompt_tokens_details.cached_tokens: the prompt tokens whose KV the prefix cache "
               "held (as vLLM's flag)")
    _flag(parser, "return_tokens_as_token_ids", action="store_true",
          help="logprobs name each token 'token_id:<id>' (as vLLM's flag; a request's return_tokens_as_token_ids "
               "overrides it)")
    _flag(parser, "tokenize_offload_chars", type=int, default=4096,  # serve/server_config.TOKENIZE_OFFLOAD_CHARS
          help="prompts (or chat messages) of at least this many characters are tokenized on a thread, off "
               "the event loop, so they do not stall other streams (default: %(default)s)")
    add_http_limit_flags(parser)
    add_cors_flags(parser)
    _flag(parser, "log_level", default="info", type=str.lower, choices=LOG_LEVELS, help="default: %(default)s")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` command to the top-level CLI's subparsers."""
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible server", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    parser.set_defaults(func=main)
    return parser


def llm_args_from_cli(ns: argparse.Namespace):
    """Merge defaults < YAML < flags into LlmArgs; raises ValueError naming what was wrong."""
    from meshserve.config import build_llm_args

    where = "the command line"
    values: dict = {}
    if ns.config:
        if not os.path.isfile(ns.config):
            raise ValueError(f"--config {ns.config}: no such file")
        values = _load_config(ns.config)
        where = f"{ns.config} / the command line"
    if ns.model is not None:
        values["model"] = ns.model
    for flag, field, _, _ in _ENGINE_FLAGS:
        value = getattr(ns, flag)
        if value is not None:
            values[field] = value
    if ns.trust_remote_code:
        values["trust_remote_code"] = True
    if ns.enable_attention_dp:
        values["enable_attention_dp"] = True
    if ns.cp_type is not None:
        cp_config = values.get("cp_config") or {}
        if not isinstance(cp_config, dict):
            raise ValueError(f"{ns.config}: cp_config must be a mapping, got {cp_config!r}")
        values["cp_config"] = {**cp_config, "cp_type": ns.cp_type}
    if ns.kv_cache_free_gpu_memory_fraction is not None:
        kv = values.get("kv_cache_config") or {}
        if not isinstance(kv, dict):
            raise ValueError(f"{ns.config}: kv_cache_config must be a mapping, got {kv!r}")
        values["kv_cache_config"] = {**kv, "free_gpu_memory_fraction": ns.kv_cache_free_gpu_memory_fraction}
    if ns.kv_cache_dtype is not None:
        kv = values.get("kv_cache_config") or {}
        if not isinstance(kv, dict):
            raise ValueError(f"{ns.config}: kv_cache_config must be a mapping, got {kv!r}")
        values["kv_cache_config"] = {**kv, "dtype": ns.kv_cache_dtype}
    if values.get("backend", "pytorch") not in ("pytorch", None):
        raise ValueError(f"backend={values['backend']!r} is not supported; accepted: pytorch")
    if ns.max_beam_width is not None and ns.max_beam_width < 1:
        raise ValueError(f"--max_beam_width {ns.max_beam_width}: expected an integer >= 1 (the most beams a request "
                         f"may ask with use_beam_search)")
    tool_call_parser_of(ns)
    reasoning_parser_of(ns)
    cors_settings(ns)
    return build_llm_args(where, **values)


def reasoning_parser_of(ns: argparse.Namespace) -> Optional[str]:
    from meshserve.serve.reasoning import REASONING_PARSERS
    parser = getattr(ns, "reasoning_parser", None)
    if parser is not None and parser not in REASONING_PARSERS:
        raise ValueError(f"--reasoning_parser {parser}: not available; accepted: {', '.join(REASONING_PARSERS)}")
    return parser


def serving_sampling_defaults(model_path: str, mode: str) -> dict:
    """The model's generation_config.json sampling values, logged as vLLM logs them."""
    from meshserve.generation_defaults import describe, sampling_defaults
    defaults = sampling_defaults(model_path, mode)
    if defaults:
        logger.info("default sampling settings of a request that leaves them out, from the model's "
                    "generation_config.json (--generation_config vllm: none): %s", describe(defaults))
    return defaults


def tool_call_parser_of(ns: argparse.Namespace) -> Optional[str]:
    """The parser of tool_choice 'auto' (serve/tools.py), or None; ValueError for flags that do not fit."""
    from meshserve.serve.tools import TOOL_CALL_PARSERS
    parser = getattr(ns, "tool_call_parser", None)
    if parser is not None and parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"--tool_call_parser {parser}: not available; accepted: {', '.join(TOOL_CALL_PARSERS)}")
    if getattr(ns, "enable_auto_tool_choice", False) != (parser is not None):
        raise ValueError("--enable_auto_tool_choice and --tool_call_parser go together: give both (tool_choice "
                         "'auto' answered), or neither")
    return parser


def _load_config(path: str) -> dict:
    """The --config file's mapping; a file that is not YAML is a one-line error naming the place."""
    import yaml

    from meshserve.config import load_yaml_config

    try:
        return load_yaml_config(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"--config {path}: not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None


def _check_device(device: str) -> None:
    """A CUDA device asked for where there is none fails here, before the engine process starts."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here; accepted: auto or cpu")


def _launch(args):
    """The launcher's view of this process (mpirun / srun / torchrun), or None."""
    from meshserve.distributed.launch import launch_for
    return launch_for(args)


def _run_worker_rank(args, model_path: str, launch) -> NoReturn:
    """Ranks > 0 of a launcher-started world hold their model shard for rank 0's engine until it
    shuts down; only rank 0 serves HTTP."""
    from meshserve.worker.main import run_launched_rank
    run_launched_rank(args, model_path, launch)  # ends the process


def _check_layout(args, model_path: str) -> None:
    """Reject parallel layouts the engine cannot run before spawning anything."""
    try:
        from meshserve.engine import setup
        from meshserve.models.config import ModelConfig
    except ImportError:
        return
    model_config = ModelConfig.from_pretrained(model_path)
    for name in ("check_parallel_layout", "check_layout_fits_model"):
        check = getattr(setup, name, None)
        if check is not None:
            check(args, model_config)


def _read_chat_template(value: Optional[str]) -> Optional[str]:
    if value and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def _fail(message: str) -> int:
    print(f"meshserve serve: error: {message}", file=sys.stderr)
    return 2


def _use_disagg_key(secret_file: Optional[str], rank: int) -> Optional[str]:
    """With cache_transceiver_config: settle the key this server's processes sign disaggregated_params
    and authenticate KV transfers with (disagg/params.py): MESHSERVE_SECRET, else a key file, whose
    path goes to the engine and rank processes in MESHSERVE_SECRET_FILE. The path is logged, never
    the key. An error line naming what to set, or None."""
    from meshserve.disagg import params

    try:
        found = params.server_key_file(secret_file)
    except params.KeyFileError as e:
        return str(e)
    if found is None:
        if secret_file and rank == 0:
            logger.warning("--secret_file %s is not used: MESHSERVE_SECRET is set and is the key", secret_file)
        return None
    path, created = found
    os.environ[params.SECRET_FILE_ENV] = path
    if rank == 0:
        logger.info("disaggregated serving: the shared key is in %s (%s); the orchestrator and every server must "
                    "hold the same one (on other hosts: a copy of this file, or MESHSERVE_SECRET)", path,
                    "made now" if created else "there already")
    return None


def main(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    from meshserve.engine.prestart import drop_prestarted
    try:
        return _main(ns)
    except Exception as e:  # noqa: BLE001 - a bug: one line and the hint; the traceback at DEBUG
        logger.debug("meshserve serve failed:\n%s", traceback.format_exc())
        print(f"meshserve serve: error: {describe(e)} ({DEBUG_HINT})", file=sys.stderr)
        return 1
    finally:
        drop_prestarted()  # an engine process no engine took (a refused setting): stopped now, not at exit


def _load_tokenizer(path: str, trust_remote_code: Optional[bool]):
    """The tokenizer; one that cannot be loaded (a config.json transformers rejects, missing
    tokenizer files) is a ValueError naming the folder and the reason."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; each is a bad folder here
        logger.debug("loading the tokenizer from %s failed:\n%s", path, traceback.format_exc())
        raise ValueError(f"tokenizer {path}: cannot load it: {describe(e)}") from None


def _main(ns: argparse.Namespace) -> int:
    try:
        args = llm_args_from_cli(ns)
    except ValueError as e:
        return _fail(str(e))
    if ns.tokenize_offload_chars < 0:
        return _fail(f"--tokenize_offload_chars {ns.tokenize_offload_chars}: must be an integer >= 0 "
                     f"(0: every prompt off the event loop)")
    problem = http_limits_error(ns)
    if problem:
        return _fail(problem)
    launch = _launch(args)
    rank, world = (launch.rank, launch.world_size) if launch is not None else (0, 1)
    if rank == 0:  # the engine process imports torch and its modules now, beside the checks below
        from meshserve.engine.prestart import prestart_engine_process
        prestart_engine_process(ns.log_level.upper())
    from meshserve.models.resolve import resolve_model_path, resolve_tokenizer_path, served_model_name
    try:
        _check_device(args.device)
        model_path = resolve_model_path(args.model, args.show_progress and rank == 0, args.load_format,
                                        args.revision)
        tokenizer_path = resolve_tokenizer_path(args.tokenizer, args.tokenizer_revision, args.model) or model_path
        _check_layout(args, model_path)
        if args.cache_transceiver_config is not None:  # once the config is known to be runnable
            failed = _use_disagg_key(ns.secret_file, rank)
            if failed is not None:
                raise ValueError(failed)
        if rank != 0:
            return _run_worker_rank(args, model_path, launch)
    except (ValueError, FileNotFoundError) as e:
        return _fail(f"rank {rank} of {world}: {e}" if world > 1 else str(e))
    try:
        sock = bind_http_socket(ns.host, ns.port)
    except ValueError as e:
        return _fail(str(e))
    name = ns.served_model_name or served_model_name(args.model)
    with sock:
        return asyncio.run(serve(ns, args, model_path, tokenizer_path, name, sock))


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The HTTP port, bound before the model loads (as vLLM does): a port in use is an error at
    once instead of after minutes of loading, and nothing started meanwhile (the engine's own
    sockets included) can take it. uvicorn listens on it once the engine is ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise ValueError(f"--host {host}: not an address to listen on ({e.strerror or e})") from None
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}; "
                         f"choose a free port (0 picks one)") from None
    return sock


class _Server:
    """uvicorn.Server whose signal handling drains and returns (uvicorn re-raises the signal after
    its graceful shutdown, which would skip the engine's own shutdown and the exit status)."""

    @staticmethod
    def make(config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

        return Server(config)


async def _start_engine(engine, tokenizer_path: str, trust_remote_code: Optional[bool]):
    """The tokenizer (loaded in a thread) while the engine process loads the model, so neither waits
    for the other. A tokenizer that cannot be loaded stops the engine at once (ValueError); an engine
    that fails to start is EngineDeadError. Cancelled (SIGTERM while loading): both stop."""
    start = asyncio.create_task(engine.start(), name="meshserve-engine-start")
    tok = asyncio.create_task(asyncio.to_thread(_load_tokenizer, tokenizer_path, trust_remote_code))
    try:
        await asyncio.wait({start, tok}, return_when=asyncio.FIRST_EXCEPTION)
        if tok.done() and tok.exception() is not None:
            raise tok.exception()
        await start
        engine.set_tokenizer(await tok)
    except BaseException:
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        await engine.shutdown()  # a no-op when start() already stopped it
        raise


async def serve(ns: argparse.Namespace, args, model_path: str, tokenizer_path: str, name: str,
                sock: socket.socket) -> int:
    from meshserve.engine.async_engine import AsyncEngine, EngineDeadError
    from meshserve.serve.metrics import ServerMetrics
    from meshserve.serve.openai_server import OpenAIServing, ServerConfig, build_app

    metrics = ServerMetrics(name)
    engine = AsyncEngine(args, model_path, None, metrics, ns.log_level.upper(), tokenizer_path=tokenizer_path)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)  # while loading; uvicorn takes over after
    try:
        await _start_engine(engine, tokenizer_path, args.trust_remote_code)
    except ValueError as e:  # the tokenizer
        return _fail(str(e))
    except EngineDeadError as e:
        hint = f" ({DEBUG_HINT})" if e.unexpected else ""
        print(f"meshserve serve: error: the engine failed to start: {e}{hint}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        logger.info("stopped while the engine was starting")
        return 1
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    tokenizer = engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await engine.shutdown()  # uvicorn has drained (or timed out) the in-flight requests

    # without --served_model_name, the MODEL argument as typed (a Hub id "org/name") names it too
    aliases = (args.model,) if args.model and not ns.served_model_name else ()
    config = ServerConfig(name, model_path, ns.api_key, _read_chat_template(ns.chat_template),
                          ns.tokenize_offload_chars, aliases,
                          trust_request_chat_template=ns.trust_request_chat_template,
                          tool_call_parser=tool_call_parser_of(ns),
                          enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
                          return_tokens_as_token_ids=ns.return_tokens_as_token_ids,
                          max_beam_width=ns.max_beam_width,
                          reasoning_parser=reasoning_parser_of(ns),
                          sampling_defaults=serving_sampling_defaults(model_path, args.generation_config),
                          max_request_body_bytes=int(ns.max_request_body_mb * 2**20),
                          max_request_header_bytes=int(ns.max_request_header_kb * 2**10),
                          request_body_timeout_s=ns.request_body_timeout, cors=cors_settings(ns))
    app = build_app(OpenAIServing(engine, tokenizer, metrics, config), lifespan)
    from meshserve.utils import GCPauses
    GCPauses.freeze()  # the tokenizer, app and imports are never scanned by a collection again
    GCPauses("api server").install()
    server = _Server.make(uvicorn_config(app, ns.host, ns.port, ns))
    logger.info("serving %s as %r on http://%s:%d", model_path, name, ns.host, sock.getsockname()[1])
    try:
        await server.serve(sockets=[sock])
    finally:
        await engine.shutdown()
    return 0 if server.started else 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="meshserve serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())

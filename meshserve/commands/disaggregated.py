"""`meshserve disaggregated -c disagg-config.yml`: the orchestrator in front of context and
generation servers (the seed's `trtllm-serve disaggregated`).

The YAML holds the seed's keys (hostname, port, backend, context_servers and generation_servers,
each {num_instances, urls, router: {type}}) and TensorRT-LLM's max_retries, plus
health_check_interval / health_check_timeout (seconds). Router types: round_robin (default),
load_balancing, kv_cache_aware; max_failovers and stall_timeout bound the continuation of a request
whose generation server dies or stalls on another server. The servers are `meshserve serve MODEL
--config FILE.yml` whose FILE.yml has `cache_transceiver_config`.

The shared key (it signs disaggregated_params, authenticates KV transfers and guards the /register and
/unregister routes through which servers join and leave while it runs): MESHSERVE_SECRET when set,
else the key file (--secret_file, MESHSERVE_SECRET_FILE, else ~/.cache/meshserve/disagg.key), made
with a random key (mode 0600) when missing. Servers on this machine read the same file; on other
hosts copy it there (mode 0600) or set MESHSERVE_SECRET everywhere. Every /health poll checks that
the server holds the same key. See docs/disaggregated.md.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional, Sequence

from meshserve.commands import OneLineErrorParser
from meshserve.commands.front_door import add_cors_flags, add_http_limit_flags, cors_settings, http_limits_error
from meshserve.commands.serve import LOG_LEVELS

logger = logging.getLogger("meshserve.disagg")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", "--config_file", "--config-file", dest="config", required=True,
                        metavar="FILE.yml", help="the orchestrator's YAML (hostname, port, context_servers, "
                        "generation_servers, ...)")
    parser.add_argument("-t", "--request_timeout", "--request-timeout", dest="request_timeout", type=float,
                        default=180, help="seconds a server may take to answer one hop of a request (a stream: "
                        "between chunks) before the client gets a 504 (default: %(default)s)")
    parser.add_argument("--secret_file", "--secret-file", dest="secret_file", default=None, metavar="FILE",
                        help="the key file when MESHSERVE_SECRET is not set, made (mode 0600) when missing "
                        "(default: $MESHSERVE_SECRET_FILE, else ~/.cache/meshserve/disagg.key)")
    add_http_limit_flags(parser)  # the orchestrator is the clients' front door: serve's limits
    add_cors_flags(parser)  # and its CORS flags (browsers' cross-origin requests; off by default)
    parser.add_argument("--log_level", "--log-level", dest="log_level", default="info", type=str.lower,
                        choices=LOG_LEVELS, help="default: %(default)s")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `disaggregated` command to the top-level CLI's subparsers."""
    parser = subparsers.add_parser("disaggregated", help="orchestrate context and generation servers "
                                   "(disaggregated serving)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    parser.set_defaults(func=main)
    return parser


def _fail(message: str) -> int:
    print(f"meshserve disaggregated: error: {message}", file=sys.stderr)
    return 2


def main(ns: argparse.Namespace) -> int:
    from meshserve.disagg.orchestrator import ConfigError, load_config

    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    if ns.log_level != "debug":  # not a line per hop and per health check
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = load_config(ns.config)
    except ConfigError as e:
        return _fail(str(e))
    if not ns.request_timeout > 0:
        return _fail(f"-t {ns.request_timeout:g}: expected a number of seconds > 0")
    problem = http_limits_error(ns)
    if problem:
        return _fail(problem)
    try:
        cors_settings(ns)
    except ValueError as e:
        return _fail(str(e))
    from meshserve.disagg.params import KeyFileError, orchestrator_key
    try:
        key, key_file, created = orchestrator_key(ns.secret_file)
    except KeyFileError as e:
        return _fail(str(e))
    if key_file is None:
        if ns.secret_file:
            logger.warning("--secret_file %s is not used: MESHSERVE_SECRET is set and is the key", ns.secret_file)
    else:  # the path only: the key is never logged
        logger.info("the shared key is in %s (%s): servers on this machine read it; on other hosts copy it there "
                    "(mode 0600) or set the same MESHSERVE_SECRET everywhere", key_file,
                    "made now" if created else "there already")
    from meshserve.commands.serve import bind_http_socket
    try:
        sock = bind_http_socket(config.hostname, config.port)
    except ValueError as e:
        return _fail(f"{ns.config}: {str(e).replace('--host', 'hostname').replace('--port', 'port')}")
    with sock:
        return asyncio.run(serve(ns, config, sock, key))


async def serve(ns: argparse.Namespace, config, sock, key: bytes) -> int:
    from meshserve.commands.serve import _Server, uvicorn_config
    from meshserve.disagg.orchestrator import Orchestrator, build_app

    orch = Orchestrator(config, ns.request_timeout, key=key,
                        max_request_body_bytes=int(ns.max_request_body_mb * 2**20),
                        request_body_timeout_s=ns.request_body_timeout,
                        max_request_header_bytes=int(ns.max_request_header_kb * 2**10))
    server = _Server.make(uvicorn_config(build_app(orch, cors_settings(ns)), config.hostname, config.port, ns))
    logger.info("orchestrating %d context server(s) (%s router) and %d generation server(s) (%s router) on "
                "http://%s:%d", len(orch.context), config.context.router, len(orch.generation),
                config.generation.router, config.hostname, sock.getsockname()[1])
    await server.serve(sockets=[sock])
    return 0 if server.started else 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="meshserve disaggregated", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())

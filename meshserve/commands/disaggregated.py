"""`meshserve disaggregated -c disagg-config.yml`: the orchestrator in front of context and
generation servers (the seed's `trtllm-serve disaggregated`).

Disaggregated serving has not landed: the command parses its arguments as the seed writes them
and says so in one line, exit status 2, instead of argparse's "invalid choice".
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

NOT_AVAILABLE = ("disaggregated serving (an orchestrator over context and generation servers) is not available "
                 "yet; meanwhile run one aggregated server: `meshserve serve MODEL` (see README.md)")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", "--config_file", "--config-file", dest="config", required=True,
                        metavar="FILE.yml", help="the orchestrator's YAML (hostname, port, context_servers, "
                        "generation_servers)")
    parser.add_argument("-t", "--request_timeout", "--request-timeout", dest="request_timeout", type=int,
                        default=180, help="seconds a request may take (default: %(default)s)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `disaggregated` command to the top-level CLI's subparsers."""
    parser = subparsers.add_parser("disaggregated", help="orchestrate context and generation servers "
                                   "(not available yet)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    parser.set_defaults(func=main)
    return parser


def main(ns: argparse.Namespace) -> int:
    if not os.path.isfile(ns.config):
        print(f"meshserve disaggregated: error: -c {ns.config}: no such file", file=sys.stderr)
        return 2
    print(f"meshserve disaggregated: error: {NOT_AVAILABLE}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve disaggregated", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())

"""The `meshserve` command: `meshserve serve ...`, `meshserve bench ...`, `meshserve disaggregated -c ...`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import meshserve
from meshserve.commands import OneLineErrorParser, bench, disaggregated, serve


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="meshserve", description="Distributed LLM inference engine and "
                                     "OpenAI-compatible server.")
    parser.add_argument("--version", action="version", version=f"meshserve {meshserve.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    serve.register(subparsers)
    bench.register(subparsers)
    disaggregated.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())

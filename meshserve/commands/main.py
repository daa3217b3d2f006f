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


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that parsed `args`: `meshserve bench serve`'s for `bench serve ...`."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions else None
        if chosen not in (actions[0].choices if actions else {}):
            return parser
        parser = actions[0].choices[chosen]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command that was given them ("meshserve serve: error: ..."), not the top level
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())

"""`meshserve bench {serve,throughput,soak}`: argument wiring for the tools in meshserve/bench/.

`register(subparsers)` is called by the top-level CLI; `python -m meshserve.commands.bench ...`
runs the same parser standalone. Every multi-word flag is accepted dashed and underscored.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from meshserve.commands import OneLineErrorParser


class _FlagParser(OneLineErrorParser):
    """Accepts `--num_prompts` for `--num-prompts` (and the reverse) on every long option;
    the other spelling is a hidden twin action writing the same dest, so --help stays short."""

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        twins = []
        for name in names:
            if name.startswith("--"):
                for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if alt not in names and alt not in twins and alt not in self._option_string_actions:
                        twins.append(alt)
        if twins:
            super().add_argument(*twins, **dict(kwargs, dest=action.dest, help=argparse.SUPPRESS))
        return action


def _add_subcommands(bench: argparse.ArgumentParser) -> None:
    from meshserve.bench import serve, soak, throughput

    sub = bench.add_subparsers(dest="bench_command", metavar="{serve,throughput,soak}", parser_class=_FlagParser)
    sub.required = True
    serve_parser = sub.add_parser("serve", help="load-test an OpenAI-compatible server (like `vllm bench serve`)",
                                  description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_cli_args(serve_parser)
    serve_parser.set_defaults(bench_main=serve.main)
    tp_parser = sub.add_parser("throughput", help="offline generation throughput through meshserve.LLM",
                               description=throughput.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_cli_args(tp_parser)
    tp_parser.set_defaults(bench_main=throughput.main)
    soak_parser = sub.add_parser("soak", help="hold N streams against a server, cancel some, check nothing is lost",
                                 description=soak.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    soak.add_cli_args(soak_parser)
    soak_parser.set_defaults(bench_main=soak.main)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` command to the top-level CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmark a server (serve) or the offline engine (throughput)")
    _add_subcommands(bench)
    bench.set_defaults(func=main)
    return bench


def _fail(prog: str, message: str, status: int) -> int:
    for prefix in (f"{prog}: error: ", f"{prog[len('meshserve '):]}: "):  # the tools' own prefixes, once
        if message.startswith(prefix):
            message = message[len(prefix):]
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def main(args: argparse.Namespace) -> int:
    """Runs one tool. What the user asked for that cannot run (a flag's value, a dataset file, a length)
    is one line and exit status 2, as argparse's own errors; a run that fails (the server cannot be
    reached, a stream without usage, every request failed) one line and status 1; no traceback."""
    import httpx

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    prog = f"meshserve bench {args.bench_command}"
    try:
        rc = args.bench_main(args)  # serve / throughput return their results; soak its exit status
    except ValueError as e:
        return _fail(prog, str(e), 2)
    except httpx.HTTPError as e:  # the server cannot be reached (or answered an error) before the run
        try:
            where = f"{e.request.url}: "
        except RuntimeError:  # an error raised without its request
            where = ""
        return _fail(prog, f"{where}{type(e).__name__}: {e}", 1)
    except SystemExit as e:
        if isinstance(e.code, str):
            return _fail(prog, e.code, 1)
        raise
    return rc if isinstance(rc, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="meshserve bench")
    _add_subcommands(parser)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())

"""The flags of a public HTTP front door, shared by `meshserve serve` and `meshserve disaggregated`: the
request limits (body and header sizes and deadlines, the drain time) and the CORS settings, with the
checks that refuse a value they cannot honour. `_flag` adds a flag in both spellings (`--a_b`, `--a-b`).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional


def _flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """Add `--a_b` with its `--a-b` twin (and the twins of any alias)."""
    names = []
    for n in (name, *aliases):
        for spelling in (n, n.replace("_", "-")):
            if f"--{spelling}" not in names:
                names.append(f"--{spelling}")
    parser.add_argument(*names, dest=name, **kwargs)


def _name_list(value: str) -> list[str]:
    """A flag's list of names: JSON (vLLM's form, '["https://a.example", "https://b.example"]') or
    comma-separated."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list: {e}") from None
        if not (isinstance(items, list) and all(isinstance(i, str) and i for i in items)):
            raise argparse.ArgumentTypeError(f"{value!r}: expected a JSON list of non-empty strings")
        return items
    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{value!r}: expected names, comma-separated or as a JSON list")
    return items


def add_cors_flags(parser: argparse.ArgumentParser) -> None:
    """Cross-origin requests from browsers (vLLM's flags; Starlette's CORSMiddleware). Off unless
    --allowed_origins names origins: where vLLM allows any by default, a web page would otherwise be able to
    drive a server on the reader's machine."""
    _flag(parser, "allowed_origins", type=_name_list, default=None, metavar="ORIGINS",
          help="origins whose pages may call this server from a browser (CORS), comma-separated or a JSON list "
               "as vLLM's: https://app.example,http://localhost:3000, or '*' for any (default: none)")
    _flag(parser, "allowed_methods", type=_name_list, default=["*"], metavar="METHODS",
          help="with --allowed_origins: the HTTP methods allowed (default: any)")
    _flag(parser, "allowed_headers", type=_name_list, default=["*"], metavar="HEADERS",
          help="with --allowed_origins: the request headers allowed (default: any)")
    _flag(parser, "allow_credentials", action="store_true",
          help="with --allowed_origins: let browsers send cookies and HTTP authentication")


def cors_settings(ns: argparse.Namespace) -> Optional[dict]:
    """CORSMiddleware's keywords from the CORS flags; None while --allowed_origins is not given (a
    ValueError names a CORS flag given without it: it would change nothing)."""
    if not ns.allowed_origins:
        given = [f for f, on in (("--allowed_methods", ns.allowed_methods != ["*"]),
                                 ("--allowed_headers", ns.allowed_headers != ["*"]),
                                 ("--allow_credentials", ns.allow_credentials)) if on]
        if given:
            raise ValueError(f"{', '.join(given)} without --allowed_origins: no origin may call this server from a "
                             f"browser, so it changes nothing; name the origins with --allowed_origins")
        return None
    return {"allow_origins": ns.allowed_origins, "allow_methods": ns.allowed_methods,
            "allow_headers": ns.allowed_headers, "allow_credentials": ns.allow_credentials}


def add_http_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The limits of a public HTTP front door (`serve` and `disaggregated`): body and header sizes, the
    header and body deadlines, the drain time on SIGTERM."""
    _flag(parser, "max_request_body_mb", type=float, default=64.0,  # serve/protocol.MAX_REQUEST_BODY_BYTES
          help="a request body larger than this many MiB is a 413, refused before it is held in memory "
               "(default: %(default)s)")
    _flag(parser, "max_request_header_kb", type=float, default=64.0,
          help="requests whose headers (names and values) pass this many KiB are a 431 (default: %(default)s)")
    _flag(parser, "request_header_timeout", type=float, default=30.0,
          help="a connection that has not sent a whole request's headers this many seconds after it opened "
               "(or after its last response) is answered 408 and closed (default: %(default)s)")
    _flag(parser, "request_body_timeout", type=float, default=60.0,  # serve/protocol.REQUEST_BODY_TIMEOUT_S
          help="a request whose body stops arriving for this many seconds is a 408 (default: %(default)s)")
    _flag(parser, "shutdown_timeout", type=float, default=30.0,
          help="on SIGTERM/SIGINT, seconds to let in-flight requests finish (default: %(default)s)")


def http_limits_error(ns: argparse.Namespace) -> Optional[str]:
    """The first of add_http_limit_flags' values that cannot be honoured, as a one-line message."""
    for flag, unit in (("max_request_body_mb", "MiB"), ("max_request_header_kb", "KiB"),
                       ("request_header_timeout", "seconds"), ("request_body_timeout", "seconds")):
        value = getattr(ns, flag)
        if not value > 0 or value == float("inf"):
            return f"--{flag} {value:g}: expected a number of {unit} > 0"
    if not ns.shutdown_timeout >= 0:  # nan too: uvicorn would take it (and a negative one) as 0
        return (f"--shutdown_timeout {ns.shutdown_timeout:g}: expected a number of seconds >= 0 "
                f"(0: stop without waiting for in-flight requests)")
    return None

"""The orchestrator's YAML (`meshserve disaggregated -c disagg-config.yml`): its dataclasses, and
their parsing and validation, every mistake a ConfigError of one line that names the key
(docs/disaggregated.md has the keys)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from meshserve.disagg.router import ROUTERS
from meshserve.errors import nearest


class ConfigError(ValueError):
    """A one-line description of what is wrong in the orchestrator's YAML."""


@dataclass
class GroupConfig:
    urls: list[str]
    router: str = "round_robin"
    router_args: dict = field(default_factory=dict)


@dataclass
class DisaggConfig:
    context: GroupConfig
    generation: GroupConfig
    hostname: str = "localhost"
    port: int = 8000
    backend: str = "pytorch"
    max_retries: int = 1
    health_check_interval: float = 5.0
    health_check_timeout: float = 5.0
    max_failovers: int = 2
    stall_timeout: float = 30.0


# top-level key -> what it holds (the seed's keys, then TensorRT-LLM's max_retries, then ours)
TOP_KEYS = {
    "hostname": "address the orchestrator listens on (default localhost)",
    "port": "its port (default 8000)",
    "backend": "pytorch (the servers' backend; the only one)",
    "context_servers": "{num_instances, urls, router}",
    "generation_servers": "{num_instances, urls, router}",
    "max_retries": "times a failed context request is re-sent to another server (default 1)",
    "health_check_interval": "seconds between /health polls of every server (default 5)",
    "health_check_timeout": "seconds a /health poll may take (default 5)",
    "max_failovers": "times a request whose generation server failed is continued on another (default 2; 0: never)",
    "stall_timeout": "seconds a generation stream may go without a chunk before it is continued elsewhere (default 30)",
}
GROUP_KEYS = ("num_instances", "urls", "router")


def load_config(path: str) -> DisaggConfig:
    import yaml

    from meshserve.config import safe_load_unique

    if not os.path.isfile(path):
        raise ConfigError(f"-c {path}: no such file")
    try:
        with open(path) as f:
            raw = safe_load_unique(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return parse_config(raw, path)


def _unknown(where: str, given, accepted: Sequence[str]) -> None:
    unknown = [k for k in given if k not in accepted]
    if unknown:
        close = [f"{m!r}" + (f" for {k!r}" if len(unknown) > 1 else "") for k in unknown
                 if isinstance(k, str) for m in [nearest(k, accepted)] if m]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}{hint}; accepted: {', '.join(accepted)}")


def _int(where: str, name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where}: {name}={value!r}: expected an integer {bound}")
    return value


def _seconds(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: {name}={value!r}: expected a number of seconds > 0")
    return float(value)


def _url(where: str, name: str, value) -> str:
    text = value if isinstance(value, str) else ""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    host, sep, port = rest.rstrip("/").rpartition(":")
    port_ok = port.isascii() and port.isdigit() and 0 < int(port) < 65536
    if (scheme.lower() not in ("http", "https") or not (sep and host and port_ok)
            or "/" in rest.rstrip("/") or any(c.isspace() for c in text)):
        raise ConfigError(f"{where}: {name}={value!r}: expected \"host:port\" (or \"http://host:port\")")
    return text.rstrip("/")


def _server_key(url: str) -> str:
    """The server a url names, however it is spelt ("a:1", "http://a:1" and "HTTP://a:1" are one)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.lower()}://{rest}" if sep else f"http://{url}"


def _group(where: str, name: str, raw) -> GroupConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {name} must be a mapping with {', '.join(GROUP_KEYS)}, got {raw!r}")
    _unknown(f"{where}: {name}", raw, GROUP_KEYS)
    urls = raw.get("urls")
    if not isinstance(urls, list) or not urls:
        raise ConfigError(f"{where}: {name}.urls={urls!r}: expected a list of \"host:port\" (one per server)")
    urls = [_url(where, f"{name}.urls[{i}]", u) for i, u in enumerate(urls)]
    if len({_server_key(u) for u in urls}) != len(urls):
        raise ConfigError(f"{where}: {name}.urls lists a server twice: {urls}")
    n = raw.get("num_instances", len(urls))
    _int(where, f"{name}.num_instances", n, 1)
    if n != len(urls):
        raise ConfigError(f"{where}: {name}.num_instances={n} but {name}.urls lists {len(urls)} server(s)")
    router = raw.get("router")
    if router is None:  # `router:` left empty: the default
        router = {}
    if not isinstance(router, dict):
        raise ConfigError(f"{where}: {name}.router must be a mapping such as {{type: round_robin}}, got {router!r}")
    router = dict(router)
    kind = router.pop("type", "round_robin")
    if not isinstance(kind, str) or kind not in ROUTERS:
        raise ConfigError(f"{where}: {name}.router.type={kind!r}; accepted: {', '.join(ROUTERS)}")
    spec = ROUTERS[kind].ARGS
    _unknown(f"{where}: {name}.router ({kind})", router, ["type", *spec])
    for arg, value in router.items():
        _int(where, f"{name}.router.{arg}", value, 1)
    return GroupConfig(urls, kind, router)


def parse_config(raw, where: str = "the config") -> DisaggConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(TOP_KEYS)}, got {type(raw).__name__}")
    _unknown(where, raw, list(TOP_KEYS))
    for name in ("context_servers", "generation_servers"):
        if name not in raw:
            raise ConfigError(f"{where}: {name} is required ({TOP_KEYS[name]})")
    cfg = DisaggConfig(_group(where, "context_servers", raw["context_servers"]),
                       _group(where, "generation_servers", raw["generation_servers"]))
    hostname = raw.get("hostname", cfg.hostname)
    if not isinstance(hostname, str) or not hostname:
        raise ConfigError(f"{where}: hostname={hostname!r}: expected an address such as localhost or 0.0.0.0")
    cfg.hostname = hostname
    cfg.port = _int(where, "port", raw.get("port", cfg.port), 0, 65535)
    backend = raw.get("backend", cfg.backend)
    if backend != "pytorch":
        raise ConfigError(f"{where}: backend={backend!r}; accepted: pytorch")
    cfg.max_retries = _int(where, "max_retries", raw.get("max_retries", cfg.max_retries), 0)
    cfg.max_failovers = _int(where, "max_failovers", raw.get("max_failovers", cfg.max_failovers), 0)
    for name in ("health_check_interval", "health_check_timeout", "stall_timeout"):
        setattr(cfg, name, _seconds(where, name, raw.get(name, getattr(cfg, name))))
    return cfg

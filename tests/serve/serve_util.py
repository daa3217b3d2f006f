"""Helpers of the server tests: real `meshserve serve` subprocesses on free 127.0.0.1 ports, metrics parsing.

Each test module starts its server once (scope="module") on a free 127.0.0.1 port and stops it
with SIGTERM at the end, killing the process group only if that fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional

import httpx

from helpers import free_port, wait_healthy  # noqa: F401 (free_port: the server tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "sk-meshserve-test"




class ServerProcess:
    def __init__(self, model: Optional[str], *flags: str, api_key: Optional[str] = None, log_dir: str = "/tmp"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "meshserve", "serve"] + ([model] if model else [])
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *flags]
        if api_key:
            cmd += ["--api_key", api_key]
        self.log_path = os.path.join(log_dir, f"meshserve-{self.port}.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     start_new_session=True)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def wait_ready(self, timeout_s: float = 180.0) -> "ServerProcess":
        try:
            wait_healthy(self.proc, self.base_url, self.log_tail, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # anything left in the group (it should be empty)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics whose labels are ignored but for finish_reason (summed otherwise)."""
        text = httpx.get(self.base_url + "/metrics", headers=self.headers, timeout=5.0).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if "finish_reason=" in name_labels:
            reason = name_labels.split('finish_reason="', 1)[1].split('"', 1)[0]
            name = f"{name}[{reason}]"
        if "status=" in name_labels:
            status = name_labels.split('status="', 1)[1].split('"', 1)[0]
            name = f"{name}[{status}]"
        out[name] = out.get(name, 0.0) + float(value)
    return out


def start_server(model: Optional[str], *flags: str, api_key: Optional[str] = API_KEY, **kw) -> ServerProcess:
    return ServerProcess(model, *flags, api_key=api_key, **kw).wait_ready()


def engine_and_ranks(server_pid: int) -> tuple[list, list]:
    """The server's engine process(es) and its worker ranks, as psutil.Process lists. The engine is a
    spawned multiprocessing child of the front; ranks are spawned by the engine, or forked by the
    forkserver the engine started (executor/rank_start.py), whose own process is neither."""
    import psutil

    def cmd(p) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:
            return ""

    def spawned(p) -> bool:
        return p is not None and "spawn_main" in cmd(p)

    def forked(p) -> bool:  # the forkserver and what it forked share its command line
        return p is not None and "multiprocessing.forkserver import main" in cmd(p)

    tree = psutil.Process(server_pid).children(recursive=True)
    engines = [p for p in tree if spawned(p) and not spawned(p.parent())]
    ranks = [p for p in tree if (spawned(p) and spawned(p.parent())) or (forked(p) and forked(p.parent()))]
    return engines, ranks

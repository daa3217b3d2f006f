"""A worker rank that dies under `meshserve serve --tp_size 2`: the in-flight request fails, /health
turns 503 within 10 s, and stopping the server leaves no process behind."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil

from serve_util import engine_and_ranks, start_server


def test_killed_worker_turns_health_503_and_leaves_nothing(tiny_model):
    server = start_server(tiny_model, "--tp_size", "2", api_key=None)
    try:
        _, ranks = engine_and_ranks(server.proc.pid)
        assert ranks, "no worker rank found under the engine process"
        victim = ranks[0]
        result = {}

        def long_request():
            try:
                r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                               json={"model": os.path.basename(tiny_model), "prompt": "Hello", "max_tokens": 1500,
                                     "ignore_eos": True})
                result["status"] = r.status_code
            except httpx.HTTPError as e:
                result["error"] = repr(e)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        status = 200
        while time.monotonic() - killed < 10:
            status = httpx.get(server.base_url + "/health", timeout=5).status_code
            if status == 503:
                break
            time.sleep(0.2)
        assert status == 503
        t.join(30)
        assert result.get("status", 0) != 200
    finally:
        pids = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)] \
            if server.proc.poll() is None else []
        server.stop()
    time.sleep(1.0)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

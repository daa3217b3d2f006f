"""Faults under load: 16 streams open, then the engine process (or a tensor-parallel worker rank) is
killed with SIGKILL (also a worker of an idle server): every open stream ends (an error event or a closed connection, never a hang)
within 5 s, /health answers 503 within 2 s, new requests get an error at once, and stopping the
server leaves no process behind."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from serve_util import engine_and_ranks, start_server


@pytest.mark.parametrize("victim,streams", [("engine", 16), ("worker", 16), ("worker", 0)])
def test_a_killed_process_under_load_ends_every_stream_quickly(tiny_model, victim, streams):
    """streams=0: an idle engine notices a dead worker too (it checks its ranks between requests)."""
    flags = ("--tp_size", "2") if victim == "worker" else ()
    server = start_server(tiny_model, *flags, api_key=None)
    pids = []
    try:
        engines, ranks = engine_and_ranks(server.proc.pid)
        target = (engines if victim == "engine" else ranks)
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        assert target, f"no {victim} process found: {[' '.join(p.cmdline())[:80] for p in tree]}"
        ended: dict[int, float] = {}
        started = threading.Barrier(streams + 1)

        def stream(i):
            body = {"model": os.path.basename(tiny_model), "prompt": f"Hello {i}", "max_tokens": 1900,
                    "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
                    lines = r.iter_lines()
                    next(lines)  # the stream is open and producing
                    started.wait(30)
                    for _ in lines:
                        pass
            except (httpx.HTTPError, StopIteration, threading.BrokenBarrierError):
                pass
            ended[i] = time.monotonic()

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
        for t in threads:
            t.start()
        started.wait(60)
        time.sleep(0.5)
        pids = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
        os.kill(target[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        health = None
        while time.monotonic() - killed < 2.0:
            health = httpx.get(server.base_url + "/health", timeout=2).status_code
            if health == 503:
                break
            time.sleep(0.1)
        assert health == 503, f"/health {health} 2 s after the {victim} was killed"
        for t in threads:
            t.join(max(0.1, killed + 5.0 - time.monotonic()))
        late = [i for i in range(streams) if i not in ended or ended[i] - killed > 5.0]
        assert not late, f"streams {late} still open 5 s after the {victim} was killed"
        r = httpx.post(server.base_url + "/v1/completions", timeout=10,
                       json={"model": os.path.basename(tiny_model), "prompt": "Hi", "max_tokens": 2})
        assert r.status_code >= 500 and "error" in r.json()
    finally:
        server.stop()
    time.sleep(1.0)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

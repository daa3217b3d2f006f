"""Ranks forked from the forkserver (meshserve/executor/rank_start.py) see what a spawned rank would:
the starting process's current environment and streams; an import-time key changed since the server
started means spawning instead."""
from __future__ import annotations

import json
import os

import psutil

from meshserve.executor import rank_start


def _probe(path: str, env: dict, streams) -> None:
    rank_start.adopt_environment(env)
    print("probe line on stdout", flush=True)
    with open(path, "w") as f:
        json.dump({"key": os.environ.get("MESHSERVE_RANK_START_TEST"), "ppid": os.getppid(),
                   "torch_preloaded": "torch" in __import__("sys").modules}, f)


def _run(ctx, path) -> dict:
    p = ctx.Process(target=_probe, args=(str(path), dict(os.environ), rank_start.StdStreams()))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    with open(path) as f:
        return json.load(f)


def test_a_forked_rank_gets_the_current_environment_and_streams(tmp_path, monkeypatch, capfd):
    _run(rank_start.rank_context(), tmp_path / "a.json")  # the server is up (it may have been already)
    capfd.readouterr()
    monkeypatch.setenv("MESHSERVE_RANK_START_TEST", "set after the server started")
    ctx = rank_start.rank_context()
    assert ctx.get_start_method() == "forkserver"
    seen = _run(ctx, tmp_path / "b.json")
    assert seen["key"] == "set after the server started"
    assert seen["torch_preloaded"]  # imported once, in the server
    assert seen["ppid"] != os.getpid() and "forkserver" in " ".join(psutil.Process(seen["ppid"]).cmdline())
    assert "probe line on stdout" in capfd.readouterr().out  # this test's capture, not the first one's


def test_an_import_time_key_changed_since_the_server_started_spawns(tmp_path, monkeypatch):
    rank_start.rank_context()  # the server's environment is recorded (now or by an earlier start)
    assert rank_start._server_env is not None
    monkeypatch.setenv("OMP_NUM_THREADS", str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 7))
    ctx = rank_start.rank_context()
    assert ctx.get_start_method() == "spawn"
    seen = _run(ctx, tmp_path / "c.json")
    assert seen["ppid"] == os.getpid()

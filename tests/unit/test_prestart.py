"""The engine process `meshserve serve` starts before its work is known (meshserve/engine/prestart.py):
taken by the engine when nothing changed, stopped when not taken, never left behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from meshserve.engine import prestart


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def prestarted():
    """Prestarts in the test's body (pytest changes PYTEST_CURRENT_TEST between a fixture and the body,
    which the environment check would rightly count as a change); stops what is left after."""
    started = []
    prestart.drop_prestarted()  # one an earlier test's in-process `serve` left would be a stale one

    def start():
        prestart.prestart_engine_process("WARNING")
        started.append(prestart._prestarted[0])
        return started[-1]
    yield start
    prestart.drop_prestarted()
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def test_the_front_takes_the_prestarted_process_when_its_environment_is_unchanged(prestarted, monkeypatch):
    proc = prestarted()
    monkeypatch.setenv("MESHSERVE_SECRET_FILE", "/nonexistent/key")  # set by serve after the prestart: allowed
    order = dict(args_json="{}", model_path="/nonexistent", input_addr="ipc:///nonexistent/in",
                 output_addr="ipc:///nonexistent/out", parent_pid=os.getpid(), log_level="WARNING")
    assert prestart.take_prestarted(order) is proc
    assert prestart._prestarted is None and prestart.take_prestarted(order) is None  # taken once
    proc.terminate()  # it would now try to load that order's model


def test_an_environment_key_changed_after_the_prestart_spawns_afresh(prestarted, monkeypatch):
    """A variable read at import time (TRITON_INTERPRET, OMP_NUM_THREADS...) may have changed: the
    prestarted process imported with the old value, so it is stopped and the engine spawns a fresh one."""
    proc = prestarted()
    monkeypatch.setenv("MESHSERVE_PRESTART_TEST_KEY", "1")
    assert prestart.take_prestarted(dict(args_json="{}")) is None
    assert _gone(proc.pid)
    assert prestart._prestarted is None


@pytest.mark.parametrize("wait_s", [0.0, 8.0], ids=["while-importing", "waiting-for-its-order"])
def test_an_untaken_prestarted_process_ends_with_the_front(wait_s):
    """A refused setting ends the front without an engine: its exit stops the prestarted process
    (SIGTERM while it imports, the closed pipe once it waits), and the exit does not hang on it."""
    script = ("import sys, time\nfrom meshserve.engine import prestart\nprestart.prestart_engine_process()\n"
              "print(prestart._prestarted[0].pid, flush=True)\ntime.sleep(float(sys.argv[1]))\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script, str(wait_s)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.monotonic() - t0 < wait_s + 60
    pid = int(r.stdout.split()[0])
    assert _gone(pid), f"prestarted engine process {pid} outlived the front"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]

"""Ranks forked from the forkserver (meshserve/executor/rank_start.py) see what a spawned rank would:
the starting process's current environment and streams; an import-time key changed since the server
started means spawning instead. In a fresh interpreter, so no earlier test's start of the
(process-wide) forkserver decides what this one sees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from meshserve.executor import rank_start

    def probe(path, env, streams):
        rank_start.adopt_environment(env)
        print("probe line from", path, flush=True)
        with open(path, "w") as f:
            json.dump({"key": os.environ.get("MESHSERVE_RANK_START_TEST"), "pid": os.getpid(),
                       "ppid": os.getppid(), "torch_preloaded": "torch" in sys.modules}, f)

    def run(name):
        ctx = rank_start.rank_context()
        p = ctx.Process(target=probe, args=(os.path.join(out, name), dict(os.environ), rank_start.StdStreams()))
        p.start()
        p.join(120)
        assert p.exitcode == 0, p.exitcode
        with open(os.path.join(out, name)) as f:
            return dict(json.load(f), method=ctx.get_start_method())

    if __name__ == "__main__":
        out = sys.argv[1]
        first = run("first.json")  # starts the server
        os.environ["MESHSERVE_RANK_START_TEST"] = "set after the server started"
        os.dup2(os.open(os.path.join(out, "moved_stdout.txt"), os.O_WRONLY | os.O_CREAT), 1)  # as pytest's capture
        moved = run("moved.json")
        os.environ["OMP_NUM_THREADS"] = str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 7)
        changed = run("changed.json")
        print(json.dumps({"parent": os.getpid(), "first": first, "moved": moved, "changed": changed}),
              file=sys.stderr, flush=True)
''')


def test_forked_ranks_get_the_current_environment_and_streams_and_spawn_after_an_import_time_change(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stderr.strip().splitlines()[-1])
    parent, first, moved, changed = seen["parent"], seen["first"], seen["moved"], seen["changed"]
    assert first["method"] == moved["method"] == "forkserver"
    # forked by the server (not this script), torch already imported there, the key set after it started
    assert moved["ppid"] != parent and moved["ppid"] == first["ppid"]
    assert moved["torch_preloaded"]
    assert moved["key"] == "set after the server started"
    assert first["key"] is None
    # its stdout is where the script's pointed when it started the rank, not where it pointed before
    assert "moved.json" in (tmp_path / "moved_stdout.txt").read_text()
    assert "first.json" in r.stdout and "moved.json" not in r.stdout
    # OMP_NUM_THREADS is read when the OpenMP runtime loads: changed since the server started, spawn
    assert changed["method"] == "spawn" and changed["ppid"] == parent and not changed["torch_preloaded"]
    assert changed["key"] == "set after the server started"
    assert not psutil.pid_exists(moved["pid"]) or psutil.Process(moved["pid"]).status() == psutil.STATUS_ZOMBIE
    assert os.environ.get("MESHSERVE_RANK_START_TEST") is None  # nothing leaked into this process

"""NIXL, UCX and MPI: each runs the shared suite (test_transfer.py) in a process of its own (MPI inside
`mpirun -np 1`), and equals DEFAULT byte for byte on random bf16 KV between two processes (TP 2
context -> TP 1 and TP 2 generation, blocks of 16 -> 32, 16, 8, chunks of 128 tokens; MPI as the two
apps of one MPMD mpirun). Nothing here starts UCX, NIXL or MPI in the test process itself."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from meshserve.distributed.launch import local_mpirun

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEER = os.path.join(HERE, "kv_peer.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *sys.path]), OMP_NUM_THREADS="1",
           OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed")
MPIRUN = (local_mpirun(btl="self,sm,tcp") if shutil.which("mpirun") else ["mpirun"]) + [
    "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]


def _run(cmd, timeout, **kw):
    """Run a command in its own process group (mpirun's children included), killed whole on timeout."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:3]}... timed out after {timeout} s: {out[-2000:]} {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _start(cmd):
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _stop(proc):
    try:
        return proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_WHEELS = {"NIXL": ("nixl_cu13", "nixl-cu13"), "UCX": ("ucxx", "ucxx-cu13"), "MPI": ("mpi4py", "mpi4py")}


def _usable(name):
    """None, or why the backend's wheel is missing (checked without importing it)."""
    module, wheel = _WHEELS[name]
    return None if importlib.util.find_spec(module) else f"{wheel} is not installed (scripts/setup.sh installs it)"


def _suite(cmd, backend):
    r = _run(cmd, 300, cwd=REPO)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in last and "failed" not in last and "error" not in last, r.stdout[-3000:]
    # every test of the backend ran (32 parametrized; the NIXL-only one skips for the others)
    assert int(last.split(" passed")[0].split()[-1]) >= 31, last


@pytest.mark.parametrize("backend", ["NIXL", "UCX"])
def test_shared_suite(backend):
    why = _usable(backend)
    if why:
        pytest.skip(why)
    ENV["MESHSERVE_TEST_KV_BACKENDS"] = backend
    try:
        _suite([sys.executable, "-m", "pytest", os.path.join(HERE, "test_transfer.py"), "-q", "-p",
                "no:cacheprovider", "-k", backend, "-o", "addopts=", "--color=no"], backend)
    finally:
        del ENV["MESHSERVE_TEST_KV_BACKENDS"]


def _check(result, backend):
    assert not result["errors"], result["errors"]
    for i in range(3):
        assert result["equal_to_truth"][f"DEFAULT-{i}"], f"DEFAULT sink {i}"
        assert result["equal_to_truth"][f"{backend}-{i}"], f"{backend} sink {i}"
        assert result["equal_to_default"][f"{backend}-{i}"], f"{backend} sink {i} differs from DEFAULT"


@pytest.mark.parametrize("backend", ["NIXL", "UCX"])
def test_equals_default_between_two_processes(backend, tmp_path):
    why = _usable(backend)
    if why:
        pytest.skip(why)
    ctx = _start([sys.executable, PEER, "context", str(tmp_path), "DEFAULT", backend])
    try:
        gen = _run([sys.executable, PEER, "generation", str(tmp_path), "DEFAULT", backend], 180)
    finally:
        (tmp_path / "done").touch()
        out = _stop(ctx)
    assert gen.returncode == 0, gen.stdout[-2000:] + gen.stderr[-3000:]
    assert ctx.returncode == 0, out[-3000:]  # clean exit too (no crash in UCX at exit)
    _check(json.loads((tmp_path / "result.json").read_text()), backend)


@needs_mpirun
def test_mpi_mpmd_equals_default(tmp_path):
    if _usable("MPI"):
        pytest.skip(_usable("MPI"))
    # the two "servers" as the two apps of one MPMD launch, as `mpirun -np 1 meshserve serve ... : -np 1 ...`
    cmd = MPIRUN + ["-np", "1", sys.executable, PEER, "context", str(tmp_path), "DEFAULT", "MPI", ":",
                    "-np", "1", sys.executable, PEER, "generation", str(tmp_path), "DEFAULT", "MPI"]
    r = _run(cmd, 240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check(json.loads((tmp_path / "result.json").read_text()), "MPI")


@needs_mpirun
def test_mpi_runs_the_shared_suite_under_mpirun():
    if _usable("MPI"):
        pytest.skip(_usable("MPI"))
    _suite(MPIRUN + ["-x", "MESHSERVE_TEST_KV_BACKENDS=MPI", "-np", "1", sys.executable, "-m", "pytest",
                     os.path.join(HERE, "test_transfer.py"), "-q", "-p", "no:cacheprovider", "-k", "MPI",
                     "-o", "addopts=", "--color=no"], "MPI")


@needs_mpirun
def test_mpi_refuses_a_context_rank_of_another_mpirun(tmp_path):
    if _usable("MPI"):
        pytest.skip(_usable("MPI"))
    # context ranks in one mpirun, the generation side in another: one line naming both worlds
    ctx = _start(MPIRUN + ["-np", "1", sys.executable, PEER, "context", str(tmp_path), "MPI"])
    try:
        _run(MPIRUN + ["-np", "1", sys.executable, PEER, "generation", str(tmp_path), "MPI"], 180)
    finally:
        (tmp_path / "done").touch()
        _stop(ctx)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["errors"] and all("another MPI world" in e and "one mpirun" in e for e in result["errors"]), \
        result["errors"]

"""NIXL, UCX and MPI beyond the shared suite (test_transfer.py): each equals DEFAULT byte for byte on
random bf16 KV between two processes (TP 2 context -> TP 1 and TP 2 generation, blocks of 16 -> 32,
16, 8, chunks of 128 tokens); MPI runs the whole shared suite inside `mpirun -np 1` and the two
processes as the two apps of one MPMD mpirun; NIXL reads directly or through staging as
docs/kv_backends.md says."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from meshserve.disagg.transceiver import KvRequest, RankLayout, TransferState, create_transceiver

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEER = os.path.join(HERE, "kv_peer.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *sys.path]), OMP_NUM_THREADS="1",
           OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader,tcp",
          "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo", "-x", "PYTHONPATH",
          "-x", "OMP_NUM_THREADS"]
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed")


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


def _usable(name):
    try:
        create_transceiver(name)
        return None
    except ValueError as e:
        return str(e)


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
    # the two "servers" as the two apps of one MPMD launch, as `mpirun -np 1 meshserve serve ... : -np 1 ...`
    cmd = MPIRUN + ["-np", "1", sys.executable, PEER, "context", str(tmp_path), "DEFAULT", "MPI", ":",
                    "-np", "1", sys.executable, PEER, "generation", str(tmp_path), "DEFAULT", "MPI"]
    r = _run(cmd, 240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check(json.loads((tmp_path / "result.json").read_text()), "MPI")


@needs_mpirun
def test_mpi_runs_the_shared_suite_under_mpirun():
    cmd = MPIRUN + ["-np", "1", sys.executable, "-m", "pytest", os.path.join(HERE, "test_transfer.py"), "-q",
                    "-p", "no:cacheprovider", "-k", "MPI", "-o", "addopts="]
    r = _run(cmd, 300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 31 passed" in r.stdout.splitlines()[-1] or "31 passed" in r.stdout, r.stdout[-2000:]


@needs_mpirun
def test_mpi_refuses_a_context_rank_of_another_mpirun(tmp_path):
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


def _nixl_pair(src_layouts, dst_layout, n=40):
    Source, Sink = create_transceiver("NIXL")
    gen = torch.Generator().manual_seed(7)
    sources = []
    for lay in src_layouts:
        caches = [torch.randn((2, 16, lay.block_size, lay.kv_heads[1] - lay.kv_heads[0], 8), generator=gen)
                  for _ in lay.layers]
        sources.append(Source(caches, lay, key=b"k"))
    caches = [torch.zeros((2, 16, dst_layout.block_size, dst_layout.kv_heads[1] - dst_layout.kv_heads[0], 8))
              for _ in dst_layout.layers]
    sink = Sink(caches, dst_layout, key=b"k")
    ids = list(range(1, 1 + -(-n // src_layouts[0].block_size)))
    dst = list(range(2, 2 + -(-n // dst_layout.block_size)))
    r = sink.pull([s.layout for s in sources], KvRequest("r", [ids], n), [dst], 10.0)
    for s in sources:
        s.close()
    sink.close()
    assert r.state is TransferState.SUCCESS, r.error
    return sink


def _lay(heads, bs=16):
    return RankLayout("", "m", "float32", bs, (0, 1), 4, heads, 8)


def test_nixl_reads_directly_or_through_staging():
    if _usable("NIXL"):
        pytest.skip(_usable("NIXL"))
    # same heads on both sides: straight into the sink's blocks, whatever the block sizes
    s = _nixl_pair([_lay((0, 4))], _lay((0, 4), bs=32))
    assert (s.direct_reads, s.staged_reads) == (2, 0)
    # the sink's heads come from two context ranks: each read lands in a staging buffer
    s = _nixl_pair([_lay((0, 2)), _lay((2, 4))], _lay((0, 4)))
    assert (s.direct_reads, s.staged_reads) == (0, 4)
    # the sink needs half a context rank's heads: whole rows staged
    s = _nixl_pair([_lay((0, 4))], _lay((0, 2)))
    assert (s.direct_reads, s.staged_reads) == (0, 2)

"""Context and generation servers as the two apps of one MPMD mpirun
(`mpirun -np 2 meshserve serve ... --tp_size 2 : -np 1 meshserve serve ...`): each app is its own
meshserve job (ranks numbered within the app, app k rendezvousing on MASTER_PORT + k), the KV goes
from the TP-2 context server to the TP-1 generation server over DEFAULT, and the generated text equals
the generation server's own aggregated answer. The MPI backend under `meshserve serve` is refused in
one line (Open MPI initializes only the processes it starts; the engine is a child process)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from meshserve.distributed.launch import detect_launch, mpmd_app

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import REPO, free_port  # noqa: E402

from helpers import build_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_mpmd_apps_are_separate_jobs():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_APP_CTX_NUM_PROCS": "2 3", "OMPI_MCA_orte_app_num": "1", "MASTER_PORT": "29600"}
    assert mpmd_app(env) == (1, 2, 3)
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.master_port) == (0, 3, 29601)
    first = dict(env, OMPI_COMM_WORLD_RANK="1", OMPI_MCA_orte_app_num="0")
    info = detect_launch(first)
    assert (info.rank, info.world_size, info.master_port) == (1, 2, 29600)
    single = dict(env, OMPI_APP_CTX_NUM_PROCS="1 4", OMPI_COMM_WORLD_RANK="0", OMPI_MCA_orte_app_num="0")
    assert detect_launch(single) is None  # a one-rank app: no launcher world of its own
    plain = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_APP_CTX_NUM_PROCS": "2"}
    assert mpmd_app(plain) is None and detect_launch(plain).world_size == 2


def _mpirun(tmp_path, apps: list[list[str]], log_name: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *sys.path]), OMP_NUM_THREADS="1",
               MESHSERVE_SECRET="mpmd-test-secret", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,tcp",
           "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo",
           "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           "-x", "MESHSERVE_SECRET"]
    for i, app in enumerate(apps):
        cmd += ([":"] if i else []) + app
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log


def _stop(proc, log):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log.close()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed (scripts/test.sh installs it)")
def test_context_tp2_and_generation_tp1_in_one_mpmd_mpirun(tmp_path):
    model = str(tmp_path / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048)
    cfg = tmp_path / "disagg.yml"
    cfg.write_text("cache_transceiver_config:\n  backend: DEFAULT\nkv_cache_config:\n  max_tokens: 4096\n")
    ctx_port, gen_port = free_port(), free_port()
    serve = [sys.executable, "-m", "meshserve", "serve", model, "--host", "127.0.0.1", "--config", str(cfg)]
    proc, log = _mpirun(tmp_path, [["-np", "2", *serve, "--port", str(ctx_port), "--tp_size", "2"],
                                   ["-np", "1", *serve, "--port", str(gen_port)]], "mpmd.log")
    try:
        ctx, gen = f"http://127.0.0.1:{ctx_port}", f"http://127.0.0.1:{gen_port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "mpmd.log").read_text()[-3000:]
            try:
                if all(httpx.get(u + "/health", timeout=2).status_code == 200 for u in (ctx, gen)):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "mpmd.log").read_text()[-3000:]
            time.sleep(0.5)
        body = {"model": model, "prompt": "The quick brown fox jumps", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        first = httpx.post(ctx + "/v1/completions", timeout=60,
                           json={**body, "disaggregated_params": {"request_type": "context_only"}}).json()
        params = dict(first["disaggregated_params"], request_type="generation_only")
        got = httpx.post(gen + "/v1/completions", json={**body, "disaggregated_params": params}, timeout=60).json()
        want = httpx.post(gen + "/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
    finally:
        _stop(proc, log)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed (scripts/test.sh installs it)")
def test_mpi_backend_under_meshserve_serve_is_refused_in_one_line(tmp_path):
    model = str(tmp_path / "tiny")
    build_checkpoint(model, "llama")
    cfg = tmp_path / "mpi.yml"
    cfg.write_text("cache_transceiver_config:\n  backend: MPI\n")
    serve = [sys.executable, "-m", "meshserve", "serve", model, "--host", "127.0.0.1", "--config", str(cfg)]
    proc, log = _mpirun(tmp_path, [["-np", "1", *serve, "--port", str(free_port())],
                                   ["-np", "1", *serve, "--port", str(free_port())]], "mpi.log")
    try:
        proc.wait(120)
    finally:
        _stop(proc, log)
    text = (tmp_path / "mpi.log").read_text()
    assert "cache_transceiver_config.backend='MPI' cannot be used here: this process was not started by mpirun" \
        in text, text[-3000:]
    assert "alternatives: DEFAULT" in text

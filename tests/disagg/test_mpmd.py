"""Context and generation servers as the two apps of one MPMD mpirun
(`mpirun -np 2 meshserve serve ... --tp_size 2 : -np 1 meshserve serve ...`): each app is its own
meshserve job (ranks numbered within the app, app k rendezvousing on MASTER_PORT + k), the KV goes
from the TP-2 context server to the TP-1 generation server over DEFAULT, and the generated text equals
the generation server's own aggregated answer. The same with `cache_transceiver_config.backend: MPI`
(a TP-1 and a TP-2 context server, one generation server, all apps of one mpirun); a TP world that
mpirun did not start rank by rank is refused with MPI in one line."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from meshserve.distributed.launch import detect_launch, local_mpirun, mpmd_app

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


@pytest.mark.parametrize("rank,app", [(0, (0, 0, 2)), (1, (0, 0, 2)), (2, (1, 2, 1)), (3, (2, 3, 3)), (5, (2, 3, 3))])
def test_open_mpi_5_apps_come_from_the_rank_ranges(rank, app):
    """Open MPI 5 (PRRTE) sets no OMPI_MCA_orte_app_num: the app is the one whose world-rank range
    (apps in order, OMPI_APP_CTX_NUM_PROCS) holds the rank, as the variables of a 5.0.11
    `mpirun -np 2 A : -np 1 B : -np 3 C` read."""
    env = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "6", "OMPI_APP_CTX_NUM_PROCS": "2 1 3",
           "OMPI_NUM_APP_CTX": "3", "OMPI_VERSION": "5.0.11", "MASTER_PORT": "29600"}
    assert mpmd_app(env) == app
    info = detect_launch(env)
    if app[2] == 1:
        assert info is None  # a one-rank app
    else:
        assert (info.rank, info.world_size, info.master_port) == (rank - app[1], app[2], 29600 + app[0])


def _mpirun(tmp_path, apps: list[list[str]], log_name: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *sys.path]), OMP_NUM_THREADS="1",
               MESHSERVE_SECRET="mpmd-test-secret", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port(len(apps))))
    cmd = local_mpirun() + ["-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
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


def _mpi4py_missing() -> bool:
    try:
        import mpi4py  # noqa: F401 - the package only (mpi4py.MPI would initialize MPI in this process)
    except ImportError:
        return True
    return False


def _wait_healthy(proc, log_path, urls, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if all(httpx.get(u + "/health", timeout=2).status_code == 200 for u in urls):
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.skipif(shutil.which("mpirun") is None or _mpi4py_missing(),
                    reason="needs OpenMPI and mpi4py (scripts/test.sh and scripts/setup.sh install them)")
def test_mpi_backend_between_meshserve_serve_apps_of_one_mpirun(tmp_path):
    """`mpirun -np 1 meshserve serve CTX : -np 2 meshserve serve CTX --tp_size 2 : -np 1 meshserve serve
    GEN`, backend MPI everywhere: the generation server pulls a TP-1 and a TP-2 context server's KV as
    MPI messages (each engine process is the one process of its mpirun rank that initializes MPI)."""
    model = str(tmp_path / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048)
    cfg = tmp_path / "mpi.yml"
    cfg.write_text("cache_transceiver_config:\n  backend: MPI\nkv_cache_config:\n  max_tokens: 4096\n")
    ctx1_port, ctx2_port, gen_port = free_port(), free_port(), free_port()
    serve = [sys.executable, "-m", "meshserve", "serve", model, "--host", "127.0.0.1", "--config", str(cfg)]
    proc, log = _mpirun(tmp_path, [["-np", "1", *serve, "--port", str(ctx1_port)],
                                   ["-np", "2", *serve, "--port", str(ctx2_port), "--tp_size", "2"],
                                   ["-np", "1", *serve, "--port", str(gen_port)]], "mpi.log")
    try:
        ctxs = [f"http://127.0.0.1:{p}" for p in (ctx1_port, ctx2_port)]
        gen = f"http://127.0.0.1:{gen_port}"
        _wait_healthy(proc, tmp_path / "mpi.log", [*ctxs, gen])
        body = {"model": model, "prompt": "The quick brown fox jumps", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        want = httpx.post(gen + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        for ctx in ctxs:
            first = httpx.post(ctx + "/v1/completions", timeout=60,
                               json={**body, "disaggregated_params": {"request_type": "context_only"}}).json()
            params = dict(first["disaggregated_params"], request_type="generation_only")
            r = httpx.post(gen + "/v1/completions", json={**body, "disaggregated_params": params}, timeout=60)
            assert r.status_code == 200, (ctx, r.text)
            got = r.json()["choices"][0]
            assert (got["token_ids"], got["text"]) == (want["token_ids"], want["text"]), ctx
    finally:
        _stop(proc, log)
    text = (tmp_path / "mpi.log").read_text()
    assert "orte_ess_init failed" not in text and "Traceback" not in text, text[-3000:]
    # one process per mpirun rank initialized MPI: the engine processes (rank 0) and ctx2's worker rank
    assert sorted(re.findall(r"MPI initialized in process \d+: world rank (\d) of 4", text)) == list("0123"), text


@pytest.mark.skipif(_mpi4py_missing(), reason="needs mpi4py (scripts/setup.sh installs it)")
def test_mpi_backend_with_ranks_mpirun_did_not_start_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """`mpirun -np 1 meshserve serve --tp_size 2` would spawn rank 1 inside rank 0's mpirun rank."""
    from meshserve.commands import serve

    model = str(tmp_path / "tiny")
    build_checkpoint(model, "llama")
    cfg = tmp_path / "mpi.yml"
    cfg.write_text("cache_transceiver_config:\n  backend: MPI\n")
    for k, v in {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert serve.main(serve.build_parser().parse_args([model, "--tp_size", "2", "--config", str(cfg),
                                                       "--secret_file", str(tmp_path / "key")])) == 2
    err = capsys.readouterr().err
    assert "mpirun must start every rank of this server (`-np 2` for its app)" in err, err
    assert "alternatives: DEFAULT, NIXL, UCX" in err and err.count("\n") == 1, err

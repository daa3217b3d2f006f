"""The seed's manual MPI launch: `mpirun -np 2 python -m meshserve.commands.serve MODEL --tp_size 2
--backend pytorch`. Rank 0 serves HTTP, rank 1 holds the other half of the model; greedy output
equals transformers on the same checkpoint."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch

from serve_util import REPO, free_port
from helpers import hf_greedy, wait_healthy
from meshserve.distributed.launch import local_mpirun

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed")


def test_mpirun_serve_tp2_matches_transformers(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    port, master_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *sys.path]), OMP_NUM_THREADS="1")
    cmd = local_mpirun() + ["-np", "2", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={master_port}", "-x", "PYTHONPATH", "-x",
           "OMP_NUM_THREADS",
           sys.executable, "-m", "meshserve.commands.serve", tiny_model, "--tp_size", "2", "--backend", "pytorch",
           "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path / "mpirun.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, lambda: (tmp_path / "mpirun.log").read_text()[-3000:])
        ids = tiny_tokenizer.encode("Paris is the capital of")
        r = httpx.post(base + "/v1/completions", timeout=60, json={
            "model": "tiny-chat", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": False})
        assert r.status_code == 200, r.text
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        expected = tiny_tokenizer.decode(hf_greedy(model, ids, 8), skip_special_tokens=False)
        assert r.json()["choices"][0]["text"] == expected
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        time.sleep(0.5)
        alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()

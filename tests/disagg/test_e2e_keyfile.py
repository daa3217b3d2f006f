"""The seed's three commands on one machine with no MESHSERVE_SECRET anywhere: a context server, a
generation server (real `meshserve serve` over a tiny random Llama, `cache_transceiver_config:
{backend: DEFAULT}`, verify_payload's default: auto, so no payload MAC on loopback) and `meshserve disaggregated`,
started one right after the other. Whichever comes first makes the key file (mode 0600, folder
0700, under XDG_CACHE_HOME here), every one of them reads it, the servers prove they hold it on
/health, and a request goes through as the generation server alone answers it. The key is in no
log. An orchestrator holding another key does not use the servers (503 naming how to share the
key); a server told to read a copied key file that is missing stops with one line naming what to
set. ~40-60 s on 2 cores."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import httpx
import pytest

from meshserve.disagg import params
from test_e2e import DISAGG_YAML, SERVER_FLAGS, Orchestrator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_util import REPO, ServerProcess, free_port  # noqa: E402

from helpers import build_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _config(path, port: int, ctx, gen) -> str:
    path.write_text(f"hostname: 127.0.0.1\nport: {port}\nbackend: pytorch\nhealth_check_interval: 1\n"
                    f"context_servers:\n  urls:\n    - \"127.0.0.1:{ctx.port}\"\n"
                    f"generation_servers:\n  urls:\n    - \"127.0.0.1:{gen.port}\"\n")
    return str(path)


def test_the_seed_flow_without_meshserve_secret(tmp_path, monkeypatch):
    for name in ("MESHSERVE_SECRET", "MESHSERVE_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key_file = tmp_path / "cache" / "meshserve" / "disagg.key"
    model = str(tmp_path / "tiny")
    build_checkpoint(model, "llama", max_position_embeddings=2048)
    yaml_path = tmp_path / "server.yml"
    yaml_path.write_text(DISAGG_YAML)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    missing = tmp_path / "copied.key"
    lonely = subprocess.Popen([sys.executable, "-m", "meshserve", "serve", model, "--port", str(free_port()),
                               "--config", str(yaml_path), "--secret_file", str(missing)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ctx = ServerProcess(model, *SERVER_FLAGS, "--config", str(yaml_path), log_dir=str(tmp_path))
    gen = ServerProcess(model, *SERVER_FLAGS, "--config", str(yaml_path), log_dir=str(tmp_path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    orch = Orchestrator(_config(tmp_path / "disagg.yml", port, ctx, gen), str(tmp_path / "orchestrator.log"))
    other = None
    try:
        for s in (ctx, gen):
            s.wait_ready(240)
        orch.wait_healthy(url, 60)

        # one key file, private, made by exactly one of the three, read by all
        assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
        key = params.read_key_file(str(key_file))
        logs = [open(p).read() for p in (ctx.log_path, gen.log_path, orch.log_path)]
        assert sum("made now" in log for log in logs) == 1, logs
        assert all(str(key_file) in log for log in logs)
        challenge = os.urandom(16).hex()
        for s in (ctx, gen):
            r = httpx.get(s.base_url + "/health", headers={params.CHALLENGE_HEADER: challenge}, timeout=5)
            assert r.status_code == 200 and r.headers[params.PROOF_HEADER] == params.key_proof(key, challenge)

        # a request through the orchestrator: context, KV pulled (frames authenticated), generation
        model_id = httpx.get(gen.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model_id, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}
        want = httpx.post(gen.base_url + "/v1/completions", json=body, timeout=120)
        got = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert want.status_code == got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
        assert got.json()["usage"]["completion_tokens"] == 12
        assert "tokens pulled from" in gen.log_tail(200)

        # an orchestrator holding another key uses neither server, and says why
        monkeypatch.setenv("MESHSERVE_SECRET", "another secret")
        other_port = free_port()
        other = Orchestrator(_config(tmp_path / "other.yml", other_port, ctx, gen), str(tmp_path / "other.log"))
        monkeypatch.delenv("MESHSERVE_SECRET")
        other_url = f"http://127.0.0.1:{other_port}"
        deadline = time.monotonic() + 60
        while True:
            assert other.proc.poll() is None, open(other.log_path).read()
            try:
                health = httpx.get(other_url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, open(other.log_path).read()
                time.sleep(0.2)
        assert health.status_code == 503
        for group in ("context_servers", "generation_servers"):
            (entry,) = health.json()[group]
            assert entry["healthy"] is False and entry["error"].startswith("it holds another key than this "
                                                                           "orchestrator's")
        r = httpx.post(other_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "another key" in r.json()["error"]["message"]
        assert "MESHSERVE_SECRET" in r.json()["error"]["message"]

        # the server told to read a copied key file that is not there
        err = lonely.communicate(timeout=120)[1].strip().splitlines()
        assert lonely.returncode == 2, err
        assert err[-1].startswith(f"meshserve serve: error: no key for disaggregated serving: the key file {missing} "
                                  f"(--secret_file) does not exist; copy the orchestrator's key file"), err
        assert "MESHSERVE_SECRET" in err[-1] and not missing.exists()

        logs = [open(p).read() for p in (ctx.log_path, gen.log_path, orch.log_path, other.log_path)]
        assert not any(key.hex() in log for log in logs)  # the key is never logged
        assert other.stop() == 0
        other = None
        assert orch.stop() == 0
    finally:
        if lonely.poll() is None:
            lonely.kill()
            lonely.wait()
        for o in (other, orch):
            if o is not None and o.proc.poll() is None:
                o.stop()
        for s in (ctx, gen):
            s.stop()

"""orchestrator_type="ray": the worker ranks as Ray actors on a local Ray instance (started and
stopped with the job). Greedy ids equal transformers for TP 2 and for an MoE model with attention DP
at tp2 x ep2; `meshserve serve --orchestrator_type ray` with the official client; an actor killed
while serving is a one-line error naming its rank; Ray missing or combined with a launcher is
refused before loading; a Ray cluster of two network-namespace "hosts" (RAY_ADDRESS) with rank 1 on
the other host."""
import json
import os
import sys

import pytest

from helpers import build_checkpoint, hf_greedy, make_prompts, served_token_ids
from test_multihost import two_hosts  # noqa: F401 - the fixture: two network namespaces
from meshserve import LLM, SamplingParams

ray = pytest.importorskip("ray", reason="ray is not installed (scripts/setup.sh installs it)")

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
KV = {"tokens_per_block": 4, "max_tokens": 2048}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen3_moe"):
        path = str(tmp_path_factory.mktemp(arch))
        hf = build_checkpoint(path, arch)
        prompts = make_prompts(5, 320, 13, seed=4)
        out[arch] = (path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts])
    return out


def ray_processes() -> int:
    import psutil
    return sum(1 for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(("raylet", "gcs_server")))


def test_tp2_on_ray_actors_then_a_killed_actor_is_a_one_line_error(checkpoints):
    path, prompts, ref = checkpoints["llama"]
    with LLM(path, tensor_parallel_size=2, orchestrator_type="ray", kv_cache_config=KV, show_progress=False) as llm:
        ex = llm._core.executor
        assert type(ex).__name__ == "RayExecutor" and ex.procs[1].pid != os.getpid()
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        assert got == ref
        ray.kill(ex.procs[1].actor, no_restart=True)
        with pytest.raises(Exception) as e:
            llm.generate(prompts, SP, use_tqdm=False)
        assert "worker rank 1" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not ray.is_initialized() and ray_processes() == 0  # the job's own Ray instance is gone


def test_attention_dp_moe_on_ray(checkpoints):
    path, prompts, ref = checkpoints["qwen3_moe"]
    with LLM(path, tensor_parallel_size=2, moe_expert_parallel_size=2, enable_attention_dp=True,
             orchestrator_type="ray", kv_cache_config=KV, show_progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert got == ref


def test_serve_with_orchestrator_type_ray(checkpoints):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from serve_util import start_server

    path, prompts, ref = checkpoints["llama"]
    server = start_server(path, "--tp_size", "2", "--orchestrator_type", "ray", api_key=None)
    try:
        assert served_token_ids(server.base_url, prompts, 8) == ref
    finally:
        server.stop()


def test_ray_missing_or_with_a_launcher_is_refused(checkpoints, monkeypatch):
    path = checkpoints["llama"][0]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(ValueError, match=r"orchestrator_type='ray' needs the ray package \(pip install"):
        LLM(path, tensor_parallel_size=2, orchestrator_type="ray", show_progress=False)
    monkeypatch.delitem(sys.modules, "ray")
    from meshserve.config import LlmArgs
    from meshserve.distributed.launch import LaunchInfo
    from meshserve.executor.ray import RayExecutor
    with pytest.raises(ValueError, match="Ray starts the worker ranks itself"):
        RayExecutor(LlmArgs(tensor_parallel_size=2), path, LaunchInfo("slurm", 0, 2, 0, "127.0.0.1", 29500), "cpu", 2)


RAY_SCRIPT = """
import json, sys
from meshserve import LLM, SamplingParams
if __name__ == "__main__":
    ckpt, out = sys.argv[1], sys.argv[2]
    prompts = json.loads(open(ckpt + "/prompts.json").read())
    with LLM(ckpt, tensor_parallel_size=2, orchestrator_type="ray", show_progress=False,
             kv_cache_config={"tokens_per_block": 4, "max_tokens": 2048}) as llm:
        ex = llm._core.executor
        nodes = sorted({n["NodeManagerAddress"] for n in __import__("ray").nodes() if n["Alive"]})
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        json.dump({"ids": [o.outputs[0].token_ids for o in outs], "nodes": nodes, "addr": ex._rendezvous_addr()},
                  open(out, "w"))
"""


def test_tp2_across_two_ray_nodes(tmp_path, tp_checkpoint, two_hosts):
    """A Ray cluster of two "hosts" (network namespaces joined by a veth pair, one CPU each): the head
    and this driver on one, a worker node on the other, so rank 1's actor runs across the link and
    reaches rank 0 at its node address (store, control channel, gloo), not loopback."""
    import subprocess

    from helpers import free_port

    ckpt, _, ref = tp_checkpoint
    (ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b) = two_hosts
    port = free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    import secrets
    # Ray's token authentication: one token for the head, the worker node and the driver
    base = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
                RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env_a, env_b = dict(base, GLOO_SOCKET_IFNAME=dev_a), dict(base, GLOO_SOCKET_IFNAME=dev_b)
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        for ns, env, role in ((ns_a, env_a, ["--head", "--node-ip-address", ip_a, "--port", str(port),
                                               "--include-dashboard", "false"]),
                              (ns_b, env_b, ["--address", f"{ip_a}:{port}", "--node-ip-address", ip_b])):
            started = subprocess.run(["ip", "netns", "exec", ns, ray_bin, "start", *role, *common], env=env,
                                     capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout[-1500:] + started.stderr[-3000:]
        script, out = tmp_path / "ray_job.py", tmp_path / "out.json"
        script.write_text(RAY_SCRIPT)
        run = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, str(script), ckpt, str(out)],
                             env=dict(env_a, RAY_ADDRESS=f"{ip_a}:{port}"), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        got = json.loads(out.read_text())
        assert got["nodes"] == sorted([ip_a, ip_b]) and got["addr"] == ip_a
        assert got["ids"] == ref
    finally:
        for ns, env in ((ns_b, env_b), (ns_a, env_a)):
            subprocess.run(["ip", "netns", "exec", ns, ray_bin, "stop", "--force"], env=env, capture_output=True,
                           timeout=120)

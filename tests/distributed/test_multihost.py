"""The seed's multi-node path on one machine: two network namespaces ("hosts") joined by a veth
pair, ranks 0-1 on one and 2-3 on the other, one TP=4 engine across them (rendezvous, gloo and
the HMAC-signed control channel all cross the veth link). Output equals transformers (= TP=1)."""
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from helpers import free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "tp_script.py")


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    a, b = f"msa{tag}", f"msb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        sh("ip", "link", "set", f"va{tag}", "netns", a)
        sh("ip", "link", "set", f"vb{tag}", "netns", b)
        for ns, dev, ip in ((a, f"va{tag}", "10.77.0.1/24"), (b, f"vb{tag}", "10.77.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield (a, f"va{tag}", "10.77.0.1"), (b, f"vb{tag}", "10.77.0.2")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here: {e.stderr.decode().strip()}")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_tp4_across_two_hosts(tmp_path, tp_checkpoint, two_hosts):
    ckpt, _, ref = tp_checkpoint
    out = tmp_path / "out.json"
    (ns_a, dev_a, ip_a), (ns_b, dev_b, _) = two_hosts
    port = free_port()
    procs = []
    for rank in range(4):
        ns, dev = (ns_a, dev_a) if rank < 2 else (ns_b, dev_b)
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), MASTER_ADDR=ip_a,
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=dev, MESHSERVE_SECRET="test-secret-" + ns_a,
                   PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, SCRIPT, ckpt, str(out), "4"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode()[-3000:])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append("timed out")
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(logs)
    assert json.loads(out.read_text()) == ref

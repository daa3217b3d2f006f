"""The seed's Slurm deployment against a real Slurm (Debian's slurm-wlm: munged, slurmctld and slurmd
on this host, scripts/slurm_local.sh): an sbatch script in the seed's shape (#SBATCH lines, a
`srun ... meshserve-launch`) whose two tasks run one TP=2 LLM job, equal to transformers; `srun -n 2
meshserve-launch meshserve serve --tp_size 2 --config config.yml` with the seed's config.yml
(attention DP, the overlap scheduler) answering the official client, then stopped by scancel with no
rank left behind."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import httpx
import pytest

from helpers import free_port, served_token_ids, wait_healthy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(__file__), "tp_script.py")
LAUNCH = os.path.join(os.path.dirname(sys.executable), "meshserve-launch")

pytestmark = pytest.mark.skipif(shutil.which("slurmd") is None or os.geteuid() != 0,
                                reason="Slurm (slurm-wlm) is not installed, or not root (scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("slurm"))
    ctld, slurmd = free_port(), free_port()
    out = subprocess.run([os.path.join(REPO, "scripts", "slurm_local.sh"), "start", state, str(ctld), str(slurmd)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    env = dict(os.environ, SLURM_CONF=out.stdout.strip(), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, *sys.path]),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))  # meshserve
    yield env
    subprocess.run([os.path.join(REPO, "scripts", "slurm_local.sh"), "stop", state], timeout=30)


def test_sbatch_script_in_the_seeds_shape_runs_one_tp2_job(slurm, tp_checkpoint, tmp_path):
    ckpt, _, ref = tp_checkpoint
    out = tmp_path / "ids.json"
    batch = tmp_path / "job.sh"
    batch.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=1
        #SBATCH --ntasks-per-node=2
        #SBATCH --time=00:10:00
        #SBATCH --output={tmp_path}/job.log
        srun {LAUNCH} {sys.executable} {SCRIPT} {ckpt} {out} 2
        """))
    sub = subprocess.run(["sbatch", "--parsable", str(batch)], env=slurm, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = sub.stdout.strip().split(";")[0]
    state = job_state(slurm, job, timeout_s=300)  # (sbatch --wait polls after 2, 8 then 32 s: ~30 s idle here)
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert state == ("COMPLETED", "0:0"), (state, log[-3000:])
    assert json.loads(out.read_text()) == ref


def job_state(env: dict, job: str, timeout_s: float) -> tuple[str, str]:
    """(JobState, ExitCode) of a Slurm job once it has ended, polled twice a second through scontrol."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                              timeout=30).stdout
        fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields["JobState"], fields.get("ExitCode", "")
        assert time.monotonic() < deadline, f"job {job} still {fields.get('JobState')} after {timeout_s} s"
        time.sleep(0.5)


def test_srun_meshserve_serve_then_scancel(slurm, tp_checkpoint, tmp_path):
    ckpt, prompts, ref = tp_checkpoint
    port, name = free_port(), f"meshserve-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config.yml"  # the seed's (a dense model: attention DP is data parallelism)
    config.write_text("enable_attention_dp: true\npytorch_backend_config:\n  enable_overlap_scheduler: true\n"
                      "kv_cache_config:\n  free_gpu_memory_fraction: 0.95\n")
    log = open(tmp_path / "srun.log", "w")
    proc = subprocess.Popen(["srun", "-n", "2", "-J", name, LAUNCH, "meshserve", "serve", ckpt, "--tp_size", "2",
                             "--max_batch_size", "161", "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port)],
                            env=slurm, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, lambda: (tmp_path / "srun.log").read_text()[-3000:])
        assert served_token_ids(base, prompts, 8) == ref
        text = httpx.get(base + "/metrics").text
        placed = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("meshserve_attention_dp_requests_placed{")]
        assert len(placed) == 2 and sum(placed) == len(prompts) and min(placed) >= 1, placed
    finally:
        subprocess.run(["scancel", "-n", name], env=slurm, timeout=30)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    deadline = time.monotonic() + 30
    while subprocess.run(["squeue", "-h", "-n", name], env=slurm, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the job is still in the queue after scancel"
        time.sleep(0.5)


def test_two_node_srun_rank1_skips_the_script(tp_checkpoint, tmp_path):
    """The seed's multi-node Slurm step on two "hosts" (network namespaces msn1 and msn2, each with its
    own hostname and slurmd; scripts/slurm_two_nodes.sh): `srun -N 2 -n 2 meshserve-launch python
    script.py`. meshserve-launch finds rank 0's host in the step's node list (no MASTER_ADDR given),
    rank 1 on msn2 does not run the script but takes the job from rank 0's store across the link, and
    the TP=2 result equals transformers."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2")
    ckpt, _, ref = tp_checkpoint
    state = str(tmp_path / "slurm2")
    script = os.path.join(REPO, "scripts", "slurm_two_nodes.sh")
    up = subprocess.run([script, "start", state], capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = dict(os.environ, SLURM_CONF=up.stdout.strip(), OMP_NUM_THREADS="1", MESHSERVE_SECRET="two-node-test",
                   PYTHONPATH=os.pathsep.join([REPO, *sys.path]),
                   PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        env.pop("MASTER_ADDR", None)
        out = tmp_path / "ids.json"
        marker = tmp_path / "ran-on"
        # each task's gloo interface is its host's veth; the script notes where it ran before LLM()
        task = (f"export GLOO_SOCKET_IFNAME=$(ls /sys/class/net | grep ^vmsn); exec {LAUNCH} {sys.executable} -c "
                f"\"import runpy, socket, sys; open('{marker}-' + socket.gethostname(), 'w').close(); "
                f"sys.argv = ['{SCRIPT}', '{ckpt}', '{out}', '2']; runpy.run_path('{SCRIPT}', run_name='__main__')\"")
        run = subprocess.run(["ip", "netns", "exec", "msna", "srun", "-N", "2", "-n", "2", "bash", "-c", task],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert json.loads(out.read_text()) == ref
        assert sorted(p.name for p in tmp_path.glob("ran-on-*")) == ["ran-on-msn1"]  # rank 1 skipped the script
    finally:
        subprocess.run([script, "stop", state], capture_output=True, timeout=60)

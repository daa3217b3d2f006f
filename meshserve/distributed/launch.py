"""Where this process sits when an outside launcher started it: torchrun, mpirun, PMI or Slurm.

Read once, at the edge (engine setup); nothing deeper reads these variables. Without them the
engine spawns its own worker ranks on this host.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping as TMapping, Optional

# (rank, world size, local rank) variable names, in order of precedence
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    secret: Optional[str] = None  # MESHSERVE_SECRET: key for control messages across hosts


def mpmd_app(env: TMapping[str, str] = os.environ) -> Optional[tuple[int, int, int]]:
    """(app index, first world rank, ranks) of this process's app when Open MPI started several
    apps in one job (MPMD: `mpirun -np 2 A : -np 1 B`), else None. Each app is its own meshserve
    job (a context server and a generation server sharing MPI_COMM_WORLD for KV transfer).
    Open MPI 4 names the app (OMPI_MCA_orte_app_num); Open MPI 5 does not, and its world ranks run
    app by app, so the app is the one whose rank range holds OMPI_COMM_WORLD_RANK."""
    sizes = env.get("OMPI_APP_CTX_NUM_PROCS", "").split()
    if len(sizes) < 2:
        return None
    counts = [int(n) for n in sizes]
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    if "OMPI_MCA_orte_app_num" in env:
        app = int(env["OMPI_MCA_orte_app_num"])
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank = int(env["OMPI_COMM_WORLD_RANK"])
        app = max(i for i, first in enumerate(firsts) if first <= rank)
    else:
        return None
    return app, firsts[app], counts[app]


DEFAULT_PORT = 29500  # torchrun's


def default_port(launcher: str, env: TMapping[str, str] = os.environ) -> int:
    """The rendezvous port when MASTER_PORT is not set. Under Slurm it comes from the job and step ids
    (15000-34999, the same on every task of a step), so two jobs or steps sharing a node do not both
    take torchrun's 29500; elsewhere 29500."""
    job = env.get("SLURM_JOB_ID", "")
    if launcher != "slurm" or not job.isdigit():
        return DEFAULT_PORT
    step = env.get("SLURM_STEP_ID", "0")
    step = int(step) if step.isdigit() else 0  # batch / extern steps have names, not numbers
    return 15000 + (int(job) * 8 + step) % 20000


def detect_launch(env: TMapping[str, str] = os.environ) -> Optional[LaunchInfo]:
    """The launcher's view of this process, or None when no launcher variables are set (or the
    launch has a single rank). Under an MPMD mpirun the job is this process's app alone: its ranks
    are numbered from 0 within the app, and app k rendezvouses on MASTER_PORT + k."""
    for name, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else default_port(name, env)
            app = mpmd_app(env) if name == "mpirun" else None
            if app is not None:
                index, first, size = app
                rank, port = rank - first, port + index
            if size <= 1:
                return None
            local = int(env.get(local_var, env.get("LOCAL_RANK", rank)))
            return LaunchInfo(name, rank, size, local, env.get("MASTER_ADDR", "127.0.0.1"), port,
                              env.get("MESHSERVE_SECRET"))
    return None


def open_mpi_major(mpirun: str = "mpirun") -> int:
    """The major version of this Open MPI's mpirun (0 when it is not Open MPI or does not answer)."""
    import re
    import subprocess

    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    m = re.search(r"Open MPI\)? (\d+)\.", out)
    return int(m.group(1)) if m else 0


def local_mpirun(mpirun: str = "mpirun", btl: str = "self,tcp") -> list[str]:
    """The mpirun command line (before the apps) of a job on this host over loopback, as root too:
    Open MPI 4 (ORTE's out-of-band channel pinned to lo with oob_tcp_if_include) or 5 (PRRTE finds
    loopback itself and refuses that option). `btl` names the byte transfer layers; "sm" (5's
    shared memory, 4's "vader") is spelled for the version found."""
    major = open_mpi_major(mpirun)
    shm = "sm" if major >= 5 else "vader"
    layers = ",".join(shm if b in ("sm", "vader") else b for b in btl.split(","))
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--mca", "btl", layers,
           "--mca", "btl_tcp_if_include", "lo"]
    if major < 5:
        cmd += ["--mca", "oob_tcp_if_include", "lo"]
    return cmd


def launch_for(args) -> Optional[LaunchInfo]:
    """The outside launcher's view of this process for LlmArgs `args` (None: ranks are spawned here, or
    one rank). Free of torch, so `meshserve serve`'s front can ask before importing it."""
    return detect_launch() if args.orchestrator_type not in ("spawn", "ray") else None

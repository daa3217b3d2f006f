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
    job (a context server and a generation server sharing MPI_COMM_WORLD for KV transfer)."""
    sizes = env.get("OMPI_APP_CTX_NUM_PROCS", "").split()
    if len(sizes) < 2 or "OMPI_MCA_orte_app_num" not in env:
        return None
    app = int(env["OMPI_MCA_orte_app_num"])
    counts = [int(n) for n in sizes]
    return app, sum(counts[:app]), counts[app]


def detect_launch(env: TMapping[str, str] = os.environ) -> Optional[LaunchInfo]:
    """The launcher's view of this process, or None when no launcher variables are set (or the
    launch has a single rank). Under an MPMD mpirun the job is this process's app alone: its ranks
    are numbered from 0 within the app, and app k rendezvouses on MASTER_PORT + k."""
    for name, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            port = int(env.get("MASTER_PORT", "29500"))
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

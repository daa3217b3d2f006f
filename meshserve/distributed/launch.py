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


def detect_launch(env: TMapping[str, str] = os.environ) -> Optional[LaunchInfo]:
    """The launcher's view of this process, or None when no launcher variables are set (or the
    launch has a single rank)."""
    for name, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            if size <= 1:
                return None
            local = int(env.get(local_var, env.get("LOCAL_RANK", rank)))
            return LaunchInfo(name, rank, size, local, env.get("MASTER_ADDR", "127.0.0.1"),
                              int(env.get("MASTER_PORT", "29500")), env.get("MESHSERVE_SECRET"))
    return None

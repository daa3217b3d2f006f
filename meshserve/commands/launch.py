"""`meshserve-launch [--every-rank] CMD ARGS...`: run a meshserve job over the ranks of an mpirun /
srun / torchrun launch (the seed's `trtllm-llmapi-launch`).

Rank 0 execs CMD with the rendezvous filled in (a script that creates `LLM(...)`, or `meshserve
serve`); its engine publishes the job's args and model in its rendezvous store. Every other rank does
not run CMD: it waits for that description (signed with MESHSERVE_SECRET when set) and serves rank 0
as a worker, holding its model shard until rank 0 shuts down, as TensorRT-LLM's MPI workers do; so a
script's own work (downloads, printing, writing files) happens once. `--every-rank` runs CMD on every
rank instead (each rank then reads its place from `OMPI_COMM_WORLD_*`, `PMI_*`, `SLURM_*` and becomes
a worker when it reaches `LLM()` / `meshserve serve`). What this also adds to running CMD directly:
- MASTER_ADDR under Slurm, when unset: the first host of the step's node list (rank 0's node with
  Slurm's default block distribution);
- a clear error instead of a hang when the ranks span several hosts and MASTER_ADDR is unknown
  (mpirun: pass `-x MASTER_ADDR=<rank 0's host>`).
Without launcher variables CMD runs as is: a single process that spawns its own ranks.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

USAGE = ("usage: meshserve-launch [--every-rank] CMD [ARGS...]   (e.g. srun ... meshserve-launch meshserve serve "
         "MODEL --tp_size 16)")

# (rank variable, its world size, how many hosts the job spans or how many of its ranks share this host)
_MPI_HOSTS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"),
)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[03-04,7],cpu1" -> "gpu03", "n[1-2]-ib" -> "n1-ib"."""
    item, depth = "", 0
    for ch in nodelist.strip():  # the first top-level item (commas inside brackets separate ranges)
        if ch == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(ch, 0)
        item += ch
    if "[" not in item:
        return item
    prefix, rest = item.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    first = ranges.split(",", 1)[0].split("-", 1)[0]
    return prefix + first + first_slurm_host(suffix)


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `env` for the command; ValueError, naming what to set, when the
    ranks cannot find rank 0."""
    if env.get("MASTER_ADDR") or "RANK" in env:  # given, or torchrun's own rendezvous
        return {}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        num_nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        if num_nodes > 1 and nodelist:
            return {"MASTER_ADDR": first_slurm_host(nodelist)}
        if num_nodes > 1:
            raise ValueError(f"SLURM_NNODES={num_nodes} but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find "
                             f"rank 0's host; set MASTER_ADDR to it")
        return {}
    for rank_var, size_var, local_var in _MPI_HOSTS:
        if rank_var in env and size_var in env and local_var in env:
            size, local = int(env[size_var]), int(env[local_var])
            if local < size:
                raise ValueError(f"{size_var}={size} ranks span several hosts ({local_var}={local}) and MASTER_ADDR "
                                 f"is not set: pass rank 0's host, e.g. `mpirun -x MASTER_ADDR=<host> "
                                 f"-x MASTER_PORT=29500 ...`")
            return {}
    return {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(f"meshserve-launch: error: no command given; {USAGE}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    every_rank = argv[0] == "--every-rank"
    if every_rank:
        argv = argv[1:]
        if not argv:
            print(f"meshserve-launch: error: no command given; {USAGE}", file=sys.stderr)
            return 2
    try:
        extra = launch_env(os.environ)
    except ValueError as e:
        print(f"meshserve-launch: error: {e}", file=sys.stderr)
        return 2
    os.environ.update(extra)
    if not every_rank:
        from meshserve.distributed.launch import detect_launch
        launch = detect_launch(os.environ)
        if launch is not None and launch.rank > 0:
            from meshserve.worker.main import serve_launched_rank
            serve_launched_rank(launch)  # ends the process
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)  # the command takes this process's place: signals and exit code are its own
    except OSError as e:
        print(f"meshserve-launch: error: cannot run {argv[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    return 1  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main())

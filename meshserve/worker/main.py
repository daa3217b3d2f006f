"""Entry points of worker ranks (every rank but 0), the only ways into worker/worker.py's loop.

- `spawned_main`: the target of a process the multi-process executor spawned on this host (the
  Ray executor's actors call `check_in` and `run_worker` the same way). It
  checks in with rank 0's store first, so rank 0 can tell a child that died while starting (the
  usual cause: a script without the `__main__` guard) from one that is still loading.
- `run_launched_rank`: a rank > 0 that an outside launcher (torchrun, mpirun, srun) started with
  the same arguments as rank 0; `meshserve serve` and `LLM()` call it on such ranks, and it ends
  the process when rank 0 shuts down (as a spawned rank ends: no interpreter teardown).
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import torch.distributed as dist
from tqdm import tqdm

from meshserve.config import LlmArgs
from meshserve.distributed.launch import LaunchInfo
from meshserve.worker.worker import RankSpec, run_worker

logger = logging.getLogger(__name__)

CHECK_IN_KEY = "meshserve/alive/{rank}"


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no spawned rank outlives the engine
    except OSError:
        pass


def check_in(spec: RankSpec):
    """Log as this rank, connect to rank 0's store and say this rank is alive; returns the store."""
    logging.basicConfig(level=spec.log_level.upper(), format=f"%(levelname)s %(name)s [rank {spec.rank}]: %(message)s")
    store = dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=spec.timeout_s))
    store.set(CHECK_IN_KEY.format(rank=spec.rank), "1")
    return store


def spawned_main(spec_json: str) -> None:
    """A rank spawned by MultiProcExecutor: check in, serve rank 0, exit with run_worker's code."""
    spec = RankSpec.from_json(spec_json)
    _die_with_parent()
    store = check_in(spec)
    # tqdm's default lock is a multiprocessing semaphore, registered with the parent's resource
    # tracker; os._exit below skips its release, and the tracker then warns of "leaked semaphore
    # objects" when the script ends. This rank's progress bars need only a thread lock.
    tqdm.set_lock(threading.RLock())
    code = run_worker(spec, store)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: process-group destructors can block at exit


def run_launched_rank(args: LlmArgs, model_path: str, launch: LaunchInfo) -> NoReturn:
    """A rank > 0 started by a launcher: hold this rank's shard for rank 0's engine until it shuts
    down, then end the process with 0, or 1 if this rank failed (the error went to rank 0 and the
    log). It never returns: the script has nothing left to run on this rank (LLM() never returns
    here), and an interpreter teardown with the process groups alive can abort in C++ ("terminate
    called without an active exception", seen once in CI on a two-namespace TP=4 run)."""
    logger.info("rank %d of %d (%s): serving rank 0's engine as a worker", launch.rank, launch.world_size,
                launch.launcher)
    spec = RankSpec(launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
                    args.model_dump(), model_path, launch.secret.encode().hex() if launch.secret else None,
                    spawned=False, log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    code = run_worker(spec)
    logger.info("rank %d: rank 0 shut down; this worker rank exits with code %d", launch.rank, code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

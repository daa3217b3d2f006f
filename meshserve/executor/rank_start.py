"""How MultiProcExecutor starts ranks 1..N-1 on this host: forked from a server process that imported
torch once, instead of N-1 fresh interpreters that each import it.

A spawned rank spends seconds importing torch (~3-4 s of CPU on a small machine) before it does
anything; eight ranks spend that eight times. multiprocessing's forkserver imports torch once
(`PRELOAD`) and forks each rank from there. What a fork from a long-lived server would get wrong,
and how it is kept right:
- the environment: the server's is the one of when it started. Each rank gets this process's current
  environment with its spec and applies it before importing anything else of meshserve; if a key
  read when a library loads (`_IMPORT_TIME_PREFIXES`: the OpenMP runtime's, torch's, the loader's) has
  changed since the server started, the ranks are spawned as before.
- stdout and stderr: the server's are where this process's pointed when it started (pytest swaps them
  per test); each rank gets this process's current ones (passed as file descriptors).
- CUDA: the server never initialises it (torch's import does not), so each rank does, as a spawned
  one would. The pickled process object travels over a pipe, as with spawn; the forkserver's
  unix socket (in a private directory, mode 0600) carries only file descriptors.
Where the platform has no forkserver, or another part of this process started one first, ranks are
spawned. This module imports no torch.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.forkserver
import os
import sys
from multiprocessing import reduction
from typing import Optional

PRELOAD = ["torch"]
_IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TORCH_", "PYTORCH_", "LD_", "PYTHON",
                         "MALLOC_")
_server_env: Optional[dict] = None  # this process's environment when our forkserver started


def _changed_at_import(before: dict, now: dict) -> list[str]:
    return sorted(k for k in before.keys() | now.keys()
                  if k.startswith(_IMPORT_TIME_PREFIXES) and before.get(k) != now.get(k))


def rank_context():
    """The multiprocessing context to start ranks with: the forkserver, or spawn where it cannot serve."""
    global _server_env
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    now = dict(os.environ)
    if _server_env is None:
        if getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None) is not None:
            return mp.get_context("spawn")  # started by someone else, with preloads and environment unknown
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _server_env = now
        return ctx
    if _changed_at_import(_server_env, now):
        return mp.get_context("spawn")
    return mp.get_context("forkserver")


class StdStreams:
    """This process's stdout and stderr, duplicated into the rank when the process object is pickled."""

    def __reduce__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        return _adopt_streams, (reduction.DupFd(1), reduction.DupFd(2))


def _adopt_streams(out, err) -> None:
    os.dup2(out.detach(), 1)
    os.dup2(err.detach(), 2)


def adopt_environment(env: dict) -> None:
    """The starting process's environment, in place of the one the forkserver started with."""
    os.environ.clear()
    os.environ.update(env)


def start_rank(spec_json: str, env: dict, streams) -> None:
    """A rank's entry point: the starting process's environment (its streams were adopted when
    unpickled), then `worker.main.spawned_main`."""
    del streams
    adopt_environment(env)
    from meshserve.worker.main import spawned_main
    spawned_main(spec_json)

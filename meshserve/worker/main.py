"""Entry points of worker ranks (every rank but 0), the only ways into worker/worker.py's loop.

- `spawned_main`: the target of a process the multi-process executor spawned on this host (the
  Ray executor's actors call `check_in` and `run_worker` the same way). It
  checks in with rank 0's store first, so rank 0 can tell a child that died while starting (the
  usual cause: a script without the `__main__` guard) from one that is still loading.
- `run_launched_rank`: a rank > 0 that an outside launcher (torchrun, mpirun, srun) started with
  the same arguments as rank 0; `meshserve serve` and `LLM()` call it on such ranks, and it ends
  the process when rank 0 shuts down (as a spawned rank ends: no interpreter teardown).
- `serve_launched_rank`: a rank > 0 under `meshserve-launch`, which skips the command and takes the
  job's args and model from rank 0's store (`publish_launch_spec`, signed with MESHSERVE_SECRET).
"""
from __future__ import annotations

import ctypes
import datetime
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import threading
from typing import NoReturn, Optional

import torch.distributed as dist
from tqdm import tqdm

from meshserve.config import LlmArgs
from meshserve.distributed.launch import LaunchInfo
from meshserve.worker.worker import RankSpec, run_worker

logger = logging.getLogger(__name__)

CHECK_IN_KEY = "meshserve/alive/{rank}"
# A launched job's RankSpec fields (args, model path), published by rank 0 in its store, so ranks > 0
# under `meshserve-launch` need not run the command (engine/worker wiring: executor/multiproc.py)
LAUNCH_SPEC_KEY = "meshserve/launch_spec"
LAUNCH_WAIT_S = 600.0  # how long a rank > 0 waits for rank 0's store and its spec


def launch_store(launch: LaunchInfo, is_master: bool):
    """The store a launched job rendezvouses through, at MASTER_ADDR:MASTER_PORT: rank 0 holds it
    unless torchrun's agent already does (TORCHELASTIC_USE_AGENT_STORE); the others connect, waiting
    up to LAUNCH_WAIT_S for it to appear."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=is_master and not agent,
                         wait_for_workers=False, timeout=datetime.timedelta(seconds=LAUNCH_WAIT_S))


def _spec_mac(secret: Optional[str], body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest() if secret else ""


def publish_launch_spec(store, args: dict, model_path: str, secret: Optional[str]) -> None:
    """Rank 0: the job's args and model for ranks that did not run the command (signed with
    MESHSERVE_SECRET when set: the store is plain TCP)."""
    body = json.dumps({"args": args, "model_path": model_path}).encode()
    store.set(LAUNCH_SPEC_KEY, json.dumps({"body": body.decode(), "mac": _spec_mac(secret, body)}))


def fetch_launch_spec(store, secret: Optional[str]) -> tuple[dict, str]:
    store.wait([LAUNCH_SPEC_KEY], datetime.timedelta(seconds=LAUNCH_WAIT_S))
    doc = json.loads(store.get(LAUNCH_SPEC_KEY))
    body = doc["body"].encode()
    if not hmac.compare_digest(doc["mac"], _spec_mac(secret, body)):
        raise RuntimeError("rank 0's job description does not carry this rank's MESHSERVE_SECRET signature: set the "
                           "same MESHSERVE_SECRET on every rank")
    spec = json.loads(body)
    return spec["args"], spec["model_path"]


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
    _serve_rank0(launch, args.model_dump(), model_path, launch_store(launch, is_master=False))


def _serve_rank0(launch: LaunchInfo, args: dict, model_path: str, store) -> NoReturn:
    spec = RankSpec(launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
                    args, model_path, launch.secret.encode().hex() if launch.secret else None,
                    spawned=False, log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    code = run_worker(spec, store)
    logger.info("rank %d: rank 0 shut down; this worker rank exits with code %d", launch.rank, code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_launched_rank(launch: LaunchInfo) -> NoReturn:
    """A rank > 0 under `meshserve-launch` that does not run the command (TensorRT-LLM's
    trtllm-llmapi-launch): wait for rank 0's engine to publish the job's args and model, then serve
    it as run_launched_rank does. A script's own work therefore runs once, on rank 0."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(name)s [rank {launch.rank}]: %(message)s")
    logger.info("rank %d of %d (%s): waiting for rank 0 at %s:%d to start an engine (up to %.0f s)", launch.rank,
                launch.world_size, launch.launcher, launch.master_addr, launch.master_port, LAUNCH_WAIT_S)
    try:
        store = launch_store(launch, is_master=False)
        args, model_path = fetch_launch_spec(store, launch.secret)
    except Exception as e:  # noqa: BLE001 - no engine came: say so in one line and end the rank
        from meshserve.errors import describe
        print(f"meshserve-launch: rank {launch.rank}: no engine from rank 0 at {launch.master_addr}:"
              f"{launch.master_port}: {describe(e)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    _serve_rank0(launch, args, model_path, store)

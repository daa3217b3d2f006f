"""One rank: join torch.distributed, build its model shard, and (for ranks other than 0) serve
commands from rank 0 until told to stop.

`build_rank` is shared by rank 0 (inside the engine process, through the multi-process executor)
and the worker ranks, whose entry points are in worker/main.py. A worker that raises reports the
error to rank 0 and returns 1, so no collective waits on it forever.
"""
from __future__ import annotations

import json
import logging
import os
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from meshserve.config import LlmArgs
from meshserve.distributed.control import (ExpertLoadReport, InitKv, KvBlocks, KvLayout, KvPullDone, ProfileKv,
                                           Ready, Result, Shutdown, StageStats, Step, WorkerChannel, WorkerError)
from meshserve.distributed.parallel_state import ParallelState, init_distributed
from meshserve.errors import describe, is_expected
from meshserve.models.config import ModelConfig
from meshserve.utils import GCPauses
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.runner_setup import mapping_for, resolve_device, runner_config

logger = logging.getLogger(__name__)


@dataclass
class RankSpec:
    """What a rank needs to join the job; JSON-serialisable so a spawned child gets plain text."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    args: dict  # LlmArgs fields
    model_path: str
    key_hex: Optional[str] = None  # control-message key, when known before rendezvous
    spawned: bool = True
    timeout_s: float = 600.0
    log_level: str = "WARNING"  # the engine's logging level, for this rank's own logging

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RankSpec":
        return cls(**json.loads(text))


def build_rank(spec: RankSpec, store=None):
    """Join the process group and build this rank's ModelRunner; returns (runner, parallel state).
    `store`: a TCPStore client already connected to rank 0's (spawned ranks), else None."""
    args = LlmArgs(**spec.args)
    model_config = ModelConfig.from_pretrained(spec.model_path)
    device = resolve_device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    device = init_distributed(spec.rank, spec.world_size, spec.master_addr, spec.master_port, backend,
                              spec.local_rank if device.type == "cuda" else None, spec.timeout_s, store)
    mapping = mapping_for(args, model_config, spec.world_size, spec.rank)
    state = ParallelState(mapping)
    rcfg = runner_config(args, spec.model_path, model_config, device)
    rcfg.show_progress = rcfg.show_progress and spec.rank == 0
    runner = ModelRunner(model_config, rcfg, state, layer_range=mapping.this_stage_layers())
    return runner, state


STARTUP_ERROR_KEY = "meshserve/failed/{rank}"


def _startup_store(store):
    """The store both sides of a start-up error use: the spawning executor's, else the default
    process group's (launched ranks), else None (not joined yet)."""
    if store is not None:
        return store
    try:
        import torch.distributed as dist
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - best effort: rank 0 then reports its own error
        return None


def publish_startup_error(store, rank: int, message: str, expected: bool) -> None:
    """A worker rank that failed before rank 0's control channel reached it: its one-line error, in
    the rendezvous store, for rank 0 to report instead of the broken collective it sees."""
    store = _startup_store(store)
    if store is None:
        return
    try:
        store.set(STARTUP_ERROR_KEY.format(rank=rank), json.dumps({"message": message, "expected": expected}))
    except Exception:  # noqa: BLE001 - rank 0 then reports its own error
        pass


def startup_errors(store, ranks) -> list[tuple[int, str, bool]]:
    """(rank, message, expected) of every rank in `ranks` that published a start-up error."""
    store = _startup_store(store)
    if store is None:
        return []
    found = []
    for rank in ranks:
        key = STARTUP_ERROR_KEY.format(rank=rank)
        try:
            if store.check([key]):
                info = json.loads(store.get(key))
                found.append((rank, info["message"], bool(info["expected"])))
        except Exception:  # noqa: BLE001 - a store that is gone holds nothing
            pass
    return found


def exchange_control_info(state, endpoint: Optional[str], key: Optional[bytes]) -> tuple[str, bytes]:
    """Rank 0 tells every rank the control endpoint (and the key, when it was not pre-shared)
    over the gloo world group: fixed-size byte tensors, no pickle."""
    buf = torch.zeros(512, dtype=torch.uint8)
    if state.mapping.rank == 0:
        payload = json.dumps({"endpoint": endpoint, "key": key.hex() if key else None}).encode()
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    group = state.world.cpu_group
    torch.distributed.broadcast(buf, src=0, group=group)
    info = json.loads(bytes(buf.tolist()).rstrip(b"\0").decode())
    return info["endpoint"], bytes.fromhex(info["key"]) if info["key"] else key


def run_worker(spec: RankSpec, store=None) -> int:
    """Serve rank 0's commands until it says Shutdown (0) or this rank fails (1, reported)."""
    channel = runner = None
    serving = False
    try:
        runner, state = build_rank(spec, store)
        endpoint, key = exchange_control_info(state, None, bytes.fromhex(spec.key_hex) if spec.key_hex else None)
        channel = WorkerChannel(endpoint, key, spec.rank)
        channel.send(Ready(spec.rank))
        parent = os.getppid()
        report_busy = state.mapping.pp_size > 1 and state.mapping.tp_rank == 0
        # results still on the device (a driver with the overlap scheduler: attention DP), in order
        pending: deque = deque()
        while True:
            transfer = runner.kv_transfer
            while pending and (pending[0].done() or len(pending) > 1):
                channel.send(Result(spec.rank, pending.popleft().result()))
            busy = (transfer is not None and transfer.busy) or pending
            msg = channel.recv(2 if busy else 1000)
            if transfer is not None:  # pulls this rank finished, for rank 0 to gather
                for rid, ok, error in transfer.take_results():
                    channel.send(KvPullDone(spec.rank, rid, ok, error))
            if msg is None:
                if spec.spawned and os.getppid() != parent:
                    return 1
                continue
            if isinstance(msg, Step):
                out = runner.execute(msg.so)
                if hasattr(out, "result"):  # sent once the device is done (loop top)
                    pending.append(out)
                elif out is not None:
                    channel.send(Result(spec.rank, out))
                for report in runner.take_expert_reports():
                    channel.send(ExpertLoadReport(spec.rank, report))
                if report_busy:
                    fraction = runner.busy.poll()
                    if fraction is not None:
                        channel.send(StageStats(spec.rank, state.mapping.pp_rank, fraction))
            elif isinstance(msg, ProfileKv):
                channel.send(KvBlocks(spec.rank, runner.available_kv_blocks(msg.free_fraction,
                                                                            msg.cpu_budget_bytes)))
            elif isinstance(msg, InitKv):
                runner.init_kv_cache(msg.num_blocks)
                GCPauses.freeze()  # the model, KV pool and graphs are up: later collections skip them
                GCPauses(f"rank {spec.rank}").install()
                serving = True
                channel.send(KvBlocks(spec.rank, msg.num_blocks))
                if runner.kv_transfer is not None:
                    channel.send(KvLayout(spec.rank, runner.kv_transfer.layout))
            elif isinstance(msg, Shutdown):
                return 0
    except BaseException as e:
        # Rank 0 reports the one-line message once. The traceback: at DEBUG for bad input and for
        # anything while starting (rank 0's hint says how to see it), at ERROR for a bug while serving.
        expected, message = is_expected(e), describe(e)
        (logger.error if serving and not expected else logger.debug)(
            "rank %d failed:\n%s", spec.rank, traceback.format_exc())
        if channel is not None:
            try:
                channel.send(WorkerError(spec.rank, message, expected))
            except Exception:
                pass
        else:  # no control channel yet (failed while joining or loading): leave it where rank 0 looks
            publish_startup_error(store, spec.rank, message, expected)
        return 1
    finally:
        if runner is not None:
            runner.close_kv_transfer()
        if channel is not None:
            channel.close()

"""MultiProcExecutor: rank 0 in the engine process, ranks 1..N-1 in worker processes.

Ranks come from one of two places: spawned here on this host (the default; each child enters
through worker/main.py's `spawned_main` and checks in with our store before the rendezvous, so
a child that dies while starting is an error here within seconds, not a hung rendezvous), or
started by an outside launcher (torchrun, mpirun, srun), in which case rank 0 runs the engine and
every other rank runs `worker.main.run_launched_rank`. Each step rank 0 sends the SchedulerOutput
to every worker over the control channel (ZMQ, HMAC-signed msgspec), runs its own shard, and gets
the sampled tokens from itself (one stage) or from the last stage's rank (pipelines). A worker
that dies or raises turns into a RuntimeError here within a second.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import multiprocessing as mp
import os
import secrets
import socket
import time
import weakref
from collections import deque
from typing import Optional

import torch.distributed as dist

from meshserve.config import LlmArgs
from meshserve.distributed.control import (DriverChannel, ExpertLoadReport, InitKv, KvBlocks, KvLayout, KvPullDone,
                                           ProfileKv, Ready, Result, Shutdown, StageStats, Step, WorkerError)
from meshserve.distributed.launch import LaunchInfo
from meshserve.executor.base import Done, Executor, choose_num_blocks, inflight_depth
from meshserve.engine.messages import ModelRunnerOutput, SchedulerOutput
from meshserve.executor.rank_start import StdStreams, rank_context, start_rank
from meshserve.worker.main import CHECK_IN_KEY, launch_store, publish_launch_spec
from meshserve.errors import RankFailedError, describe, is_expected
from meshserve.worker.worker import RankSpec, build_rank, exchange_control_info, startup_errors

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # spawned children must check in within this (they import torch and the main module)


def _keep_gloo_on_loopback() -> None:
    """Ranks spawned on this host talk over loopback: keep gloo's sockets off the network
    interfaces unless the user chose one (spawned ranks inherit the variable)."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return
    if "lo" in names:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _layout(args: LlmArgs) -> str:
    """The sizes that make the world, as the user gave them."""
    parts = [f"tensor_parallel_size={args.tensor_parallel_size}",
             f"pipeline_parallel_size={args.pipeline_parallel_size}"]
    if args.context_parallel_size > 1:
        parts.append(f"context_parallel_size={args.context_parallel_size}")
    ep = args.moe_expert_parallel_size
    if ep and ep > 1 and args.tensor_parallel_size % ep:  # the MoE rule's replicate layout: ep replicas of tp
        parts.append(f"moe_expert_parallel_size={ep} (attention replicas)")
    return " x ".join(parts)


def check_world(args: LlmArgs, device_type: str, launch: Optional[LaunchInfo], world: int) -> None:
    """`world`: the ranks the layout needs (the Mapping's world_size)."""
    if launch is not None and launch.world_size != world:
        raise ValueError(f"the launcher started {launch.world_size} ranks ({launch.launcher}), but "
                         f"{_layout(args)} needs world_size={world}")
    if device_type == "cuda" and launch is None:
        import torch
        count = torch.cuda.device_count()
        if world > count:
            raise ValueError(f"world_size={world} ({_layout(args)}) needs {world} GPUs, but only {count} are "
                             f"visible")


class PendingResult:
    def __init__(self, executor: "MultiProcExecutor"):
        self.executor = executor

    def result(self) -> ModelRunnerOutput:
        ex = self.executor
        if ex._results:
            return ex._results.popleft().out
        return ex._wait_for(lambda m: isinstance(m, Result)).out


class DpPendingResult:
    """Attention DP: a step's outputs from every DP replica's driver (rank 0's own first), merged
    into one ModelRunnerOutput (each rank's scheduler reads its own requests' rows)."""

    def __init__(self, executor: "MultiProcExecutor", step_id: int, own):
        self.executor, self.step_id, self.own = executor, step_id, own

    def done(self) -> bool:
        own_done = getattr(self.own, "done", None)
        return own_done is None or own_done()

    def result(self) -> ModelRunnerOutput:
        outs = [self.own.result()] + self.executor._dp_outputs(self.step_id)
        return merge_outputs(self.step_id, outs)


def merge_outputs(step_id: int, outs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    merged = ModelRunnerOutput(step_id)
    want_lp = any(o.logprobs for o in outs)
    for o in outs:
        merged.req_ids += o.req_ids
        merged.sampled_token_ids += o.sampled_token_ids
        if want_lp:
            merged.logprobs += o.logprobs or [None] * len(o.req_ids)
        if o.prompt_logprobs:
            merged.prompt_logprobs = {**merged.prompt_logprobs, **o.prompt_logprobs}
    return merged


class MultiProcExecutor(Executor):
    def __init__(self, args: LlmArgs, model_path: str, launch: Optional[LaunchInfo], device_type: str,
                 world_size: int, log_level: str = "WARNING"):
        self._check_world(args, device_type, launch, world_size)
        self.pipeline_stages = args.pipeline_parallel_size
        self.max_inflight = inflight_depth(self.pipeline_stages, args.overlap_scheduler, args.pipeline_micro_batches)
        self.world_size = world_size
        self.pp_size = args.pipeline_parallel_size
        self.procs: dict[int, mp.process.BaseProcess] = {}
        self._exit_hook = None
        self.channel: Optional[DriverChannel] = None
        self.state = None
        self._closed = False
        self._results: deque = deque()  # Results that arrived while we looked for errors
        self.dp_drivers: list[int] = []
        self.dp_ranks: list[list[int]] = []  # attention DP: the ranks of each DP rank
        self._pull_ranks: dict[str, int] = {}  # req id -> how many ranks report its pull (attention DP)
        self._dp_results: dict[int, dict[int, ModelRunnerOutput]] = {}  # step id -> rank -> output
        self._expert_reports: list[dict] = []  # from the other pipeline stages
        self.stage_stats: dict[int, StageStats] = {}
        self._kv_layouts: dict = {}  # rank -> RankLayout (disaggregated serving)
        self._pull_reports: dict[str, dict[int, tuple[bool, Optional[str]]]] = {}  # req id -> rank -> result
        store = None
        if launch is not None:
            addr, port = launch.master_addr, launch.master_port
            key = launch.secret.encode() if launch.secret else None
            # rank 0 holds the rendezvous store and leaves the job's description in it for the ranks
            # that meshserve-launch kept from running the command (worker/main.py serve_launched_rank)
            store = launch_store(launch, is_master=True)
            publish_launch_spec(store, args.model_dump(), model_path, launch.secret)
        else:
            addr, key = self._rendezvous_addr(), secrets.token_bytes(32)
            if addr == "127.0.0.1":
                _keep_gloo_on_loopback()
            # our own store on a free port (no race for it), so we can watch the children check in
            store = dist.TCPStore(addr, 0, world_size, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
            port = store.port
        try:
            if launch is None:
                self._spawn(args, model_path, addr, port, key, log_level)
                self._wait_check_in(store)
            spec = RankSpec(0, self.world_size, launch.local_rank if launch else self._driver_local_rank(), addr,
                            port, args.model_dump(), model_path, None, spawned=launch is None)
            self.runner, self.state = build_rank(spec, store)
            m = self.state.mapping
            # attention DP: the other replicas' drivers answer every step (tp-rank 0 of each)
            self.dp_drivers = [r for r in range(1, world_size) if m.with_rank(r).attn_tp_rank == 0] \
                if self.runner.dp else []
            # attention DP: the ranks of each DP rank (they pull the KV of that rank's generation requests)
            self.dp_ranks = [[r for r in range(world_size) if m.with_rank(r).attn_dp_rank == d]
                             for d in range(m.attn_dp_size)] if self.runner.dp else []
            shared_key = key or secrets.token_bytes(32)
            self.channel = DriverChannel(addr, shared_key)
            exchange_control_info(self.state, self.channel.endpoint, None if key else shared_key)
            self._wait_all(Ready, "to start")
        except BaseException as e:
            # A worker that failed while loading breaks rank 0's rendezvous or collective: report the
            # worker's own error (it names the cause), not the broken connection rank 0 saw.
            cause = None if is_expected(e) or not isinstance(e, Exception) else self._worker_startup_error(store)
            self.shutdown()
            if cause is not None:
                logger.debug("rank 0 stopped starting (%s) because a worker rank failed", describe(e))
                raise cause from None
            raise

    def _worker_startup_error(self, store, wait_s: float = 3.0) -> Optional[RankFailedError]:
        """The first worker rank's published start-up error, waiting up to `wait_s` for one to arrive."""
        deadline = time.monotonic() + wait_s
        while True:
            found = startup_errors(store, range(1, self.world_size))
            if found:
                rank, message, expected = found[0]
                return RankFailedError(f"worker rank {rank} failed while starting: {message}", expected)
            all_exited = bool(self.procs) and all(p.exitcode is not None for p in self.procs.values())
            if time.monotonic() > deadline or (all_exited and time.monotonic() > deadline - wait_s + 0.5):
                return None
            time.sleep(0.1)

    def _check_world(self, args: LlmArgs, device_type: str, launch: Optional[LaunchInfo], world: int) -> None:
        check_world(args, device_type, launch, world)

    def _driver_local_rank(self) -> int:
        """Rank 0's device index on this host when no launcher placed it."""
        return 0

    def _rendezvous_addr(self) -> str:
        """Where the ranks this executor starts reach rank 0 (its store, control channel, gloo)."""
        return "127.0.0.1"  # spawned on this host

    def _spawn(self, args: LlmArgs, model_path: str, addr: str, port: int, key: bytes, log_level: str) -> None:
        ctx = rank_context()  # forked from a server that imported torch once, else spawned
        for rank in range(1, self.world_size):
            spec = RankSpec(rank, self.world_size, rank, addr, port, args.model_dump(), model_path, key.hex(),
                            log_level=log_level)
            p = ctx.Process(target=start_rank, args=(spec.to_json(), dict(os.environ), StdStreams()),
                            name=f"meshserve-rank{rank}", daemon=False)
            p.start()
            self.procs[rank] = p
        if self._exit_hook is None:
            # An LLM still alive at interpreter exit (a script without shutdown() or `with`) stops its ranks
            # before multiprocessing's own exit hook joins them (which would wait forever on ranks that
            # wait for rank 0's next command). Registered after that hook, so it runs first.
            ref = weakref.ref(self)

            def stop_ranks_at_exit() -> None:
                executor = ref()
                if executor is not None:
                    executor.shutdown()
            self._exit_hook = stop_ranks_at_exit
            atexit.register(stop_ranks_at_exit)

    def _wait_check_in(self, store, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every spawned child has checked in, failing at once when one exits first."""
        pending = set(self.procs)
        deadline = time.monotonic() + timeout_s
        while pending:
            for rank in sorted(pending):
                if store.check([CHECK_IN_KEY.format(rank=rank)]):
                    pending.discard(rank)
                    continue
                code = self.procs[rank].exitcode
                if code is not None:
                    raise RankFailedError(
                        f"worker rank {rank} exited with code {code} while starting, before it joined rank 0. "
                        f"The usual cause: the script creates LLM(...) (or runs other work) at module level "
                        f"without an `if __name__ == \"__main__\":` guard; worker ranks are spawned processes "
                        f"that import the main module again. Put that code under the guard (see the README).",
                        expected=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker ranks {sorted(pending)} did not start within {timeout_s:.0f} s")
            if pending:
                time.sleep(0.05)

    # ---- waiting on workers -----------------------------------------------------------------------
    def _check_alive(self) -> None:
        for rank, p in self.procs.items():
            if p.exitcode is not None:
                raise RuntimeError(f"worker rank {rank} (pid {p.pid}) exited unexpectedly with code {p.exitcode}")

    def _handle(self, msg) -> None:
        if isinstance(msg, WorkerError):
            raise RankFailedError(f"worker rank {msg.rank} failed: {msg.message}", msg.expected)
        if isinstance(msg, StageStats):
            self.stage_stats[msg.rank] = msg
        if isinstance(msg, ExpertLoadReport):
            self._expert_reports.append(msg.report)
        if isinstance(msg, KvLayout):
            self._kv_layouts[msg.rank] = msg.layout
        if isinstance(msg, KvPullDone):
            self._pull_reports.setdefault(msg.req_id, {})[msg.rank] = (msg.ok, msg.error)
        if isinstance(msg, Result) and self.dp_drivers:
            self._dp_results.setdefault(msg.out.step_id, {})[msg.rank] = msg.out

    def _dp_outputs(self, step_id: int) -> list[ModelRunnerOutput]:
        """Every other DP driver's output of step `step_id`, in rank order (waits for them)."""
        while len(self._dp_results.get(step_id, ())) < len(self.dp_drivers):
            self._wait_for(lambda m: isinstance(m, Result) and m.out.step_id == step_id)
        got = self._dp_results.pop(step_id)
        return [got[r] for r in self.dp_drivers]

    def _wait_for(self, pred, timeout_s: Optional[float] = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            msg = self.channel.recv(200)
            if msg is not None:
                self._handle(msg)
                if pred(msg):
                    return msg
            else:
                self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the worker ranks within {timeout_s:.0f} s")

    def _wait_all(self, kind, what: str, timeout_s: float = 900.0) -> list:
        got = {}
        while len(got) < self.world_size - 1:
            msg = self._wait_for(lambda m: isinstance(m, kind), timeout_s)
            got[msg.rank] = msg
        return [got[r] for r in sorted(got)]

    def _poll_errors(self) -> None:
        while True:
            msg = self.channel.recv(0)
            if msg is None:
                break
            self._handle(msg)
            if isinstance(msg, Result) and not self.dp_drivers:
                self._results.append(msg)
        self._check_alive()

    # ---- Executor ----------------------------------------------------------------------------------
    def check_health(self) -> None:
        self._poll_errors()

    def initialize_cache(self, kv_config, max_tokens_needed: int) -> int:
        budget = int(kv_config.cpu_kv_cache_gb * 2**30)
        self.channel.broadcast(ProfileKv(kv_config.free_gpu_memory_fraction, budget))
        mine = self.runner.available_kv_blocks(kv_config.free_gpu_memory_fraction, budget)
        others = [m.num_blocks for m in self._wait_all(KvBlocks, "to size the KV cache")]
        blocks = choose_num_blocks(min([mine] + others), kv_config, self.runner.cfg.block_size, max_tokens_needed)
        self.channel.broadcast(InitKv(blocks))
        self.runner.init_kv_cache(blocks)
        self._wait_all(KvBlocks, "to allocate the KV cache")
        if self.runner.kv_transfer is not None:  # every rank's KV transfer endpoint
            while len(self._kv_layouts) < self.world_size - 1:
                self._wait_for(lambda m: isinstance(m, KvLayout), 900.0)
        return blocks

    def kv_layouts(self) -> list:
        return [self.runner.kv_transfer.layout] + [self._kv_layouts[r] for r in range(1, self.world_size)]

    def kv_pull_results(self) -> list[tuple[str, bool, Optional[str]]]:
        """Pulls every rank has finished: ok when all succeeded, else the first failure, naming its rank."""
        for rid, ok, error in self.runner.kv_transfer.take_results():
            self._pull_reports.setdefault(rid, {})[0] = (ok, error)
        self._poll_errors()
        done = []
        for rid, reports in list(self._pull_reports.items()):
            if len(reports) < self._pull_ranks.get(rid, self.world_size):
                continue
            del self._pull_reports[rid]
            self._pull_ranks.pop(rid, None)
            failed = [(r, err) for r, (ok, err) in sorted(reports.items()) if not ok]
            done.append((rid, not failed, f"rank {failed[0][0]}: {failed[0][1]}" if failed else None))
        return done

    def execute_async(self, so: SchedulerOutput):
        self._poll_errors()
        for d, part in enumerate(so.dp if self.dp_ranks else ()):  # only that DP rank's ranks pull
            for pull in part.kv_pulls:
                self._pull_ranks[pull.req_id] = len(self.dp_ranks[d])
        self.channel.broadcast(Step(so))
        try:
            out = self.runner.execute(so)
        except Exception as e:
            self._explain_failure(e)
            raise
        if self.dp_drivers:
            return DpPendingResult(self, so.step_id, out if hasattr(out, "result") else Done(out))
        if out is None:
            return PendingResult(self)
        return out if hasattr(out, "result") else Done(out)

    def _explain_failure(self, err: Exception) -> None:
        """A collective failed on rank 0: name the worker that died or raised, if one did."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            msg = self.channel.recv(100)
            if isinstance(msg, WorkerError):
                raise RankFailedError(f"worker rank {msg.rank} failed: {msg.message}", msg.expected) from err
            try:
                self._check_alive()
            except RuntimeError as dead:
                raise dead from err

    def expert_load_reports(self, flush: bool = False) -> list[dict]:
        reports = self.runner.take_expert_reports(flush) + self._expert_reports
        self._expert_reports = []
        return reports

    def stage_busy_fractions(self) -> list[float]:
        """Per pipeline stage, the busy fraction of its last ~1 s window (empty without PP)."""
        if self.pp_size <= 1:
            return []
        self.runner.busy.poll()
        fractions = [0.0] * self.pp_size
        fractions[0] = self.runner.busy.last_fraction or 0.0
        for s in self.stage_stats.values():
            fractions[s.pp_rank] = s.busy_fraction
        return fractions

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        if self.runner is not None:
            self.runner.close_kv_transfer()
        if self.channel is not None:
            try:
                self.channel.broadcast(Shutdown())
            except Exception:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        if self.channel is not None:
            self.channel.close()
        # rank 0 joined the default process group in build_rank: leave it even when that failed half
        # way (a model that did not load), or the next engine of this process cannot start
        from meshserve.distributed.parallel_state import destroy_distributed
        try:
            destroy_distributed()
        except Exception:
            pass

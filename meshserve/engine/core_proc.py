"""The engine process: an EngineCore driven by ZMQ messages from the API server's AsyncEngine.

The front starts `run_engine_process` with multiprocessing's spawn context and binds two ipc
sockets in a private folder; this process connects to both. Every message is two frames,
`[kind, msgpack payload]` (msgspec Structs, never pickle):

  front -> engine   b"add"      list[EngineCoreRequest]
                    b"abort"    list[str] (engine sequence ids)
                    b"shutdown" b""
  engine -> front   b"ready"    EngineReady       once, after the model and KV cache are up
                    b"outputs"  EngineCoreOutputs after each step (with the engine's stats)
                    b"reject"   RequestRejected   an add that failed validation; the loop goes on
                    b"failed"   EngineFailed      startup or a step raised; the process then exits

No tokenizer lives here: requests arrive as token ids, outputs leave as token ids (structured outputs
load it to compile grammars, on their first request: engine/structured_output.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import traceback
from typing import Optional

import msgspec
import zmq

from meshserve.disagg.transceiver import RankLayout
from meshserve.engine.messages import EngineCoreOutputs, EngineCoreRequest
from meshserve.errors import describe, is_expected

logger = logging.getLogger(__name__)

ADD, ABORT, SHUTDOWN = b"add", b"abort", b"shutdown"
RESET_PREFIX_CACHE = b"reset_prefix_cache"  # payload: a token the answer names (stats["prefix_cache_resets"])
READY, OUTPUTS, REJECT, FAILED = b"ready", b"outputs", b"reject", b"failed"

IDLE_POLL_MS = 500  # how long an idle engine blocks on its socket before checking its parent and workers


class EngineReady(msgspec.Struct, omit_defaults=True):
    limits: dict  # EngineLimits fields: the front mirrors EngineCore.validate with them
    num_blocks: int
    block_size: int
    pid: int
    kernel_config: dict = {}  # rank 0's kernel settings and the device they were resolved for (/version)
    kv_layouts: list[RankLayout] = []  # cache_transceiver_config: every rank's KV layout, rank 0 first


class RequestRejected(msgspec.Struct):
    request_id: str
    message: str


class EngineFailed(msgspec.Struct, omit_defaults=True):
    message: str  # one line (errors.describe): the front prints it as it is
    during_startup: bool = False
    unexpected: bool = False  # a bug, not bad input: the traceback is in the engine's DEBUG log


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_engine_process(args_json: str, model_path: str, input_addr: str, output_addr: str,
                       parent_pid: int, log_level: str = "INFO", tokenizer_path: Optional[str] = None) -> None:
    """Entry point of the spawned engine process."""
    # The front owns shutdown: it drains HTTP requests first, then sends b"shutdown". A Ctrl-C
    # reaches the whole process group, so SIGINT is ignored (worker ranks spawned from here inherit
    # that), and SIGTERM too once serving (systemd signals every process of the service). While
    # loading, SIGTERM exits cleanly: the front sends it when stopped before the engine is ready.
    # We stay in the front's process group, so a launcher that kills the group (mpirun) kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s [engine]: %(message)s", force=True)
    from meshserve.config import LlmArgs
    from meshserve.engine.setup import create_engine_core, launch_for

    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    args = LlmArgs.model_validate_json(args_json)
    try:
        core = create_engine_core(args, model_path, launch_for(args), log_level, tokenizer_path)
    except SystemExit as e:
        if e.code != 128 + signal.SIGTERM:
            raise
        # the front stopped us while loading (_exit_on_signal): nothing to report; every socket
        # closes at once, or ctx.term() would wait on them
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting already: a second one must not cut the exit short
        inp.close(linger=0)
        out.close(linger=0)
        ctx.term()
        raise
    except BaseException as e:  # noqa: BLE001 - every startup failure goes back to the front
        # the front prints the one-line message once; the traceback only with --log-level debug
        logger.debug("engine startup failed:\n%s", traceback.format_exc())
        failed = EngineFailed(describe(e), during_startup=True, unexpected=not is_expected(e))
        out.send_multipart([FAILED, encoder.encode(failed)])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the front's stop after it reads this: we exit anyway
        inp.close(linger=0)  # ctx.term() waits for every socket; `out` lingers to deliver the failure
        out.close()
        ctx.term()
        raise SystemExit(1) from None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    core.late_launch = args.overlap_late_launch and core.executor.max_inflight == 2
    from meshserve.utils import GCPauses
    frozen = GCPauses.freeze()  # what startup built (model, graphs, caches) is never scanned again
    GCPauses("engine").install()
    logger.debug("froze %d objects out of garbage collection", frozen)
    try:
        limits = dataclasses.asdict(core.limits)
        ready = EngineReady(limits, core.kv.num_blocks, core.kv.block_size, os.getpid(),
                            core.executor.kernel_settings(), list(core.kv_layouts))
        out.send_multipart([READY, encoder.encode(ready)])
        EngineLoop(core, inp, out, parent_pid).run()
    finally:
        core.shutdown()
        inp.close()
        out.close()
        ctx.term()


class EngineLoop:
    """Drain the input socket, step while there is work, push outputs; block when idle."""

    def __init__(self, core, inp: zmq.Socket, out: zmq.Socket, parent_pid: int):
        self.core = core
        self.inp, self.out = inp, out
        self.parent_pid = parent_pid
        self.encoder = msgspec.msgpack.Encoder()
        self.add_decoder = msgspec.msgpack.Decoder(list[EngineCoreRequest])
        self.abort_decoder = msgspec.msgpack.Decoder(list[str])
        self.token_decoder = msgspec.msgpack.Decoder(int)
        self.resets: list[list] = []  # [token, done] of each prefix-cache reset, sent with the next stats
        self.stopping = False
        self.pending_outputs: list = []  # abort confirmations, sent with the next message
        self.unscheduled: dict[str, object] = {}  # seq id -> engine Request not yet scheduled (queue time)
        self.queue_times: list[float] = []
        self.iteration_latencies: list[float] = []
        self.last_iterations = core.num_iterations
        self.rss = (0.0, 0)  # (when read, resident bytes of this engine process): read at most once a second

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        self._send([])  # the first stats (KV pool size) before any request
        while not self.stopping:
            busy = self.core.has_unfinished()
            changed = False
            timeout = 0 if busy else IDLE_POLL_MS
            if busy and self.core.defer_until:  # late launch: wait for arrivals until the batch is due
                timeout = max(0, int((self.core.defer_until - time.perf_counter()) * 1000))
            transfer_poll = None if busy else self.core.transfer_poll_s()
            if transfer_poll is not None:  # KV handovers pending: look at them now and then
                timeout = max(1, int(transfer_poll * 1000))
            if poller.poll(timeout):
                changed = self._drain()
            if os.getppid() != self.parent_pid:
                logger.warning("the API server process is gone; the engine exits")
                return
            if self.stopping:
                return
            if self.core.has_unfinished():
                try:
                    outputs = self.core.step()
                except Exception as e:  # noqa: BLE001 - reported to the front, which turns /health to 503
                    logger.error("engine step failed:\n%s", traceback.format_exc())
                    self.out.send_multipart([FAILED, self.encoder.encode(EngineFailed(f"{type(e).__name__}: {e}"))])
                    return
                if outputs or changed or self.pending_outputs or not self.core.defer_until:
                    self._send(outputs)
            elif self.core.has_transfers():
                events = self.core.kv_events
                try:
                    outputs = self.core.step()  # releases, expired pins, finished pulls
                except Exception as e:  # noqa: BLE001 - as above
                    logger.error("engine step failed:\n%s", traceback.format_exc())
                    self.out.send_multipart([FAILED, self.encoder.encode(EngineFailed(f"{type(e).__name__}: {e}"))])
                    return
                if outputs or changed or self.pending_outputs or self.core.kv_events != events:
                    self._send(outputs)
            else:
                try:  # idle: a worker rank that died is noticed now, not at the next request
                    self.core.executor.check_health()
                except Exception as e:  # noqa: BLE001 - reported to the front, which turns /health to 503
                    logger.error("a worker rank failed while the engine was idle: %s", e)
                    self.out.send_multipart([FAILED, self.encoder.encode(EngineFailed(f"{type(e).__name__}: {e}"))])
                    return
                if changed or self.pending_outputs:
                    self._send([])

    def _drain(self) -> bool:
        """Handle every message already queued; returns whether any changed the engine's state."""
        changed = False
        while True:
            try:
                kind, payload = self.inp.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return changed
            changed = True
            if kind == ADD:
                self._add(self.add_decoder.decode(payload))
            elif kind == ABORT:
                ids = self.abort_decoder.decode(payload)
                self.pending_outputs.extend(self.core.abort_requests(ids))
                for rid in ids:
                    self.unscheduled.pop(rid, None)
            elif kind == RESET_PREFIX_CACHE:
                self.resets.append([self.token_decoder.decode(payload), self.core.reset_prefix_cache()])
            elif kind == SHUTDOWN:
                self.stopping = True
                return changed
            else:
                logger.error("unknown message kind %r ignored", kind)

    def _add(self, requests: list[EngineCoreRequest]) -> None:
        for req in requests:
            try:
                self.core.add_core_request(req)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                self.out.send_multipart([REJECT, self.encoder.encode(RequestRejected(req.request_id, msg))])
                continue
            engine_req = getattr(self.core.scheduler, "requests", {}).get(req.request_id)
            if engine_req is not None:
                self.unscheduled[req.request_id] = engine_req

    def _collect_timings(self) -> None:
        if self.core.num_iterations != self.last_iterations:
            self.last_iterations = self.core.num_iterations
            self.iteration_latencies.append(self.core.iteration_latency_s)
        if self.unscheduled:
            for rid, req in list(self.unscheduled.items()):
                started = getattr(req, "first_scheduled_time", None)
                if started is not None:
                    self.queue_times.append(max(0.0, started - req.arrival_time))
                    del self.unscheduled[rid]
                elif req.status.finished:
                    del self.unscheduled[rid]

    def _rss(self) -> int:
        """This engine process's resident memory (/metrics meshserve_engine_resident_memory_bytes)."""
        now = time.monotonic()
        if now - self.rss[0] >= 1.0:
            self.rss = (now, resident_bytes())
        return self.rss[1]

    def _send(self, outputs: list) -> None:
        self._collect_timings()
        if self.pending_outputs:
            outputs = self.pending_outputs + list(outputs)
            self.pending_outputs = []
        stats = self.core.stats()
        stats["iteration_latencies_s"], self.iteration_latencies = self.iteration_latencies, []
        stats["queue_times_s"], self.queue_times = self.queue_times, []
        stats["time"] = time.time()
        stats["rss_bytes"] = self._rss()
        if self.resets:
            stats["prefix_cache_resets"], self.resets = self.resets, []
        self.out.send_multipart([OUTPUTS, self.encoder.encode(EngineCoreOutputs(outputs=outputs, stats=stats))])


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def decode_front_message(kind: bytes, payload: bytes, decoders: Optional[dict] = None):
    """Decode one engine -> front message into its Struct (used by AsyncEngine)."""
    decoders = decoders or FRONT_DECODERS
    dec = decoders.get(kind)
    if dec is None:
        raise ValueError(f"unknown message kind {kind!r} from the engine process")
    return dec.decode(payload)


FRONT_DECODERS = {
    READY: msgspec.msgpack.Decoder(EngineReady),
    OUTPUTS: msgspec.msgpack.Decoder(EngineCoreOutputs),
    REJECT: msgspec.msgpack.Decoder(RequestRejected),
    FAILED: msgspec.msgpack.Decoder(EngineFailed),
}

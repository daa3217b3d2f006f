"""AsyncEngine: the API server's handle on an engine process (core_proc.py), over ZMQ ipc.

It starts the engine process, runs the engine's request validation (engine_core.validate, with
the limits the engine reports when ready) so a bad request fails synchronously, and routes the
engine's outputs to one RequestStream per user request through the OutputProcessor that LLM uses
too (n > 1 expansion, detokenizing, stop strings, stream_interval); a sequence that hits a stop
string is aborted in the engine.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from typing import AsyncIterator, Optional, Protocol

import msgspec
import zmq
import zmq.asyncio

from meshserve.config import LlmArgs
from meshserve.engine import core_proc
from meshserve.engine.prestart import take_prestarted
from meshserve.engine.engine_core import EngineLimits, check_priority, validate
from meshserve.engine.detokenizer import RequestState
from meshserve.engine.output_processor import OutputProcessor
from meshserve.engine.messages import DisaggRequest, EngineCoreOutputs, EngineCoreRequest
from meshserve.outputs import RequestOutput
from meshserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine process failed or exited; no request can be served. `unexpected`: it failed from a
    bug rather than bad input (its traceback is in the engine's DEBUG log)."""

    def __init__(self, message: str, unexpected: bool = False):
        super().__init__(message)
        self.unexpected = unexpected


class RequestRejectedError(ValueError):
    """The engine refused a request (its own validation); a client error."""


class QueueFullError(RuntimeError):
    """Too many sequences are waiting for their first token; the client should retry later."""


class KvTransferError(RuntimeError):
    """A generation_only request could not get its KV from the context server (disaggregated serving)."""


class EngineObserver(Protocol):
    """What AsyncEngine reports to (the server's metrics implement it)."""

    def on_request_added(self, state: RequestState) -> None: ...

    def on_engine_stats(self, stats: dict) -> None: ...

    def on_tokens(self, num_generated: int) -> None: ...

    def on_request_finished(self, state: RequestState, finish_time: float) -> None: ...


class RequestStream:
    """One user request in flight: its RequestState plus a wake-up for whoever awaits it."""

    def __init__(self, engine: "AsyncEngine", state: RequestState):
        self.engine = engine
        self.state = state
        self.error: Optional[BaseException] = None
        self.done = False  # finished, aborted or failed: no more engine outputs are routed here
        self._event = asyncio.Event()

    @property
    def request_id(self) -> str:
        return self.state.request_id

    def _wake(self) -> None:
        self._event.set()

    async def _wait(self) -> None:
        await self._event.wait()
        self._event.clear()
        if self.error is not None:
            raise self.error

    async def wait_started(self) -> None:
        """Until the first output or the end (raising the stream's error); what came stays for
        `deltas()` / `result()` to read."""
        def started() -> bool:
            return self.done or any(s.token_ids for s in self.state.seqs.values())
        while self.error is None and not started():
            await self._event.wait()
            if self.error is None and not started():
                self._event.clear()
        if self.error is not None:
            raise self.error

    async def deltas(self) -> AsyncIterator[RequestOutput]:
        """Partial outputs, each holding only what was added since the previous one; the last one
        has `finished` set. Several engine steps between two reads coalesce into one delta."""
        while True:
            await self._wait()
            out = self.state.make_output(streaming_delta=True)
            yield out
            if out.finished:
                return

    async def result(self) -> RequestOutput:
        while not self.state.finished:
            await self._wait()
        return self.state.make_output()

    def abort(self) -> None:
        self.engine.abort(self)


class AsyncEngine:
    def __init__(self, args: LlmArgs, model_path: str, tokenizer, observer: Optional[EngineObserver] = None,
                 log_level: str = "INFO", tokenizer_path: Optional[str] = None):
        # tokenizer_path: the tokenizer's folder, which the engine loads for structured outputs (None: the model's)
        self.args = args
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.tokenizer = tokenizer
        self.observer = observer
        self.log_level = log_level
        self.max_waiting_requests = args.max_waiting_requests
        self.stream_interval = args.stream_interval
        self.limits: Optional[EngineLimits] = None
        self.ready: Optional[core_proc.EngineReady] = None
        self.stats: dict = {}
        self.error: Optional[str] = None
        self._streams: dict[str, RequestStream] = {}  # user request id -> stream
        self.processor = OutputProcessor(tokenizer, args.stream_interval)
        self._proc = None
        self._ipc_dir: Optional[str] = None
        self._ctx: Optional[zmq.Context] = None
        self._actx: Optional[zmq.asyncio.Context] = None
        self._in_sock = None
        self._out_sock = None
        self._tasks: list[asyncio.Task] = []
        self._ready_fut: Optional[asyncio.Future] = None
        self._closed = False
        self._encoder = msgspec.msgpack.Encoder()
        self._resets: dict[int, asyncio.Future] = {}  # token -> the prefix-cache reset awaiting the engine
        self._reset_tokens = itertools.count(1)

    def set_tokenizer(self, tokenizer) -> None:
        """The tokenizer, when it was loaded beside the engine's start (serve): set before any request."""
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer, self.stream_interval)

    # ---- process lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the engine process and wait until it has loaded the model (or failed to)."""
        self._ipc_dir = tempfile.mkdtemp(prefix="meshserve-ipc-")
        os.chmod(self._ipc_dir, 0o700)
        input_addr = f"ipc://{self._ipc_dir}/input"
        output_addr = f"ipc://{self._ipc_dir}/output"
        self._ctx = zmq.Context()
        self._in_sock = self._ctx.socket(zmq.PUSH)
        self._in_sock.setsockopt(zmq.SNDHWM, 0)
        self._in_sock.setsockopt(zmq.LINGER, 1000)
        self._in_sock.bind(input_addr)
        self._actx = zmq.asyncio.Context()
        self._out_sock = self._actx.socket(zmq.PULL)
        self._out_sock.setsockopt(zmq.RCVHWM, 0)
        self._out_sock.bind(output_addr)

        order = dict(args_json=self.args.model_dump_json(), model_path=self.model_path, input_addr=input_addr,
                     output_addr=output_addr, parent_pid=os.getpid(), log_level=self.log_level,
                     tokenizer_path=self.tokenizer_path)
        self._proc = take_prestarted(order)
        how = "prestarted, its imports done beside this process's"
        if self._proc is None:
            mp = multiprocessing.get_context("spawn")
            self._proc = mp.Process(target=core_proc.run_engine_process, name="meshserve-engine",
                                    args=tuple(order.values()))
            self._proc.start()
            how = "spawned"
        logger.info("engine process %d %s; loading %s", self._proc.pid, how, self.model_path)
        loop = asyncio.get_running_loop()
        self._ready_fut = loop.create_future()
        self._tasks = [asyncio.create_task(self._output_loop(), name="meshserve-engine-outputs"),
                       asyncio.create_task(self._watch_process(), name="meshserve-engine-watch")]
        try:
            await self._ready_fut
        except BaseException:
            await self.shutdown()
            raise
        logger.info("engine ready: max_seq_len=%d, KV cache %d tokens", self.limits.max_seq_len,
                    self.limits.kv_capacity_tokens)

    @property
    def engine_pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def healthy(self) -> bool:
        return (self.error is None and not self._closed and self.limits is not None
                and self._proc is not None and self._proc.is_alive())

    async def _watch_process(self) -> None:
        while not self._closed:
            await asyncio.sleep(0.5)
            if self._proc is not None and not self._proc.is_alive() and not self._closed:
                await asyncio.sleep(0.3)  # let its last message (the error that ended it) arrive first
                if not self._closed:
                    self._fail(f"the engine process exited unexpectedly (exit code {self._proc.exitcode})")
                return

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process (asking first, then terminating) and fail what is left."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            self._finish_stream(stream, error=EngineDeadError("the server is shutting down"))
        if self._proc is not None and self._proc.is_alive():
            if self.limits is None:  # still loading: SIGTERM makes it clean up and exit
                self._proc.terminate()
            else:
                try:
                    self._in_sock.send_multipart([core_proc.SHUTDOWN, b""], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            deadline = time.monotonic() + timeout_s
            while self._proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._proc.is_alive():
                logger.warning("engine process did not exit in %.0f s; killing it", timeout_s)
                self._proc.kill()
                self._proc.join(5)
        if self._proc is not None:
            self._proc.join(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or already failed
                pass
        for sock in (self._in_sock, self._out_sock):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._ctx, self._actx):
            if ctx is not None:
                ctx.term()
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self._ready_fut is not None and not self._ready_fut.done():
            self._ready_fut.set_exception(EngineDeadError("the engine was shut down before it was ready"))

    def _fail(self, message: str, unexpected: bool = False) -> None:
        starting = self._ready_fut is not None and not self._ready_fut.done()
        if self.error is None:
            # while starting, start() raises it and the caller reports it once (serve prints one line)
            (logger.debug if starting else logger.error)("engine failed: %s", message)
            self.error = message
        if starting:
            self._ready_fut.set_exception(EngineDeadError(message, unexpected))
        for stream in list(self._streams.values()):
            self._finish_stream(stream, error=EngineDeadError(f"the engine failed: {message}"))
        for fut in self._resets.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(f"the engine failed: {message}"))
        self._resets.clear()

    async def reset_prefix_cache(self, timeout_s: float = 60.0) -> bool:
        """The engine forgets its cached prefix blocks (EngineCore.reset_prefix_cache): True when
        done, False while requests hold KV blocks."""
        if not self.healthy:
            raise EngineDeadError(self.error or "the engine is not running")
        token = next(self._reset_tokens)
        fut = asyncio.get_running_loop().create_future()
        self._resets[token] = fut
        try:
            self._send(core_proc.RESET_PREFIX_CACHE, token)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._resets.pop(token, None)

    # ---- requests ----------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, resume_output_token_ids=(),
                 kv_capacity: bool = True) -> None:
        """The engine's own checks, run here against the limits it reported."""
        validate(self.limits, prompt_token_ids, params, resume_output_token_ids, kv_capacity)

    @property
    def num_pending_sequences(self) -> int:
        """Sequences admitted that have not produced a token yet: waiting in the engine's queue
        (or in their prefill)."""
        return self.processor.num_pending_sequences()

    def check_capacity(self) -> None:
        if not self.healthy:
            raise EngineDeadError(self.error or "the engine is not running")
        limit = self.max_waiting_requests
        if limit is not None and self.num_pending_sequences >= limit:
            raise QueueFullError(f"the server is busy: {self.num_pending_sequences} requests are waiting "
                                 f"(max_waiting_requests={limit}); retry later")

    def add_request(self, prompt: Optional[str], prompt_token_ids: list[int], params: SamplingParams,
                    request_id: Optional[str] = None, disagg: Optional[DisaggRequest] = None,
                    resume_output_token_ids: Optional[list[int]] = None,
                    cache_salt: Optional[str] = None, priority: int = 0) -> RequestStream:
        """Validate and submit one request (n sequences); raises ValueError for a bad request,
        QueueFullError or EngineDeadError when it cannot be taken now. `disagg`: its part in
        disaggregated serving (one sequence). `resume_output_token_ids`: a resumed request's outputs
        so far (engine/request.py; `params` count max_tokens and min_tokens from that run's start):
        its output's text is the whole output's, its token ids the new ones, and its prompt token
        ids (what usage counts) the prompt followed by the resumed ones, all of which it prefills."""
        self.check_capacity()
        resume = list(resume_output_token_ids or ())
        self.validate(prompt_token_ids, params, resume)
        check_priority(self.limits, priority)
        rid = request_id or uuid.uuid4().hex
        state, seqs = self.processor.add_request(rid, prompt, list(prompt_token_ids) + resume, params)
        if resume:
            try:
                state.resume_output(resume)
            except BaseException:
                self.processor.abort_request(rid)
                raise
        stream = RequestStream(self, state)
        now = time.monotonic()
        reqs = [EngineCoreRequest(sid, list(prompt_token_ids), p.to_dict(), arrival_time=now, disagg=disagg,
                                  resume_output_token_ids=resume, cache_salt=cache_salt, priority=priority)
                for sid, p in seqs]
        try:
            self._send(core_proc.ADD, reqs)  # no await between registering and sending: no output is missed
        except EngineDeadError:
            self.processor.abort_request(rid)
            raise
        self._streams[rid] = stream
        if self.observer is not None:
            self.observer.on_request_added(state)
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stop a request (client gone): its unfinished sequences are aborted in the engine,
        which frees their KV blocks."""
        if stream.done:
            return
        sids = self.processor.abort_request(stream.request_id)
        stream.state.abort()
        self._finish_stream(stream)
        if sids:
            self._send_quietly(core_proc.ABORT, sids)

    def _send(self, kind: bytes, payload) -> None:
        try:
            self._in_sock.send_multipart([kind, self._encoder.encode(payload)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._fail(f"cannot reach the engine process: {e}")
            raise EngineDeadError(self.error) from e

    def _send_quietly(self, kind: bytes, payload) -> None:
        """Send if the engine is up; a dead engine has already been reported by _fail."""
        if self.healthy:
            try:
                self._send(kind, payload)
            except EngineDeadError:
                pass

    def _finish_stream(self, stream: RequestStream, error: Optional[BaseException] = None) -> None:
        if stream.done:
            return
        stream.done = True
        stream.error = error
        self._streams.pop(stream.request_id, None)
        self.processor.abort_request(stream.request_id)  # a no-op once it finished normally
        if error is None and self.observer is not None:
            self.observer.on_request_finished(stream.state, time.monotonic())
        stream._wake()

    # ---- outputs -----------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        while True:
            kind, payload = await self._out_sock.recv_multipart()
            try:
                msg = core_proc.decode_front_message(kind, payload)
            except (ValueError, msgspec.DecodeError) as e:
                logger.error("bad message from the engine: %s", e)
                continue
            if kind == core_proc.OUTPUTS:
                try:
                    self._route(msg)
                except Exception:  # noqa: BLE001 - a bug here must not stall every other request
                    logger.exception("routing engine outputs failed")
            elif kind == core_proc.READY:
                self.ready = msg
                self.limits = EngineLimits(**msg.limits)
                if not self._ready_fut.done():
                    self._ready_fut.set_result(msg)
            elif kind == core_proc.REJECT:
                self._reject(msg)
            elif kind == core_proc.FAILED:
                self._fail(msg.message, msg.unexpected)

    def _reject(self, msg: core_proc.RequestRejected) -> None:
        state = self.processor.request_of(msg.request_id)
        stream = self._streams.get(state.request_id) if state is not None else None
        if stream is None:
            return
        others = [sid for sid in self.processor.abort_request(stream.request_id) if sid != msg.request_id]
        if others:
            self._send_quietly(core_proc.ABORT, others)
        self._finish_stream(stream, error=RequestRejectedError(msg.message))

    def _route(self, msg: EngineCoreOutputs) -> None:
        failed_transfers = {}  # request id -> why its KV transfer failed
        for out in msg.outputs:
            if out.error is not None:
                state = self.processor.request_of(out.request_id)
                if state is not None:
                    failed_transfers[state.request_id] = out.error
        res = self.processor.process(msg.outputs)
        for rid, error in failed_transfers.items():
            stream = self._streams.get(rid)
            if stream is not None:
                self._finish_stream(stream, error=KvTransferError(error))
        for state, err in res.failed:
            stream = self._streams.get(state.request_id)
            if stream is not None:
                self._finish_stream(stream, error=RuntimeError(
                    f"processing the output failed: {type(err).__name__}: {err}"))
        if res.abort_seq_ids:
            self._send_quietly(core_proc.ABORT, res.abort_seq_ids)
        for state in res.finished:
            stream = self._streams.get(state.request_id)
            if stream is not None:
                self._finish_stream(stream)
        for state in res.due:
            stream = self._streams.get(state.request_id)
            if stream is not None:
                stream._wake()
        num_tokens = res.num_tokens
        if msg.stats is not None:
            self.stats = msg.stats
            for token, done in msg.stats.pop("prefix_cache_resets", ()):
                fut = self._resets.get(token)
                if fut is not None and not fut.done():
                    fut.set_result(done)
        if self.observer is not None:
            if num_tokens:
                self.observer.on_tokens(num_tokens)
            if msg.stats is not None:
                self.observer.on_engine_stats(msg.stats)

"""The DEFAULT backend's sink: pulls a request's KV from the context ranks over TCP (tcp.py's docstring).

For each layer it holds, it picks the context ranks covering its KV heads (several when the context TP
is larger, one replica when heads are replicated; any rank holding the layer for latent caches), then
asks each, one thread and one connection per context rank, for its share in chunks of at most
`max_tokens_in_buffer` tokens, scattering each answer into its own blocks (kv_io.py re-blocks).
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Optional, Sequence

import msgspec
import torch

from meshserve.disagg import kv_io
from meshserve.disagg.cuda_ipc import IpcSinkMixin, _ipc_local_why
from meshserve.disagg.transceiver import KvRequest, KvSink, PullResult, RankLayout, TransferState
from meshserve.disagg.wire import (_MAC_LEN, MAC_SCHEME, Data, Error, Hello, Ok, Read, Release, _as_bytes, _AuthError,
                                   _check_caches, _Conn, _cuda_stream, _decoder, _Fail, _one_line, _peer_address,
                                   _Staging, check_payload, host_identity, is_loopback, normalized, parse_endpoint,
                                   tristate)

logger = logging.getLogger("meshserve.disagg.tcp")  # the DEFAULT backend's logger: its records keep their name


def _compatible(sink: RankLayout, src: RankLayout) -> Optional[str]:
    """A one-line reason a source's KV cannot go into the sink's caches, or None."""
    for name in ("model_id", "dtype", "kind", "head_dim", "num_kv_heads", "latent_dim"):
        a, b = getattr(src, name), getattr(sink, name)
        if a != b:
            return (f"{name} mismatch: the context rank at {src.endpoint} has {name}={a!r}, this generation "
                    f"rank has {name}={b!r}")
    return None


class TcpKvSink(IpcSinkMixin, KvSink):
    READ_AHEAD = 1  # Reads sent beyond the one being answered
    decoder = _decoder  # as TcpKvSource.decoder

    def __init__(self, kv_caches: list, layout: RankLayout, max_tokens_in_buffer: Optional[int] = None,
                 key: Optional[bytes] = None, verify_payload="auto", cuda_ipc="auto"):
        layout = normalized(layout)
        _check_caches(kv_caches, layout, "KV sink")
        if max_tokens_in_buffer is not None and max_tokens_in_buffer <= 0:
            raise ValueError(f"max_tokens_in_buffer must be positive, got {max_tokens_in_buffer}")
        self.kv_caches = list(kv_caches)
        self.layout = layout
        self.max_tokens_in_buffer = max_tokens_in_buffer
        self.key = key
        # cache_transceiver_config.verify_payload: ask for and check each chunk's MAC (with a key);
        # "auto": unless the source is this host over loopback (_verify)
        self.verify_payload = tristate(verify_payload, "verify_payload")
        # cache_transceiver_config.cuda_ipc: GPU-to-GPU from same-host sources (the module's docstring)
        self.cuda_ipc = tristate(cuda_ipc, "cuda_ipc")
        self.host_id = host_identity()
        self._pinned = any(c.device.type == "cuda" for c in self.kv_caches)
        self._ipc_why = ("the backend has its own data path" if type(self).decoder is not _decoder
                         else _ipc_local_why(self.kv_caches))
        if self.cuda_ipc is True and self._ipc_why:
            raise ValueError(f"cache_transceiver_config.cuda_ipc=true cannot be used here: {self._ipc_why}; set "
                             f"cuda_ipc: auto (TCP where it cannot be used) or false")
        self._ipc_lock = threading.Lock()
        self._ipc_views: dict[str, tuple[bytes, list]] = {}  # endpoint -> (source instance, its caches opened)
        self._ipc_failed: dict[str, tuple[bytes, str]] = {}  # endpoint -> (source instance, why it failed)
        self._ipc_noted = False
        self._path = threading.local()
        self._paths_lock = threading.Lock()
        self.paths: dict[str, int] = {}  # source connections that moved their bytes over each path

    # -- which path, and the payload MAC -------------------------------------------------------

    def _same_host_loopback(self, conn: _Conn) -> bool:
        """The source is this host (its Hello's host identity) and the connection is loopback."""
        return (bool(self.host_id) and getattr(conn, "peer_host", "") == self.host_id
                and is_loopback(getattr(conn, "peer_addr", "")))

    def _verify(self, conn: _Conn) -> bool:
        """Ask for and check payload MACs on this connection (verify_payload: auto, true, false)."""
        if conn.payload_key is None:
            return False
        if self.verify_payload == "auto":
            return not self._same_host_loopback(conn)
        return bool(self.verify_payload)

    def _count_path(self, path: str) -> None:
        self._path.value = path
        with self._paths_lock:
            self.paths[path] = self.paths.get(path, 0) + 1

    def _plan(self, sources: Sequence[RankLayout]) -> dict[int, list[tuple[int, tuple[int, int]]]]:
        """Source index -> [(model layer, model KV heads [a, b))] to read from it."""
        lay = self.layout
        split = [s for s in sources if s.cp[1] > 1]
        if split:
            raise _Fail(f"context rank {split[0].endpoint} runs context parallelism (cp size {split[0].cp[1]}): its "
                        f"ranks hold parts of each block, so it cannot serve a request's KV; run context servers "
                        f"without cp")
        plan: dict[int, list[tuple[int, tuple[int, int]]]] = {}
        for layer in lay.layers:
            holders = [j for j, s in enumerate(sources) if layer in s.layers]
            if not holders:
                raise _Fail(f"no context rank holds layer {layer}")
            if lay.kind == "latent":
                plan.setdefault(holders[layer % len(holders)], []).append((layer, (0, 0)))
                continue
            p, end = lay.kv_heads
            while p < end:
                covering = [j for j in holders if sources[j].kv_heads[0] <= p < sources[j].kv_heads[1]]
                if not covering:
                    raise _Fail(f"no context rank holds KV head {p} of layer {layer}")
                reach = max(sources[j].kv_heads[1] for j in covering)
                replicas = [j for j in covering if sources[j].kv_heads[1] == reach]
                j = replicas[(layer + p) % len(replicas)]  # spread reads over replicas
                q = min(end, reach)
                plan.setdefault(j, []).append((layer, (p, q)))
                p = q
        return plan

    def pull(self, sources: list[RankLayout], src: KvRequest, dst_block_ids: list[list[int]],
             timeout_s: float) -> PullResult:
        start = time.monotonic()
        deadline = start + timeout_s
        try:
            if not sources:
                raise _Fail("no context ranks to pull from")
            try:
                sources = [normalized(s) for s in sources]
            except (msgspec.ValidationError, TypeError) as e:
                raise _Fail(f"malformed context rank layout ({e})") from None
            for s in sources:
                why = _compatible(self.layout, s)
                if why:
                    raise _Fail(why)
            for layer in self.layout.layers:
                g = self.layout.group_of(layer)
                if g >= len(dst_block_ids) or len(dst_block_ids[g]) * self.layout.block_size < src.num_tokens:
                    raise _Fail(f"the generation rank's blocks of group {g} do not hold {src.num_tokens} tokens")
            plan = self._plan(sources) if src.num_tokens > 0 else {}
        except _Fail as e:
            return PullResult(TransferState.FAILED, _one_line(str(e)), 0, time.monotonic() - start)
        abort = threading.Event()
        errors: list[str] = []
        moved = [0] * len(sources)
        paths: set[str] = set()

        def job(j: int) -> None:
            try:
                self._path.value = None
                moved[j] = self._pull_from(sources[j], plan[j], src, dst_block_ids, deadline, abort)
                if self._path.value:
                    paths.add(self._path.value)
            except _Fail as e:
                errors.append(_one_line(str(e)))
                abort.set()
            except Exception as e:  # never raise out of pull: a bug here is a failed transfer
                errors.append(_one_line(f"KV pull from {sources[j].endpoint} failed: {type(e).__name__}: {e}"))
                abort.set()

        threads = [threading.Thread(target=job, args=(j,), name="kv-sink-pull", daemon=True) for j in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # every job stops by the deadline (socket timeouts): nothing writes after this
        seconds = time.monotonic() - start
        path = "+".join(sorted(paths))
        if errors:
            return PullResult(TransferState.FAILED, errors[0], sum(moved), seconds, path)
        return PullResult(TransferState.SUCCESS, None, sum(moved), seconds, path)

    def _connect(self, source: RankLayout, deadline: float, expect: Optional[RankLayout]) -> _Conn:
        """A connection past the source's Hello (checked against `expect` when given)."""
        ep = source.endpoint
        try:
            host, port = parse_endpoint(ep)
        except ValueError as e:
            raise _Fail(str(e)) from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Fail(f"timed out before connecting to context rank {ep}")
        try:
            sock = socket.create_connection((host, port), timeout=left)
        except socket.timeout:
            raise _Fail(f"timed out connecting to context rank {ep}") from None
        except OSError as e:
            raise _Fail(f"cannot reach context rank {ep} ({type(e).__name__}: {e})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, self.key, b"K", self.decoder)
        conn.deadline = deadline
        try:
            hello = conn.recv()
        except _AuthError:
            sock.close()
            raise _Fail(f"context rank {ep} failed authentication: its key differs from this server's "
                        f"(set the same MESHSERVE_SECRET, or the same key file, on both servers)") from None
        except BaseException:
            sock.close()
            raise
        if isinstance(hello, Error):
            sock.close()
            raise _Fail(f"context rank {ep} refused: {_one_line(hello.message)}")
        if not isinstance(hello, Hello):
            sock.close()
            raise _Fail(f"context rank {ep} answered {type(hello).__name__} instead of Hello")
        conn.nonce = hello.nonce
        conn.peer_host, conn.peer_ipc, conn.peer_addr = hello.host, hello.ipc, _peer_address(sock)
        conn.mac_v = min(MAC_SCHEME, hello.mac_v)  # the payload MAC scheme both ends speak
        if expect is not None and hello.layout != expect:
            sock.close()
            raise _Fail(f"context rank {ep} now holds a different layout than the disaggregated params name "
                        f"(restarted?): {_compatible(expect, hello.layout) or 'layers/heads/blocks differ'}")
        return conn

    def _exchange(self, conn: _Conn, msg, ep: str):
        conn.send(msg)
        return self._reply(conn, ep)

    @staticmethod
    def _reply(conn: _Conn, ep: str):
        """The next message from the context rank; _Fail when it is an Error or fails authentication."""
        try:
            reply = conn.recv()
        except _AuthError:
            raise _Fail(f"a reply from context rank {ep} failed authentication (MESHSERVE_SECRET or the key file "
                        f"differs?)") from None
        if isinstance(reply, Error):
            raise _Fail(f"context rank {ep} refused: {_one_line(reply.message)}")
        return reply

    def _pull_from(self, source: RankLayout, items: list[tuple[int, tuple[int, int]]], src: KvRequest,
                   dst_block_ids: list[list[int]], deadline: float, abort: threading.Event) -> int:
        """Read `items` from one context rank; the bytes moved. Raises _Fail."""
        ep = source.endpoint
        try:
            conn = self._connect(source, deadline, source)
        except (socket.timeout, TimeoutError):
            raise _Fail(f"timed out waiting for context rank {ep} to answer") from None
        except (OSError, ConnectionError) as e:
            raise _Fail(f"connection to context rank {ep} failed ({type(e).__name__}: {e})") from None
        progress = {"layer": -1, "bytes": 0}
        stream = _cuda_stream(self.kv_caches)
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if self._pull_ipc(conn, source, items, src, dst_block_ids, abort, progress, stream):
                    self._count_path("cuda_ipc")
                else:
                    self._count_path(self._pull_items(conn, source, items, src, dst_block_ids, abort, progress))
        except (socket.timeout, TimeoutError):
            raise _Fail(f"timed out reading layer {progress['layer']} from context rank {ep} after "
                        f"{progress['bytes']} bytes") from None
        except (OSError, ConnectionError) as e:
            raise _Fail(f"connection to context rank {ep} failed reading layer {progress['layer']} "
                        f"({type(e).__name__}: {e})") from None
        except ValueError as e:
            raise _Fail(f"layer {progress['layer']} from context rank {ep}: {e}") from None
        finally:
            try:
                if stream is not None:
                    stream.synchronize()  # the last scatter / copy has landed: the blocks are the engine's again
            finally:
                conn.sock.close()  # after: the source's blocks are no longer read (cuda_ipc)
        return progress["bytes"]

    def _layer_plan(self, source: RankLayout, src: KvRequest, dst_block_ids: list[list[int]], layer: int,
                    heads: tuple[int, int]):
        """What a pull of `layer` (KV heads [h0, h1) of the model) reads and writes: the source's
        block ids (of its group), this rank's cache, its block ids, and the heads within that cache
        (None for a latent cache)."""
        lay = self.layout
        src_group = source.group_of(layer)
        if src_group >= len(src.block_ids):
            raise _Fail(f"the request has no block ids for KV cache group {src_group} of layer {layer}")
        cache = self.kv_caches[lay.layers.index(layer)]
        local = None if lay.kind == "latent" else (heads[0] - lay.kv_heads[0], heads[1] - lay.kv_heads[0])
        return list(src.block_ids[src_group]), cache, dst_block_ids[lay.group_of(layer)], local

    def _pull_items(self, conn: _Conn, source: RankLayout, items: list[tuple[int, tuple[int, int]]],
                    src: KvRequest, dst_block_ids: list[list[int]], abort: threading.Event, progress: dict) -> str:
        """Read `items` chunk by chunk with READ_AHEAD Reads in flight: the context rank gathers and
        sends chunk k + 1 while this side receives and scatters chunk k (the replies come in order).
        Two staging buffers: on a GPU the host-to-device copy of one chunk (on the pull's side stream)
        overlaps receiving the next."""
        ep = source.endpoint
        lay = self.layout
        n = src.num_tokens
        chunk = self.max_tokens_in_buffer or n
        verify = self._verify(conn)
        plans = {}
        reads = []
        for layer, heads in items:
            plans[layer, heads] = self._layer_plan(source, src, dst_block_ids, layer, heads)
            reads += [(layer, heads, t0, min(n, t0 + chunk)) for t0 in range(0, n, chunk)]
        staging = [_Staging(self._pinned), _Staging(self._pinned)]
        landed: list = [None, None]  # per staging buffer: the event of the copy still reading it (GPU)
        sent = 0
        for i, (layer, heads, t0, t1) in enumerate(reads):
            if abort.is_set():  # another context rank failed: the pull has failed
                return "tcp"
            while sent < len(reads) and sent <= i + self.READ_AHEAD:
                s_layer, s_heads, s0, s1 = reads[sent]
                conn.send(Read(src.ctx_request_id, plans[s_layer, s_heads][0], n, s_layer, s_heads, (s0, s1),
                               lay.model_id, lay.dtype, verify, conn.mac_v))
                sent += 1
            progress["layer"] = layer
            src_ids, cache, dst_ids, local = plans[layer, heads]
            reply = self._reply(conn, ep)
            shape = kv_io.buffer_shape(cache, t1 - t0, local)
            if not isinstance(reply, Data) or tuple(reply.shape) != shape:
                raise _Fail(f"context rank {ep} answered {reply!r} for layer {layer} tokens [{t0}, {t1}); "
                            f"expected Data of shape {list(shape)}")
            slot = i % 2
            if landed[slot] is not None:
                landed[slot].synchronize()  # its previous chunk has reached the GPU
            buf = staging[slot].get(shape, cache.dtype)
            view = _as_bytes(buf)
            if reply.nbytes != len(view):
                raise _Fail(f"context rank {ep} sends {reply.nbytes} bytes for {len(view)} expected")
            hasher = conn.payload_hasher(conn.received - 1, conn.mac_v) if verify else None
            conn.recv_into(view, hasher)
            if hasher is not None:
                trailer = bytearray(_MAC_LEN)
                conn.recv_into(memoryview(trailer))
                check_payload(hasher.digest(), bytes(trailer), layer, t0, t1, ep)
            on_gpu = cache.device.type == "cuda"
            kv_io.scatter(cache, buf, dst_ids, lay.block_size, t0, local, non_blocking=on_gpu, cp=lay.cp)
            if on_gpu:
                landed[slot] = torch.cuda.Event()
                landed[slot].record()  # on the pull's side stream, after the copy
            progress["bytes"] += len(view)
        return "tcp"

    def release(self, source_rank0: RankLayout, ctx_request_id: str, timeout_s: float = 5.0) -> Optional[str]:
        ep = source_rank0.endpoint
        try:
            conn = self._connect(source_rank0, time.monotonic() + timeout_s, None)
            try:
                reply = self._exchange(conn, Release(ctx_request_id), ep)
            finally:
                conn.sock.close()
            if not isinstance(reply, Ok):
                return f"context rank {ep} answered {type(reply).__name__} to a release"
            return None
        except _Fail as e:
            return _one_line(f"release of {ctx_request_id}: {e}")
        except (socket.timeout, TimeoutError):
            return f"release of {ctx_request_id}: timed out talking to context rank {ep}"
        except (OSError, ConnectionError) as e:
            return _one_line(f"release of {ctx_request_id}: connection to context rank {ep} failed "
                             f"({type(e).__name__}: {e})")

    def close(self) -> None:
        with self._ipc_lock:  # no connection outlives a pull or a release; the opened IPC caches go
            self._ipc_views.clear()

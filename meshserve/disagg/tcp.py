"""The DEFAULT KV transfer backend: plain TCP, msgspec msgpack headers, raw tensor bytes. No pickle.

A `TcpKvSource` listens on (host, ephemeral port) with one accept thread and a thread per
connection. A connection goes:

    source -> sink  Hello(nonce, layout)                  the source's RankLayout, a fresh nonce
    sink -> source  Read(request, layer, heads, tokens)   -> Data(nbytes, shape) + nbytes raw bytes
                                                             (+ their 32-byte MAC when Read.mac)
                    Release(ctx_request_id)               -> Ok
                    (any request)                         -> Error(message) when refused

Framing, the per-frame HMAC and the payload MAC: wire.py (the messages too).

A `TcpKvSink` (tcp_sink.py) pulls: for each layer it holds, it picks the context ranks covering its KV heads
(several when the context TP is larger, one replica when heads are replicated; any rank holding the
layer for latent caches), then asks each of them, one thread and one connection per context rank,
for its share in chunks of at most `max_tokens_in_buffer` tokens, scattering each answer into its
own blocks (kv_io.py re-blocks). Errors and timeouts come back as FAILED with one line.

Same-host GPU path (`cuda_ipc`, cache_transceiver_config.cuda_ipc: auto | true | false): cuda_ipc.py
(IpcOpen -> IpcHandles, IpcPull -> IpcGrant, IpcDone over this connection, the bytes copied GPU to GPU;
TCP where it cannot be used). `PullResult.path` says which path moved the bytes.

Payload MAC default (`verify_payload: auto`): on unless the connection's peer address is loopback
and the source's host identity is this host's (then anyone able to alter the traffic can read the
key file); true / false force it.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import select
import socket
import threading
from typing import Callable, Optional

import msgspec
import torch

from meshserve.disagg import kv_io
from meshserve.disagg.cuda_ipc import IpcSourceMixin, _ipc_local_why
from meshserve.disagg.transceiver import KvRequest, KvSource, RankLayout
from meshserve.disagg.wire import (IDLE_TIMEOUT_S, Data, Error, Hello, IpcDone, IpcOpen, IpcPull, Ok, Read, Release,
                                   _as_bytes, _AuthError, _check_caches, _Conn, _cuda_stream, _decoder,
                                   _format_endpoint, _one_line, _Staging, host_identity, MAC_SCHEME, normalized,
                                   tristate)
# re-exported: the names this module had before wire.py, cuda_ipc.py and tcp_sink.py were split off from it
from meshserve.disagg.cuda_ipc import _IpcUnusable, cuda_ipc_unsupported, ipc_export, ipc_open  # noqa: F401
from meshserve.disagg.wire import (_LEN, _MAC_LEN, _NO_MAC, _PAYLOAD_LABEL, _SEQ, _SLICE, MAX_HEADER,  # noqa: F401
                                   IpcCache, IpcGrant, IpcHandles, Message, _encoder, _Fail, _numel, _peer_address,
                                   check_payload, is_loopback, parse_endpoint)

logger = logging.getLogger(__name__)


class TcpKvSource(IpcSourceMixin, KvSource):
    # what a connection decodes; a backend that adds messages (over this control path) replaces it
    # and answers them in _handle
    decoder = _decoder

    def __init__(self, kv_caches: list, layout: RankLayout, host: str = "127.0.0.1", key: Optional[bytes] = None,
                 on_release: Optional[Callable[[str], None]] = None, require_registered: bool = False,
                 cuda_ipc="auto"):
        layout = normalized(layout)
        _check_caches(kv_caches, layout, "KV source")
        self.kv_caches = list(kv_caches)
        self.key = key
        # cache_transceiver_config.cuda_ipc: offer same-host sinks the GPU-to-GPU path (not false)
        self.cuda_ipc = tristate(cuda_ipc, "cuda_ipc")
        self.host_id = host_identity()
        why = ("the backend has its own data path" if type(self).decoder is not _decoder
               else _ipc_local_why(self.kv_caches))
        if self.cuda_ipc is True and why:
            raise ValueError(f"cache_transceiver_config.cuda_ipc=true cannot be used here: {why}; set cuda_ipc: "
                             f"auto (TCP where it cannot be used) or false")
        self._ipc_instance = secrets.token_bytes(16) if self.cuda_ipc is not False and not why else b""
        self._ipc_lock = threading.Lock()
        self.on_release = on_release
        self.require_registered = require_registered
        self._pinned = any(c.device.type == "cuda" for c in self.kv_caches)
        self._cond = threading.Condition()
        self._registered: dict[str, KvRequest] = {}
        self._inflight: dict[str, int] = {}
        self._closed = False
        self._conns: set[socket.socket] = set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family, backlog=64)
        port = self._listener.getsockname()[1]
        advertised = host
        if host in ("0.0.0.0", "::", ""):  # reachable name for a wildcard bind
            advertised = socket.gethostname()
        self._endpoint = _format_endpoint(advertised, port)
        self.layout = msgspec.structs.replace(layout, endpoint=self._endpoint)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, name=f"kv-source-{port}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    # -- registry ------------------------------------------------------------------------------

    def register(self, req: KvRequest) -> None:
        with self._cond:
            self._registered[req.ctx_request_id] = req

    def unregister(self, ctx_request_id: str) -> bool:
        with self._cond:
            found = self._registered.pop(ctx_request_id, None) is not None
            self._cond.wait_for(lambda: self._inflight.get(ctx_request_id, 0) == 0)
            return found

    # -- serving -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._closed or self._wake_r in ready:
                    break
                sock, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    break
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(IDLE_TIMEOUT_S)
            with self._cond:
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="kv-source-conn", daemon=True).start()

    def _handle(self, conn: _Conn, msg) -> bool:
        """Answer a message this class does not know (another backend's); False ends the connection."""
        conn.send(Error(f"unexpected message {type(msg).__name__}"))
        return False

    def _closed_conn(self, conn: _Conn) -> None:
        """A connection ended (another backend frees what it held for it)."""

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock, self.key, b"S", self.decoder)
        staging = _Staging(self._pinned)
        stream = _cuda_stream(self.kv_caches)
        try:
            nonce = secrets.token_bytes(16)
            conn.send(Hello(nonce, self.layout, self.host_id, self._ipc_instance, MAC_SCHEME))
            conn.nonce = nonce
            conn.ipc_reading = []  # ctx request ids granted to this connection's sink, not yet done
            while not self._closed:
                try:
                    msg = conn.recv()
                except _AuthError:
                    conn.send(Error("authentication failed: the request's HMAC does not match this context "
                                    "server's key (MESHSERVE_SECRET or the key file differs between the servers?)"))
                    return
                if isinstance(msg, Read):
                    # the D2H copy into pinned memory is synchronous: the bytes are read when it returns
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        self._read(conn, msg, staging)
                elif isinstance(msg, Release):
                    self.unregister(msg.ctx_request_id)
                    callback = self.on_release
                    if callback is not None:
                        try:
                            callback(msg.ctx_request_id)
                        except Exception:  # the engine's bug: log it, keep serving
                            logger.exception("KV source: on_release(%s) failed", msg.ctx_request_id)
                    conn.send(Ok())
                elif isinstance(msg, IpcOpen):
                    self._ipc_open(conn, msg)
                elif isinstance(msg, IpcPull):
                    self._ipc_pull(conn, msg)
                elif isinstance(msg, IpcDone):
                    if msg.ctx_request_id in conn.ipc_reading:
                        conn.ipc_reading.remove(msg.ctx_request_id)
                        self._done_reading(msg.ctx_request_id)
                    conn.send(Ok())
                elif not self._handle(conn, msg):
                    return
        except (OSError, ConnectionError):
            pass  # the peer went away, or idled out
        finally:
            for rid in getattr(conn, "ipc_reading", ()):  # a sink that went away is done reading
                self._done_reading(rid)
            self._closed_conn(conn)
            with self._cond:
                self._conns.discard(sock)
            sock.close()

    def _read(self, conn: _Conn, msg: Read, staging: _Staging) -> None:
        buf = self._gather_read(conn, msg, staging)
        if buf is None:
            return
        data = _as_bytes(buf)
        hasher = conn.payload_hasher(conn.sent, msg.mac_v) if msg.mac else None
        conn.send(Data(len(data), list(buf.shape)))
        conn.send_bytes(data, hasher)
        if hasher is not None:
            conn.send_bytes(memoryview(hasher.digest()))  # the trailer: the payload's MAC

    def _gather_read(self, conn: _Conn, msg: Read, staging: _Staging) -> Optional[torch.Tensor]:
        """The chunk a Read asks for, gathered into a contiguous CPU buffer; None when refused (the
        Error was sent)."""
        lay = self.layout
        if msg.model_id != lay.model_id or msg.dtype != lay.dtype:
            conn.send(Error(f"the context rank serves model_id={lay.model_id!r} dtype={lay.dtype}; the request "
                            f"names model_id={msg.model_id!r} dtype={msg.dtype}"))
            return None
        if msg.layer not in lay.layers:
            conn.send(Error(f"layer {msg.layer} is not on this context rank (it holds {list(lay.layers)})"))
            return None
        idx = lay.layers.index(msg.layer)
        cache = self.kv_caches[idx]
        heads = None
        if lay.cp[1] > 1:
            conn.send(Error(f"this server runs context parallelism (cp size {lay.cp[1]}): a rank holds part of each "
                            f"block, so it cannot serve a request's KV; run context servers without cp"))
            return None
        if lay.kind == "full":
            h0, h1 = msg.kv_heads[0] - lay.kv_heads[0], msg.kv_heads[1] - lay.kv_heads[0]
            if not 0 <= h0 < h1 <= lay.kv_heads[1] - lay.kv_heads[0]:
                conn.send(Error(f"KV heads {list(msg.kv_heads)} are not on this context rank (it holds "
                                f"{list(lay.kv_heads)})"))
                return None
            heads = (h0, h1)
        t0, t1 = msg.tokens
        if not 0 <= t0 < t1 <= msg.num_tokens:
            conn.send(Error(f"token range [{t0}, {t1}) outside the request's {msg.num_tokens} tokens"))
            return None
        rid = msg.ctx_request_id
        if self._authorize(conn, rid, {lay.group_of(msg.layer): msg.block_ids}, msg.num_tokens) is None:
            return None
        try:
            try:
                shape = kv_io.buffer_shape(cache, t1 - t0, heads)
                out = staging.get(shape, cache.dtype) if cache.device.type != "cpu" else None
                buf = kv_io.gather(cache, msg.block_ids, lay.block_size, t0, t1, heads, out=out)
            except ValueError as e:
                conn.send(Error(_one_line(str(e))))
                return None
        finally:
            self._done_reading(rid)
        return buf

    def _authorize(self, conn: _Conn, rid: str, block_ids: dict, num_tokens: int) -> Optional[KvRequest]:
        """May the request's blocks (KV group -> the block ids the sink names) be read? With
        `require_registered` only a registered request's, with the block ids and length this server
        holds. Yes: the request as held (the sink's own naming when not registered and allowed) and
        it counts as being read until `_done_reading` (unregister waits). No: None, the Error sent."""
        with self._cond:
            req = self._registered.get(rid)
            if req is None and self.require_registered:
                conn.send(Error(f"ctx request {rid} is not held by this context server (released, or "
                                f"kv_transfer_timeout_ms passed)"))
                return None
            if req is not None:
                for group, ids in block_ids.items():
                    if (group >= len(req.block_ids) or list(ids) != list(req.block_ids[group])
                            or num_tokens != req.num_tokens):
                        conn.send(Error(f"ctx request {rid}: the block ids or length do not match what the "
                                        f"context server holds"))
                        return None
            else:
                req = KvRequest(rid, [[] for _ in range(max(block_ids, default=-1) + 1)], num_tokens)
                for group, ids in block_ids.items():
                    req.block_ids[group] = list(ids)
            self._inflight[rid] = self._inflight.get(rid, 0) + 1
        return req

    def _done_reading(self, rid: str) -> None:
        with self._cond:
            self._inflight[rid] -= 1
            if not self._inflight[rid]:
                del self._inflight[rid]
            self._cond.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._cond:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# the sink, split off to tcp_sink.py; imported here so `tcp.TcpKvSink` stays (transceiver._BACKENDS)
from meshserve.disagg.tcp_sink import TcpKvSink, _compatible  # noqa: E402,F401

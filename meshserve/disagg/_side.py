"""KV transfer with tcp.py's control path and the tensor bytes over another channel (MPI, UCX tags).

The source is the active side on the data channel (MPI and UCX tags are two-sided):

    source -> sink  Hello(nonce, layout)                   as DEFAULT
    sink -> source  SideHello(info)                      -> SideHello(info)   the channel's addresses
                    SideRead(read, tag)                  -> Data(nbytes, shape, mac), then the bytes over
                                                            the channel with `tag` (or Error(message))
                    Release(ctx_request_id)              -> Ok (as DEFAULT)

A `SideRead` is checked and gathered exactly as a DEFAULT `Read` (the same code: tcp.py's
`_gather_read`); the sink posts its receive (into a reusable staging buffer) before it sends the
request, waits for it until the pull's deadline, and kv_io scatters the chunk into its blocks
(re-blocking and head re-slicing as DEFAULT) once the payload MAC the authenticated Data header
announced matches (when `read.mac` asked for one: the sink's verify_payload; tcp.py has the MAC). A
sink that gives up cancels its receive and closes the connection; a source whose send is still
pending sees the connection close and cancels the send.

A backend subclasses `SideKvSource` / `SideKvSink` and implements the channel: `_local_info()` (what
its SideHello carries), `_peer(conn_info)` (checks the other side's SideHello), `_send(peer, tag,
view, alive)` on the source, `_post_recv(peer, tag, view)` -> a handle with `test()` / `cancel()` on
the sink.
"""
from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from typing import Union

import msgspec
import torch

from meshserve.disagg import kv_io, tcp
from meshserve.disagg.tcp import Data, Error, Ok, TcpKvSink, TcpKvSource, _Fail, _one_line
from meshserve.disagg.transceiver import KvRequest, RankLayout


class SideHello(msgspec.Struct, tag=True):
    info: bytes  # the channel's address of the sender (msgpack of the backend's choosing)


class SideRead(msgspec.Struct, tag=True):
    read: tcp.Read
    tag: int


_Message = Union[tcp.Hello, tcp.Read, tcp.Release, Data, Ok, Error, SideHello, SideRead]
_decoder = msgspec.msgpack.Decoder(_Message)
_tags = itertools.count(1)
_tags_lock = threading.Lock()


def next_tag(limit: int) -> int:
    """A tag unique in this process for a long while (wraps at `limit`)."""
    with _tags_lock:
        return 1 + next(_tags) % (limit - 1)


def _closed(sock: socket.socket) -> bool:
    """The peer closed the connection (or sent something it should not have while we send)."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _device_of(caches):
    """The caches' GPU, or None (host caches)."""
    for c in caches:
        if c.device.type == "cuda":
            return c.device
    return None


def _payload(buf, device):
    """What the channel moves: the staging buffer's bytes (host: a memoryview; GPU: a flat uint8
    tensor, which exposes __cuda_array_interface__ whatever the KV dtype)."""
    if device is None:
        return tcp._as_bytes(buf)
    return buf.reshape(-1).view(torch.uint8)


class SideKvSource(TcpKvSource):
    decoder = _decoder
    SEND_TIMEOUT_S = tcp.IDLE_TIMEOUT_S  # a send nobody receives is cancelled after this
    DEVICE_BUFFERS = False  # the channel sends from and receives into GPU memory (UCX: True)

    def _local_info(self) -> bytes:
        raise NotImplementedError

    def _peer(self, info: bytes):
        """The sink's channel address from its SideHello info; a ValueError if unusable."""
        raise NotImplementedError

    def _send(self, peer, tag: int, view: memoryview, alive) -> None:
        """Send `view` to `peer` with `tag`; give up (cancel) when alive() turns False."""
        raise NotImplementedError

    def _handle(self, conn, msg) -> bool:
        if isinstance(msg, SideHello):
            try:
                conn.side_peer = self._peer(msg.info)
            except ValueError as e:
                conn.send(Error(_one_line(str(e))))
                return False
            conn.send(SideHello(self._local_info()))
            return True
        if isinstance(msg, SideRead):
            peer = getattr(conn, "side_peer", None)
            if peer is None:
                conn.send(Error("SideRead before SideHello"))
                return False
            # GPU caches and a channel that moves device memory: the chunk is gathered on the GPU and
            # sent from there (no host copy), unless a payload MAC needs its bytes on the host.
            device = _device_of(self.kv_caches) if self.DEVICE_BUFFERS and not msg.read.mac else None
            attr = "side_device_staging" if device is not None else "side_staging"
            staging = getattr(conn, attr, None)
            if staging is None:
                staging = tcp._Staging(self._pinned, device)
                setattr(conn, attr, staging)
            stream = tcp._cuda_stream(self.kv_caches)
            if stream is not None:
                with torch.cuda.stream(stream):
                    buf = self._gather_read(conn, msg.read, staging)
                if device is not None and buf is not None:
                    stream.synchronize()  # the gather has landed before the channel reads the buffer
            else:
                buf = self._gather_read(conn, msg.read, staging)
            if buf is None:
                return True
            view = _payload(buf, device)
            nbytes = buf.numel() * buf.element_size()
            mac = conn.payload_mac(conn.sent, view, msg.read.mac_v) if msg.read.mac else b""
            conn.send(Data(nbytes, list(buf.shape), mac))
            deadline = time.monotonic() + self.SEND_TIMEOUT_S
            self._send(peer, msg.tag, view, lambda: not self._closed and not _closed(conn.sock)
                       and time.monotonic() < deadline)
            return True
        return super()._handle(conn, msg)


class SideKvSink(TcpKvSink):
    decoder = _decoder
    POLL_S = 0.0001
    DEVICE_BUFFERS = False  # as SideKvSource.DEVICE_BUFFERS
    CHANNEL = "side"  # PullResult.path of this channel ("<channel>" staged through host memory, "<channel>_gpu")

    def _local_info(self) -> bytes:
        raise NotImplementedError

    def _peer(self, info: bytes, ep: str):
        """The source's channel address from its SideHello; raises _Fail when unusable."""
        raise NotImplementedError

    def _post_recv(self, peer, tag: int, view: memoryview):
        """Start receiving `view` from `peer` with `tag`: a handle with test() -> bool and cancel()."""
        raise NotImplementedError

    def _tag(self) -> int:
        return next_tag(1 << 22)

    def _wait(self, handle, deadline: float, abort: threading.Event, what: str) -> bool:
        delay = self.POLL_S
        while not handle.test():
            if abort.is_set():
                handle.cancel()
                return False
            if time.monotonic() > deadline:
                handle.cancel()
                raise _Fail(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        return True

    def _pull_items(self, conn, source: RankLayout, items, src: KvRequest, dst_block_ids, abort, progress) -> None:
        ep = source.endpoint
        reply = self._exchange(conn, SideHello(self._local_info()), ep)
        if not isinstance(reply, SideHello):
            raise _Fail(f"context rank {ep} answered {type(reply).__name__} instead of SideHello")
        peer = self._peer(reply.info, ep)
        lay = self.layout
        n = src.num_tokens
        chunk = self.max_tokens_in_buffer or n
        verify = self._verify(conn)
        # GPU caches and a channel that moves device memory: receive straight into GPU memory, unless
        # a payload MAC is to be checked (its bytes must be on the host)
        device = _device_of(self.kv_caches) if self.DEVICE_BUFFERS and not verify else None
        # two buffers: on a GPU a chunk's scatter (queued on the pull's stream) may still read one
        # while the next chunk arrives in the other; `landed` holds the event of that scatter
        staging = [tcp._Staging(self._pinned, device), tcp._Staging(self._pinned, device)]
        landed: list = [None, None]
        path = self.CHANNEL + ("_gpu" if device is not None else "")
        i = 0
        for layer, heads in items:
            progress["layer"] = layer
            src_ids, cache, dst_ids, local = self._layer_plan(source, src, dst_block_ids, layer, heads)
            for t0 in range(0, n, chunk):
                if abort.is_set():
                    return path
                t1 = min(n, t0 + chunk)
                shape = kv_io.buffer_shape(cache, t1 - t0, local)
                slot, i = i % 2, i + 1
                if landed[slot] is not None:
                    landed[slot].synchronize()
                buf = staging[slot].get(shape, cache.dtype)
                view = _payload(buf, device)
                nbytes = buf.numel() * buf.element_size()
                tag = self._tag()
                handle = self._post_recv(peer, tag, view)
                try:
                    reply = self._exchange(conn, SideRead(tcp.Read(src.ctx_request_id, src_ids, n, layer, heads,
                                                                   (t0, t1), lay.model_id, lay.dtype, verify,
                                                                   conn.mac_v), tag), ep)
                    seq = conn.received - 1  # the Data frame's: its payload MAC is bound to it
                    if not isinstance(reply, Data) or tuple(reply.shape) != shape or reply.nbytes != nbytes:
                        raise _Fail(f"context rank {ep} answered {reply!r} for layer {layer} tokens [{t0}, {t1}); "
                                    f"expected Data of shape {list(shape)}")
                except BaseException:
                    handle.cancel()
                    raise
                if not self._wait(handle, conn.deadline, abort,
                                  f"layer {layer} tokens [{t0}, {t1}) from context rank {ep}"):
                    return path
                if verify:
                    tcp.check_payload(conn.payload_mac(seq, view, conn.mac_v), reply.mac, layer, t0, t1, ep)
                on_gpu = cache.device.type == "cuda"
                kv_io.scatter(cache, buf, dst_ids, lay.block_size, t0, local, non_blocking=on_gpu, cp=lay.cp)
                if on_gpu:
                    landed[slot] = torch.cuda.Event()
                    landed[slot].record()
                progress["bytes"] += nbytes
        return path

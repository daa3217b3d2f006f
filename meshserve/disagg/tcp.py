"""The DEFAULT KV transfer backend: plain TCP, msgspec msgpack headers, raw tensor bytes. No pickle.

A `TcpKvSource` listens on (host, ephemeral port) with one accept thread and a thread per
connection. A connection goes:

    source -> sink  Hello(nonce, layout)                  the source's RankLayout, a fresh nonce
    sink -> source  Read(request, layer, heads, tokens)   -> Data(nbytes, shape) + nbytes raw bytes
                                                             (+ their 32-byte MAC when Read.mac)
                    Release(ctx_request_id)               -> Ok
                    (any request)                         -> Error(message) when refused

Every frame is `len (u32, big endian) | mac (32 bytes) | msgpack body`. With a key, mac is
HMAC-SHA256(key, nonce | direction | sequence number | body), so a frame only counts on the
connection and at the place it was made for (no replays); the Hello's nonce part is empty. Without a
key the mac is zeros and nothing is checked.

Tensor bytes follow their Data header raw. When the Read asks (`mac`: the sink's `verify_payload`
with a key, on by default) they are followed by their MAC, HMAC-SHA256(payload key, nonce | the Data
frame's sequence number | the bytes), the payload key being HMAC-SHA256(key, "meshserve kv payload
v1"), so a chunk's MAC is valid on one connection, at one place (not replayed, reordered or moved),
and as nothing else. Both sides hash memoryviews of the bytes (no copy) as they go: the source each
1 MiB slice once it is in the socket's buffer, the sink each piece as it arrives, so the hashing of
one side overlaps the other's work; the sink scatters a chunk into its blocks only once its MAC
matches, else the pull fails (nothing of that chunk written). The backends on _side.py (UCX, MPI)
carry the same MAC in the Data header (`Data.mac`) instead.

A `TcpKvSink` pulls: for each layer it holds, it picks the context ranks covering its KV heads
(several when the context TP is larger, one replica when heads are replicated; any rank holding the
layer for latent caches), then asks each of them, one thread and one connection per context rank,
for its share in chunks of at most `max_tokens_in_buffer` tokens, scattering each answer into its
own blocks (kv_io.py re-blocks). Errors and timeouts come back as FAILED with one line.

Same-host GPU path (`cuda_ipc`, cache_transceiver_config.cuda_ipc: auto | true | false). The Hello
also carries the source's host identity (`host_identity()`: hostname + the kernel's boot id) and,
when its caches are CUDA tensors, an IPC instance id. A sink whose caches are CUDA tensors on the
same host then moves the bytes GPU to GPU over the same authenticated connection:

    sink -> source  IpcOpen(host)                          -> IpcHandles(caches)   (once per source
                                                              instance and sink process; the sink
                                                              opens and keeps the storages)
                    IpcPull(request, block ids, layers...) -> IpcGrant(block ids, num_tokens)
                    (the sink gathers the source blocks' rows into its own with device copies on a
                     side stream that first waits for its default stream, then synchronizes)
                    IpcDone(ctx_request_id)                -> Ok

An `IpcCache` is what `UntypedStorage._share_cuda_()` returns (bytes and ints, as msgpack fields,
never pickle) plus the tensor's shape, stride, offset and dtype; the sink opens it on its own
device with `UntypedStorage._new_shared_cuda` (another GPU of the host is mapped peer to peer). An
IpcPull is authorized as a Read is (`_authorize`): with `require_registered` only a registered
request, with the block ids and length the context server holds; the grant's block ids are the
source's own and the only ones the sink copies from; the request counts as being read until the
IpcDone (or the connection closes), so `unregister` waits for the copies. The source's KV writes are
complete before any pull (the context request has finished and returned its token). Anything about
IPC that fails before a grant (another host, CPU caches, an old torch, the source refusing to export,
a handle that does not open) falls back to TCP for that source (logged once; with `cuda_ipc: true`
the pull fails instead); `PullResult.path` says which path moved the bytes. No payload MAC here:
the bytes never leave the host's GPU memory (verify_payload concerns bytes on a socket).

Payload MAC default (`verify_payload: auto`): on unless the connection's peer address is loopback
and the source's host identity is this host's (then anyone able to alter the traffic can read the
key file); true / false force it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import select
import socket
import struct
import threading
import time
from typing import Callable, Optional, Sequence, Union

import msgspec
import torch

from meshserve.disagg import kv_io
from meshserve.disagg.transceiver import KvRequest, KvSink, KvSource, PullResult, RankLayout, TransferState

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
_MAC_LEN = 32
_NO_MAC = bytes(_MAC_LEN)
_PAYLOAD_LABEL = b"meshserve kv payload v1"
_SLICE = 1 << 20  # bytes a source sends between payload hash updates
MAX_HEADER = 64 << 20  # a header (msgpack) larger than this is refused
IDLE_TIMEOUT_S = 300.0  # a source drops a connection silent this long


class Hello(msgspec.Struct, tag=True):
    nonce: bytes
    layout: RankLayout
    host: str = ""  # the source's host_identity() ("" from an older source: never the same host)
    ipc: bytes = b""  # the source's CUDA IPC instance id when it offers the cuda_ipc path, else empty


class Read(msgspec.Struct, tag=True):
    ctx_request_id: str
    block_ids: list[int]  # the request's blocks in the KV cache group of `layer` (source block size)
    num_tokens: int  # the request's length
    layer: int  # model layer index
    kv_heads: tuple[int, int]  # [start, end) model KV heads (ignored for latent caches)
    tokens: tuple[int, int]  # [start, end) tokens of this chunk
    model_id: str
    dtype: str
    mac: bool = False  # the sink verifies the payload: its MAC follows the bytes (Data.mac on _side.py)


class Release(msgspec.Struct, tag=True):
    ctx_request_id: str


class Data(msgspec.Struct, tag=True):
    nbytes: int
    shape: list[int]
    mac: bytes = b""  # _side.py's backends: the payload's MAC when the Read asked (DEFAULT sends it after)


class Ok(msgspec.Struct, tag=True):
    pass


class IpcOpen(msgspec.Struct, tag=True):
    host: str  # the sink's host_identity(): the source exports only to its own host


class IpcCache(msgspec.Struct):
    """One layer's cache tensor: UntypedStorage._share_cuda_()'s fields, then the tensor's view."""
    device: int
    handle: Optional[bytes]
    storage_size: int
    storage_offset: int  # bytes, into the allocation
    ref_counter: bytes
    ref_counter_offset: int
    event: Optional[bytes]
    event_sync: bool
    shape: list[int]
    stride: list[int]
    offset: int  # elements, into the storage
    dtype: str


class IpcHandles(msgspec.Struct, tag=True):
    caches: list[IpcCache]  # one per layout.layers


class IpcPull(msgspec.Struct, tag=True):
    ctx_request_id: str
    block_ids: list[list[int]]  # the request's blocks per KV cache group, as the params name them
    num_tokens: int
    layers: list[int]  # the model layers the sink will copy from this rank
    model_id: str
    dtype: str


class IpcGrant(msgspec.Struct, tag=True):
    block_ids: list[list[int]]  # the source's own (the only blocks the sink copies from)
    num_tokens: int


class IpcDone(msgspec.Struct, tag=True):
    ctx_request_id: str


class Error(msgspec.Struct, tag=True):
    message: str


Message = Union[Hello, Read, Release, Data, Ok, Error, IpcOpen, IpcHandles, IpcPull, IpcGrant, IpcDone]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class _AuthError(Exception):
    pass


class _Fail(Exception):
    """A transfer error, reported as FAILED with this one-line message."""


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


@functools.lru_cache(maxsize=1)
def host_identity() -> str:
    """This host: its hostname and the kernel's boot id (processes in containers of one host share
    the boot id; a restarted host gets another)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or ::ffff:127.x.x.x."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _peer_address(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return ""


def tristate(value, field: str):
    """cache_transceiver_config's auto | true | false settings: "auto", True or False; a ValueError
    of one line naming the field otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.strip().lower()]
    raise ValueError(f"cache_transceiver_config.{field}={value!r} is not one of auto, true, false")


def cuda_ipc_unsupported() -> Optional[str]:
    """Why this torch cannot share CUDA storages between processes, or None."""
    if any(getattr(torch.UntypedStorage, name, None) is None for name in ("_share_cuda_", "_new_shared_cuda")):
        return f"torch {torch.__version__} has no UntypedStorage._share_cuda_/_new_shared_cuda"
    return None


def ipc_export(cache: torch.Tensor, shared: dict) -> IpcCache:
    """`cache`'s IpcCache; `shared` (storage pointer -> its _share_cuda_ fields) shares each storage
    once per export (every share counts one reference the opener releases)."""
    storage = cache.untyped_storage()
    key = storage.data_ptr()
    fields = shared.get(key)
    if fields is None:
        guard = torch.cuda.device(cache.device) if cache.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            fields = shared[key] = tuple(storage._share_cuda_())
    device, handle, size, offset, ref, ref_offset, event, event_sync = fields
    return IpcCache(int(device), None if handle is None else bytes(handle), int(size), int(offset), bytes(ref),
                    int(ref_offset), None if event is None else bytes(event), bool(event_sync),
                    list(cache.shape), list(cache.stride()), int(cache.storage_offset()),
                    kv_io.dtype_name(cache.dtype))


def ipc_open(caches: Sequence[IpcCache], device: torch.device) -> list[torch.Tensor]:
    """The source's cache tensors, opened on `device` (this process's GPU; the source's memory is
    mapped peer to peer when it is on another GPU of the host). Each storage opens once."""
    storages: dict = {}
    out = []
    for c in caches:
        if c.handle is None or c.storage_size == 0:
            raise ValueError("an empty storage")
        key = (c.handle, c.storage_offset)
        st = storages.get(key)
        if st is None:
            st = storages[key] = torch.UntypedStorage._new_shared_cuda(
                device.index if device.index is not None else torch.cuda.current_device(), c.handle,
                c.storage_size, c.storage_offset, c.ref_counter, c.ref_counter_offset, c.event, c.event_sync)
        dtype = kv_io.torch_dtype(c.dtype)
        out.append(torch.empty((0,), dtype=dtype, device=st.device).set_(st, c.offset, tuple(c.shape),
                                                                          tuple(c.stride)))
    return out


class _IpcUnusable(Exception):
    """The cuda_ipc path cannot be used for this source (falls back to TCP unless cuda_ipc is true)."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"KV transfer endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Conn:
    """One framed, optionally authenticated connection. `side`: b"S" (source) or b"K" (sink): the
    direction byte of what this end sends."""

    def __init__(self, sock: socket.socket, key: Optional[bytes], side: bytes,
                 decoder: Optional[msgspec.msgpack.Decoder] = None):
        self.sock = sock
        self.decoder = decoder or _decoder  # other backends extend the message set (nixl.py, mpi.py, ucx.py)
        self.key = key
        # the payload MAC's key: derived, so a payload MAC is never valid as anything else's
        self.payload_key = hmac.new(key, _PAYLOAD_LABEL, hashlib.sha256).digest() if key is not None else None
        self.side = side
        self.peer_side = b"K" if side == b"S" else b"S"
        self.nonce = b""
        self.sent = 0
        self.received = 0
        self.deadline: Optional[float] = None  # monotonic; None: the socket's own timeout

    def _mac(self, direction: bytes, seq: int, body: bytes) -> bytes:
        if self.key is None:
            return _NO_MAC
        return hmac.new(self.key, self.nonce + direction + _SEQ.pack(seq) + body, hashlib.sha256).digest()

    def payload_hasher(self, seq: int):
        """The HMAC (to feed the bytes to) of the payload announced by the source's frame `seq`; None
        without a key."""
        if self.payload_key is None:
            return None
        return hmac.new(self.payload_key, self.nonce + _SEQ.pack(seq), hashlib.sha256)

    def payload_mac(self, seq: int, data: memoryview) -> bytes:
        """The payload MAC of `data` announced by the source's frame `seq` (b"" without a key)."""
        h = self.payload_hasher(seq)
        if h is None:
            return b""
        h.update(data)
        return h.digest()

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)

    def send(self, msg) -> None:
        body = _encoder.encode(msg)
        mac = self._mac(self.side, self.sent, body)
        self.sent += 1
        self._arm()
        self.sock.sendall(_LEN.pack(len(body)) + mac + body)

    def send_bytes(self, data: memoryview, hasher=None) -> None:
        """Send `data`; with `hasher` (an HMAC), in slices, each hashed once it is in the socket's
        buffer, so the hashing overlaps the receiver's work."""
        if hasher is None:
            self._arm()
            self.sock.sendall(data)
            return
        for start in range(0, len(data), _SLICE):
            piece = data[start:start + _SLICE]
            self._arm()
            self.sock.sendall(piece)
            hasher.update(piece)

    def recv_into(self, view: memoryview, hasher=None) -> None:
        """Fill `view` from the socket; `hasher` (an HMAC) is fed each piece as it arrives, so the
        hashing overlaps the sender's work."""
        got = 0
        while got < len(view):
            self._arm()
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("connection closed by peer")
            if hasher is not None:
                hasher.update(view[got:got + n])
            got += n

    def recv(self):
        head = bytearray(_LEN.size + _MAC_LEN)
        self.recv_into(memoryview(head))
        (size,) = _LEN.unpack_from(head)
        if size > MAX_HEADER:
            raise ConnectionError(f"header of {size} bytes (limit {MAX_HEADER})")
        body = bytearray(size)
        self.recv_into(memoryview(body))
        if self.key is not None:
            expected = self._mac(self.peer_side, self.received, bytes(body))
            if not hmac.compare_digest(bytes(head[_LEN.size:]), expected):
                raise _AuthError("HMAC does not match")
        self.received += 1
        try:
            return self.decoder.decode(body)
        except msgspec.DecodeError as e:
            raise ConnectionError(f"malformed message ({e})") from None


class _Staging:
    """A reusable host buffer (pinned when CUDA is in play) to receive or send chunks through."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buf: Optional[torch.Tensor] = None

    def get(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
        return self.buf[:nbytes].view(dtype).view(tuple(shape))


def _cuda_stream(caches: list):
    """A side stream on the caches' GPU (copies overlap the engine's compute), or None on the CPU."""
    for c in caches:
        if c.device.type == "cuda":
            return torch.cuda.Stream(c.device)
    return None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def normalized(layout: RankLayout) -> RankLayout:
    """The layout with tuples where it was built with lists (as it comes out of msgpack)."""
    return msgspec.convert(msgspec.to_builtins(layout), RankLayout)


def _check_caches(kv_caches: list, layout: RankLayout, what: str) -> None:
    """A ValueError when the tensors do not match the layout (a wiring error, at startup)."""
    if len(kv_caches) != len(layout.layers):
        raise ValueError(f"{what}: {len(kv_caches)} cache tensors for {len(layout.layers)} layers")
    if layout.groups and len(layout.groups) != len(layout.layers):
        raise ValueError(f"{what}: {len(layout.groups)} groups for {len(layout.layers)} layers")
    if layout.kind not in ("full", "latent"):
        raise ValueError(f"{what}: kind {layout.kind!r} is neither 'full' nor 'latent'")
    heads = layout.kv_heads[1] - layout.kv_heads[0]
    for layer, cache in zip(layout.layers, kv_caches):
        kind, _, block_size = kv_io.geometry(cache)
        if kind != layout.kind:
            raise ValueError(f"{what}: layer {layer}'s cache {tuple(cache.shape)} is not of kind {layout.kind!r}")
        if kv_io.dtype_name(cache.dtype) != layout.dtype:
            raise ValueError(f"{what}: layer {layer}'s cache is {kv_io.dtype_name(cache.dtype)}, "
                             f"layout says {layout.dtype}")
        if block_size != layout.block_size:
            raise ValueError(f"{what}: layer {layer}'s cache has blocks of {block_size}, "
                             f"layout says {layout.block_size}")
        if kind == "full" and (cache.shape[3] != heads or cache.shape[4] != layout.head_dim):
            raise ValueError(f"{what}: layer {layer}'s cache {tuple(cache.shape)} does not hold {heads} heads "
                             f"of {layout.head_dim}")
        if kind == "latent" and cache.shape[2] != layout.latent_dim:
            raise ValueError(f"{what}: layer {layer}'s cache {tuple(cache.shape)} is not of "
                             f"latent_dim {layout.latent_dim}")


def _ipc_local_why(kv_caches: list) -> Optional[str]:
    """Why this process's caches cannot take the cuda_ipc path, or None."""
    if not kv_caches or any(c.device.type != "cuda" for c in kv_caches):
        return "the KV caches are not CUDA tensors"
    return cuda_ipc_unsupported()


class TcpKvSource(KvSource):
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
            conn.send(Hello(nonce, self.layout, self.host_id, self._ipc_instance))
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
        hasher = conn.payload_hasher(conn.sent) if msg.mac else None
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

    # -- the cuda_ipc path -----------------------------------------------------------------------

    def _ipc_open(self, conn: _Conn, msg: IpcOpen) -> None:
        if not self._ipc_instance:
            conn.send(Error("this context rank does not offer CUDA IPC (its caches are not CUDA tensors, or "
                            "cache_transceiver_config.cuda_ipc is false)"))
            return
        if msg.host != self.host_id:
            conn.send(Error(f"CUDA IPC is for sinks on this host ({self.host_id}); the sink says {msg.host!r}"))
            return
        try:
            with self._ipc_lock:
                shared: dict = {}
                caches = [ipc_export(c, shared) for c in self.kv_caches]
        except Exception as e:  # noqa: BLE001 - the sink falls back to TCP
            logger.warning("KV source: cannot export CUDA IPC handles of the KV caches (%s: %s); no longer "
                           "offering CUDA IPC: same-host sinks use TCP", type(e).__name__, e)
            self._ipc_instance = b""
            conn.send(Error(_one_line(f"cannot export CUDA IPC handles ({type(e).__name__}: {e})")))
            return
        conn.send(IpcHandles(caches))

    def _ipc_pull(self, conn: _Conn, msg: IpcPull) -> None:
        lay = self.layout
        if not self._ipc_instance:
            conn.send(Error("this context rank does not offer CUDA IPC"))
            return
        if msg.model_id != lay.model_id or msg.dtype != lay.dtype:
            conn.send(Error(f"the context rank serves model_id={lay.model_id!r} dtype={lay.dtype}; the request "
                            f"names model_id={msg.model_id!r} dtype={msg.dtype}"))
            return
        missing = [layer for layer in msg.layers if layer not in lay.layers]
        if not msg.layers or missing:
            conn.send(Error(f"layers {missing or []} are not on this context rank (it holds {list(lay.layers)})"))
            return
        if msg.num_tokens <= 0:
            conn.send(Error(f"a request of {msg.num_tokens} tokens"))
            return
        groups = sorted({lay.group_of(layer) for layer in msg.layers})
        if any(g >= len(msg.block_ids) for g in groups):
            conn.send(Error(f"the request names no block ids for KV cache groups {groups}"))
            return
        rid = msg.ctx_request_id
        req = self._authorize(conn, rid, {g: msg.block_ids[g] for g in groups}, msg.num_tokens)
        if req is None:
            return
        conn.ipc_reading.append(rid)  # until IpcDone or the connection closes
        conn.send(IpcGrant([list(b) for b in req.block_ids], req.num_tokens))

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


def check_payload(mac: bytes, expected: bytes, layer: int, t0: int, t1: int, ep: str) -> None:
    """_Fail unless a chunk's payload MAC (computed here) is the one the context rank sent."""
    if not hmac.compare_digest(mac, expected):
        why = "altered in transit" if expected else "the context server sent none"
        raise _Fail(f"layer {layer} tokens [{t0}, {t1}) from context rank {ep} failed the payload integrity check "
                    f"(its MAC does not match: {why}); none of it was written")


def _compatible(sink: RankLayout, src: RankLayout) -> Optional[str]:
    """A one-line reason a source's KV cannot go into the sink's caches, or None."""
    for name in ("model_id", "dtype", "kind", "head_dim", "num_kv_heads", "latent_dim"):
        a, b = getattr(src, name), getattr(sink, name)
        if a != b:
            return (f"{name} mismatch: the context rank at {src.endpoint} has {name}={a!r}, this generation "
                    f"rank has {name}={b!r}")
    return None


class TcpKvSink(KvSink):
    decoder = _decoder  # as TcpKvSource.decoder

    IPC_CHUNK_BYTES = 64 << 20  # the most one cuda_ipc gather holds on the GPU at once (per layer and chunk)

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
        if expect is not None and hello.layout != expect:
            sock.close()
            raise _Fail(f"context rank {ep} now holds a different layout than the disaggregated params name "
                        f"(restarted?): {_compatible(expect, hello.layout) or 'layers/heads/blocks differ'}")
        return conn

    def _exchange(self, conn: _Conn, msg, ep: str):
        try:
            conn.send(msg)
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
                    self._pull_items(conn, source, items, src, dst_block_ids, abort, progress)
                    self._count_path("tcp")
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

    # -- the cuda_ipc path -----------------------------------------------------------------------

    def _pull_ipc(self, conn: _Conn, source: RankLayout, items, src: KvRequest, dst_block_ids, abort,
                  progress: dict, stream) -> bool:
        """Move `items` GPU to GPU when the cuda_ipc path can be used with this source (True), else
        False (the caller goes over TCP); raises _Fail when it fails after the grant, or when it
        cannot be used and cuda_ipc is true."""
        if self.cuda_ipc is False or self._ipc_why:  # (cuda_ipc true with a reason here: refused at start-up)
            return False
        ep = source.endpoint
        try:
            if not getattr(conn, "peer_ipc", b""):
                raise _IpcUnusable("the context rank does not offer it (its caches are not CUDA tensors, "
                                   "cache_transceiver_config.cuda_ipc is false there, or an older version)")
            if conn.peer_host != self.host_id:
                raise _IpcUnusable(f"the context rank is on another host ({conn.peer_host or 'unknown'})")
            views = self._ipc_source_caches(conn, source)
        except _IpcUnusable as e:
            if self.cuda_ipc is True:
                raise _Fail(f"cache_transceiver_config.cuda_ipc=true, but CUDA IPC cannot be used with context "
                            f"rank {ep}: {e}") from None
            if not self._ipc_noted:
                self._ipc_noted = True
                logger.info("KV pulls from context rank %s go over TCP, not CUDA IPC: %s (logged once)", ep, e)
            return False
        self._ipc_copy(conn, source, views, items, src, dst_block_ids, abort, progress, stream)
        return True

    def _ipc_source_caches(self, conn: _Conn, source: RankLayout) -> list:
        """The source's cache tensors opened in this process (once per source instance); _IpcUnusable."""
        ep = source.endpoint
        with self._ipc_lock:
            hit = self._ipc_views.get(ep)
            if hit is not None and hit[0] == conn.peer_ipc:
                return hit[1]
            failed = self._ipc_failed.get(ep)
            if failed is not None and failed[0] == conn.peer_ipc:
                raise _IpcUnusable(failed[1])
            try:
                try:
                    reply = self._exchange(conn, IpcOpen(self.host_id), ep)
                except _Fail as e:
                    raise _IpcUnusable(str(e)) from None
                if not isinstance(reply, IpcHandles) or len(reply.caches) != len(source.layers):
                    raise _IpcUnusable(f"context rank {ep} answered {type(reply).__name__} to IpcOpen")
                try:
                    views = ipc_open(reply.caches, self.kv_caches[0].device)
                    _check_caches(views, source, f"context rank {ep}'s CUDA IPC caches")
                    for v in views:
                        if not v.is_contiguous():
                            raise ValueError(f"a cache of strides {v.stride()} (not contiguous)")
                except Exception as e:  # noqa: BLE001 - any failure to open: TCP
                    raise _IpcUnusable(_one_line(f"opening its CUDA IPC handles failed ({type(e).__name__}: "
                                                 f"{e})")) from None
            except _IpcUnusable as e:
                self._ipc_failed[ep] = (conn.peer_ipc, str(e))
                logger.warning("KV pulls from context rank %s fall back to TCP: CUDA IPC failed: %s", ep, e)
                self._ipc_noted = True
                raise
            self._ipc_views[ep] = (conn.peer_ipc, views)  # drops a restarted source's old mapping
            return views

    def _ipc_copy(self, conn: _Conn, source: RankLayout, views: list, items, src: KvRequest, dst_block_ids,
                  abort, progress: dict, stream) -> None:
        ep = source.endpoint
        lay = self.layout
        layers = sorted({layer for layer, _ in items})
        grant = self._exchange(conn, IpcPull(src.ctx_request_id, [list(b) for b in src.block_ids], src.num_tokens,
                                             layers, lay.model_id, lay.dtype), ep)
        if not isinstance(grant, IpcGrant) or grant.num_tokens != src.num_tokens:
            raise _Fail(f"context rank {ep} answered {grant!r} to IpcPull")
        n = grant.num_tokens
        if stream is not None:  # the engine's earlier work on these blocks (a freed request's) comes first
            stream.wait_stream(torch.cuda.default_stream(stream.device))
        slots: dict = {}
        for layer, heads in items:
            if abort.is_set():  # another context rank failed: the pull has failed
                break
            progress["layer"] = layer
            src_group, dst_group = source.group_of(layer), lay.group_of(layer)
            if src_group >= len(grant.block_ids):
                raise _Fail(f"the request has no block ids for KV cache group {src_group} of layer {layer}")
            src_cache = views[source.layers.index(layer)]
            cache = self.kv_caches[lay.layers.index(layer)]
            if lay.kind == "latent":
                src_heads = dst_heads = None
                per_token = cache.shape[2] * cache.element_size()
            else:
                src_heads = (heads[0] - source.kv_heads[0], heads[1] - source.kv_heads[0])
                dst_heads = (heads[0] - lay.kv_heads[0], heads[1] - lay.kv_heads[0])
                per_token = 2 * (heads[1] - heads[0]) * cache.shape[4] * cache.element_size()
            chunk = max(1, min(self.max_tokens_in_buffer or n, self.IPC_CHUNK_BYTES // per_token))
            for t0 in range(0, n, chunk):
                t1 = min(n, t0 + chunk)
                key = (src_group, dst_group, t0, t1)
                if key not in slots:
                    slots[key] = (
                        kv_io.token_slots(grant.block_ids[src_group], source.block_size, t0, t1,
                                          kv_io.geometry(src_cache)[1]).to(cache.device),
                        kv_io.token_slots(dst_block_ids[dst_group], lay.block_size, t0, t1,
                                          kv_io.geometry(cache)[1]).to(cache.device))
                src_idx, dst_idx = slots[key]
                progress["bytes"] += kv_io.copy_slots(src_cache, src_idx, src_heads, cache, dst_idx, dst_heads)
        if stream is not None:
            stream.synchronize()  # the copies are done (visible to every later launch) before the source hears
        if not abort.is_set():
            reply = self._exchange(conn, IpcDone(src.ctx_request_id), ep)
            if not isinstance(reply, Ok):
                raise _Fail(f"context rank {ep} answered {type(reply).__name__} to IpcDone")

    def _pull_items(self, conn: _Conn, source: RankLayout, items: list[tuple[int, tuple[int, int]]],
                    src: KvRequest, dst_block_ids: list[list[int]], abort: threading.Event, progress: dict) -> None:
        ep = source.endpoint
        lay = self.layout
        n = src.num_tokens
        chunk = self.max_tokens_in_buffer or n
        staging = _Staging(self._pinned)
        verify = self._verify(conn)
        for layer, heads in items:
            progress["layer"] = layer
            src_group = source.group_of(layer)
            if src_group >= len(src.block_ids):
                raise _Fail(f"the request has no block ids for KV cache group {src_group} of layer {layer}")
            src_ids = list(src.block_ids[src_group])
            cache = self.kv_caches[lay.layers.index(layer)]
            dst_ids = dst_block_ids[lay.group_of(layer)]
            local = None if lay.kind == "latent" else (heads[0] - lay.kv_heads[0], heads[1] - lay.kv_heads[0])
            for t0 in range(0, n, chunk):
                if abort.is_set():  # another context rank failed: the pull has failed
                    return
                t1 = min(n, t0 + chunk)
                reply = self._exchange(conn, Read(src.ctx_request_id, src_ids, n, layer, heads, (t0, t1),
                                                  lay.model_id, lay.dtype, verify), ep)
                shape = kv_io.buffer_shape(cache, t1 - t0, local)
                if not isinstance(reply, Data) or tuple(reply.shape) != shape:
                    raise _Fail(f"context rank {ep} answered {reply!r} for layer {layer} tokens [{t0}, {t1}); "
                                f"expected Data of shape {list(shape)}")
                buf = staging.get(shape, cache.dtype)
                view = _as_bytes(buf)
                if reply.nbytes != len(view):
                    raise _Fail(f"context rank {ep} sends {reply.nbytes} bytes for {len(view)} expected")
                hasher = conn.payload_hasher(conn.received - 1) if verify else None
                conn.recv_into(view, hasher)
                if hasher is not None:
                    trailer = bytearray(_MAC_LEN)
                    conn.recv_into(memoryview(trailer))
                    check_payload(hasher.digest(), bytes(trailer), layer, t0, t1, ep)
                # from (pinned) host memory the H2D copy is synchronous: the staging buffer is free after
                kv_io.scatter(cache, buf, dst_ids, lay.block_size, t0, local)
                progress["bytes"] += len(view)

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

"""The wire protocol of the DEFAULT KV transfer backend's connection (tcp.py), which NIXL, UCX and MPI
keep for their control (nixl.py, _side.py): the messages, the framing and its MACs, the payload MAC,
endpoints and the host identity a Hello carries, and the helpers the backends share for the bytes
(staging buffers, byte views) and the layouts (normalized, _check_caches).

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
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import socket
import struct
import time
from typing import Optional, Sequence, Union

import msgspec
import torch

from meshserve.disagg import kv_io
from meshserve.disagg.mac import SegmentedMac
from meshserve.disagg.transceiver import RankLayout

MAC_SCHEME = 2  # the newest payload MAC scheme this build speaks (Hello.mac_v, Read.mac_v)

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
    mac_v: int = 1  # the payload MAC schemes it speaks, up to: 1 one HMAC, 2 segmented (disagg/mac.py)


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
    mac_v: int = 1  # with mac: the scheme, 2 (segmented) only when the source's Hello offered it


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


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    # ASCII digits only (isdigit() alone takes "²", which int() refuses) and a port connect() takes
    if not sep or not (port.isascii() and port.isdigit() and int(port) <= 65535) or not host:
        raise ValueError(f"KV transfer endpoint {endpoint!r} is not host:port")
    return host, int(port)


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
        self.mac_v = 1  # sink: the payload MAC scheme agreed from the source's Hello
        self.sent = 0
        self.received = 0
        self.deadline: Optional[float] = None  # monotonic; None: the socket's own timeout

    def _mac(self, direction: bytes, seq: int, body: bytes) -> bytes:
        if self.key is None:
            return _NO_MAC
        return hmac.new(self.key, self.nonce + direction + _SEQ.pack(seq) + body, hashlib.sha256).digest()

    def payload_hasher(self, seq: int, scheme: int = MAC_SCHEME):
        """The MAC (update / digest; to feed the bytes to) of the payload announced by the source's
        frame `seq`: scheme 2 hashes segments on a thread pool (disagg/mac.py), 1 is one HMAC (what a
        source or sink of an older build speaks); None without a key."""
        if self.payload_key is None:
            return None
        if scheme >= 2:
            return SegmentedMac(self.payload_key, self.nonce + _SEQ.pack(seq))
        return hmac.new(self.payload_key, self.nonce + _SEQ.pack(seq), hashlib.sha256)

    def payload_mac(self, seq: int, data: memoryview, scheme: int = MAC_SCHEME) -> bytes:
        """The payload MAC of `data` announced by the source's frame `seq` (b"" without a key)."""
        h = self.payload_hasher(seq, scheme)
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
    """A reusable buffer to receive or send chunks through: host memory (pinned when CUDA is in
    play), or GPU memory with `device` (a channel that moves device memory itself: UCX)."""

    def __init__(self, pinned: bool, device: Optional[torch.device] = None):
        self.pinned = pinned and device is None
        self.device = device
        self.buf: Optional[torch.Tensor] = None

    def get(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if self.buf is None or self.buf.numel() < nbytes:
            if self.device is not None:
                self.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            else:
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
        if block_size * layout.cp[1] != layout.block_size:  # cp (RING): the rank's sub-blocks
            raise ValueError(f"{what}: layer {layer}'s cache has blocks of {block_size}, "
                             f"layout says {layout.block_size} (cp {list(layout.cp)})")
        if kind == "full" and (cache.shape[3] != heads or cache.shape[4] != layout.head_dim):
            raise ValueError(f"{what}: layer {layer}'s cache {tuple(cache.shape)} does not hold {heads} heads "
                             f"of {layout.head_dim}")
        if kind == "latent" and cache.shape[2] != layout.latent_dim:
            raise ValueError(f"{what}: layer {layer}'s cache {tuple(cache.shape)} is not of "
                             f"latent_dim {layout.latent_dim}")


def check_payload(mac: bytes, expected: bytes, layer: int, t0: int, t1: int, ep: str) -> None:
    """_Fail unless a chunk's payload MAC (computed here) is the one the context rank sent."""
    if not hmac.compare_digest(mac, expected):
        why = "altered in transit" if expected else "the context server sent none"
        raise _Fail(f"layer {layer} tokens [{t0}, {t1}) from context rank {ep} failed the payload integrity check "
                    f"(its MAC does not match: {why}); none of it was written")


def tristate(value, field: str):
    """cache_transceiver_config's auto | true | false settings: "auto", True or False; a ValueError
    of one line naming the field otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.strip().lower()]
    raise ValueError(f"cache_transceiver_config.{field}={value!r} is not one of auto, true, false")

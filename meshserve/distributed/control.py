"""The control plane between rank 0 (the engine) and the worker ranks: ZMQ ROUTER/DEALER with
msgspec messages, each signed with HMAC-SHA256 under a per-job key. Nothing here unpickles.

Rank 0 binds a ROUTER on the rendezvous host (loopback unless MASTER_ADDR names another
interface); every worker connects a DEALER and says Ready. Commands go out to every worker; the
last pipeline stage's sampling rank sends ModelRunnerOutputs back the same way. Tensors never
travel here: hidden states go over torch.distributed.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Optional, Union

import msgspec
import zmq

from meshserve.disagg.transceiver import RankLayout
from meshserve.engine.messages import ModelRunnerOutput, SchedulerOutput


class Ready(msgspec.Struct, tag=True):
    rank: int


class ProfileKv(msgspec.Struct, tag=True):
    free_fraction: float
    cpu_budget_bytes: int


class KvBlocks(msgspec.Struct, tag=True):
    rank: int
    num_blocks: int


class InitKv(msgspec.Struct, tag=True):
    num_blocks: int


class Step(msgspec.Struct, tag=True):
    so: SchedulerOutput


class Result(msgspec.Struct, tag=True):
    rank: int
    out: ModelRunnerOutput


class WorkerError(msgspec.Struct, tag=True):
    rank: int
    message: str  # one line (errors.describe); the traceback stays in the rank's own log
    expected: bool = False  # bad input (a ValueError...), not a bug


class Shutdown(msgspec.Struct, tag=True):
    pass


class StageStats(msgspec.Struct, tag=True):
    """A pipeline stage's busy fraction over its last window (about a second)."""
    rank: int
    pp_rank: int
    busy_fraction: float


class ExpertLoadReport(msgspec.Struct, tag=True):
    """Tokens routed to each expert of a stage's MoE layers over a window of steps
    (layers/moe/load.py: layers, tokens [layer][expert], ratio_mean, ratio_max, steps)."""
    rank: int
    report: dict


class KvLayout(msgspec.Struct, tag=True):
    """Disaggregated serving: what a rank holds of the KV cache and its transfer endpoint (sent once
    its KV cache and transfer endpoints are up)."""
    rank: int
    layout: RankLayout


class KvPullDone(msgspec.Struct, tag=True):
    """Disaggregated serving: a rank finished its part of a request's KV pull."""
    rank: int
    req_id: str
    ok: bool
    error: Optional[str] = None


Message = Union[Ready, ProfileKv, KvBlocks, InitKv, Step, Result, WorkerError, Shutdown, StageStats,
                ExpertLoadReport, KvLayout, KvPullDone]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class AuthError(RuntimeError):
    pass


class Signer:
    def __init__(self, key: bytes):
        self.key = key

    def pack(self, msg) -> list[bytes]:
        body = _encoder.encode(msg)
        return [hmac.new(self.key, body, hashlib.sha256).digest(), body]

    def unpack(self, frames: list[bytes]):
        if len(frames) != 2:
            raise AuthError(f"control message with {len(frames)} frames; expected 2")
        mac, body = frames
        if not hmac.compare_digest(mac, hmac.new(self.key, body, hashlib.sha256).digest()):
            raise AuthError("control message failed authentication (wrong MESHSERVE_SECRET?)")
        return _decoder.decode(body)


class DriverChannel:
    """Rank 0's end: a ROUTER that knows each worker's identity after its Ready."""

    def __init__(self, host: str, key: bytes):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bind_host = f"[{host}]" if ":" in host else host
        if ":" in host:
            self.sock.setsockopt(zmq.IPV6, 1)
        port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
        self.endpoint = f"tcp://{bind_host}:{port}"
        self.signer = Signer(key)
        self.identities: dict[int, bytes] = {}

    def recv(self, timeout_ms: int) -> Optional[object]:
        if not self.sock.poll(timeout_ms):
            return None
        ident, *frames = self.sock.recv_multipart()
        try:
            msg = self.signer.unpack(frames)
        except (AuthError, msgspec.DecodeError):
            return None  # not from one of our ranks: drop it
        if isinstance(msg, Ready):
            self.identities[msg.rank] = ident
        return msg

    def broadcast(self, msg) -> None:
        frames = self.signer.pack(msg)
        for ident in self.identities.values():
            self.sock.send_multipart([ident, *frames], copy=False)

    def close(self) -> None:
        self.sock.close(0)


class WorkerChannel:
    def __init__(self, endpoint: str, key: bytes, rank: int):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        if endpoint.startswith("tcp://["):
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.connect(endpoint)
        self.signer = Signer(key)
        self.rank = rank

    def send(self, msg) -> None:
        self.sock.send_multipart(self.signer.pack(msg), copy=False)

    def recv(self, timeout_ms: int) -> Optional[object]:
        if not self.sock.poll(timeout_ms):
            return None
        return self.signer.unpack(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close()

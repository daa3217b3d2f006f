"""The KV transfer interface between a context server's ranks and a generation server's ranks.

Pull model. A context server's every rank runs a `KvSource`: an endpoint that serves reads of its
own KV cache blocks (the engine keeps a finished context request's blocks pinned until the
generation side acknowledges the transfer, or `kv_transfer_timeout_ms` passes). A generation
server's every rank runs a `KvSink`: told which source ranks hold which layers and heads of a
request's KV, it reads them (layer by layer, in chunks of at most `max_tokens_in_buffer` tokens)
into the blocks its engine allocated, re-slicing heads when the TP sizes differ and re-blocking
when `tokens_per_block` differs. Each backend (DEFAULT over TCP here; NIXL, UCX, MPI in issue 23)
implements both classes; `create_transceiver(backend, ...)` picks one.

Everything a sink needs to know about the source travels in `RankLayout`s inside the signed
disaggregated params (params.py); nothing here trusts a client.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import msgspec


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # connecting to the sources
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


class RankLayout(msgspec.Struct, frozen=True):
    """What one rank holds of a model's KV cache, and where to read it."""
    endpoint: str  # "host:port" of the rank's KvSource ("" on a sink)
    model_id: str  # model name + hash of its config.json: both sides must agree
    dtype: str  # "bfloat16", "float32"...: both sides must agree (no conversion)
    block_size: int  # tokens per block
    layers: tuple[int, ...]  # the model layers this rank holds (its pipeline stage)
    num_kv_heads: int  # the model's KV heads (all ranks)
    kv_heads: tuple[int, int]  # [start, end) of the KV heads this rank holds (replicas when kv < tp)
    head_dim: int
    kind: str = "full"  # "full" (K and V per head) or "latent" (one kv_lora_rank + rope vector per token)
    latent_dim: int = 0  # kind "latent": kv_lora_rank + qk_rope_head_dim
    groups: tuple[int, ...] = ()  # KV cache group of each of `layers` (empty: all in group 0)


class KvRequest(msgspec.Struct, frozen=True):
    """One request's KV on the source side: its block ids (one list per KV cache group) and length."""
    ctx_request_id: str
    block_ids: list[list[int]]
    num_tokens: int


@dataclass
class PullResult:
    state: TransferState
    error: Optional[str] = None
    bytes: int = 0
    seconds: float = 0.0


class KvSource:
    """Serves reads of this rank's KV blocks. `kv_caches[i]` is the cache tensor of
    `layout.layers[i]` (shapes of engine/kv_spec.py: full [2, blocks, block_size, heads, dim],
    latent [blocks, block_size, latent_dim])."""

    def __init__(self, kv_caches: list, layout: RankLayout, host: str = "127.0.0.1", key: Optional[bytes] = None):
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class KvSink:
    """Reads a request's KV from the source ranks into this rank's blocks."""

    def __init__(self, kv_caches: list, layout: RankLayout, max_tokens_in_buffer: Optional[int] = None,
                 key: Optional[bytes] = None):
        raise NotImplementedError

    def pull(self, sources: list[RankLayout], src: KvRequest, dst_block_ids: list[list[int]],
             timeout_s: float) -> PullResult:
        """Blocking: read every layer and head this rank holds from the sources that hold them
        (any one replica when several do), into `dst_block_ids` (per KV group, this side's block
        size). Returns SUCCESS, or FAILED with a one-line error; never raises for transfer errors."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

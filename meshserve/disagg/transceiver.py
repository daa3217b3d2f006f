"""The KV transfer interface between a context server's ranks and a generation server's ranks.

Pull model. A context server's every rank runs a `KvSource`: an endpoint that serves reads of its
own KV cache blocks (the engine keeps a finished context request's blocks pinned until the
generation side acknowledges the transfer, or `kv_transfer_timeout_ms` passes). A generation
server's every rank runs a `KvSink`: told which source ranks hold which layers and heads of a
request's KV, it reads them (layer by layer, in chunks of at most `max_tokens_in_buffer` tokens)
into the blocks its engine allocated, re-slicing heads when the TP sizes differ and re-blocking
when `tokens_per_block` differs. Each backend (DEFAULT over TCP; NIXL, UCX and MPI: docs/kv_backends.md)
implements both classes; `create_transceiver(backend)` picks one.

Everything a sink needs to know about the source travels in `RankLayout`s inside the signed
disaggregated params (params.py); nothing here trusts a client.

Lifecycle on the context side: the engine builds one source per rank over that rank's caches, calls
`register(KvRequest)` when a context request finishes (its blocks pinned) and `unregister(id)` before
it frees them on `kv_transfer_timeout_ms`; the generation side's release message unregisters the
request and then calls `on_release(ctx_request_id)` (on the source's thread) so the engine frees them.
With `require_registered=True` a source serves reads of registered requests only, and `unregister`
waits for a read in progress: a late pull then fails instead of reading reused blocks.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

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
    dtype: str  # "bfloat16", "float32"... (torch's name without "torch."): both sides must agree (no conversion)
    block_size: int  # tokens per block
    layers: tuple[int, ...]  # the model layers this rank holds (its pipeline stage)
    num_kv_heads: int  # the model's KV heads (all ranks)
    kv_heads: tuple[int, int]  # [start, end) of the KV heads this rank holds (replicas when kv < tp)
    head_dim: int
    kind: str = "full"  # "full" (K and V per head) or "latent" (one kv_lora_rank + rope vector per token)
    latent_dim: int = 0  # kind "latent": kv_lora_rank + qk_rope_head_dim
    groups: tuple[int, ...] = ()  # KV cache group of each of `layers` (empty: all in group 0)
    # context parallelism RING: (cp rank, cp size), this rank holding sub-block `rank` of every block
    # (block_size // size tokens of each; disagg/kv_io.py dest_slots). Such a rank only receives KV.
    cp: tuple[int, int] = (0, 1)
    dp: int = 0  # attention DP (enable_attention_dp): this rank's DP rank; a request's KV lives on one

    def group_of(self, layer: int) -> int:
        """The KV cache group (index into a request's block_ids) of a model layer this rank holds."""
        return self.groups[self.layers.index(layer)] if self.groups else 0


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
    path: str = ""  # how the bytes moved: "tcp", "cuda_ipc" (DEFAULT), "nixl" / "nixl_gpu", "ucx" / "ucx_gpu",
    # "mpi" ("_gpu": GPU memory on both ends, no host copy); "+" joins
    # the paths of several context ranks


class KvSource:
    """Serves reads of this rank's KV blocks. `kv_caches[i]` is the cache tensor of
    `layout.layers[i]` (shapes of engine/kv_spec.py: full [2, blocks, block_size, heads, dim],
    latent [blocks, block_size, latent_dim]). `key`: the HMAC key (params.secret_key()); None
    authenticates nothing (tests on one host only)."""

    def __init__(self, kv_caches: list, layout: RankLayout, host: str = "127.0.0.1", key: Optional[bytes] = None,
                 on_release: Optional[Callable[[str], None]] = None, require_registered: bool = False):
        raise NotImplementedError

    on_release: Optional[Callable[[str], None]]  # set by the engine; called with ctx_request_id
    layout: RankLayout  # the constructor's layout with `endpoint` filled in (what goes into the params)

    @property
    def endpoint(self) -> str:
        """"host:port" to put in this rank's RankLayout."""
        raise NotImplementedError

    def register(self, req: KvRequest) -> None:
        """The request's blocks are pinned and may be read."""
        raise NotImplementedError

    def unregister(self, ctx_request_id: str) -> bool:
        """No more reads of the request (waits for one in progress). False if it was not registered."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class KvSink:
    """Reads a request's KV from the source ranks into this rank's blocks (`kv_caches[i]`: the cache
    of `layout.layers[i]`; `layout.endpoint` is ""). `verify_payload` (with a key): check each chunk's
    MAC before it is written into the blocks (cache_transceiver_config.verify_payload: True, False,
    or "auto": unless the source is this host over loopback; DEFAULT, UCX and MPI; NIXL's one-sided
    reads have none). DEFAULT also takes `cuda_ipc` ("auto", True, False: cuda_ipc.py)."""

    def __init__(self, kv_caches: list, layout: RankLayout, max_tokens_in_buffer: Optional[int] = None,
                 key: Optional[bytes] = None, verify_payload="auto"):
        raise NotImplementedError

    def pull(self, sources: list[RankLayout], src: KvRequest, dst_block_ids: list[list[int]],
             timeout_s: float) -> PullResult:
        """Blocking: read every layer and head this rank holds from the sources that hold them
        (any one replica when several do), into `dst_block_ids` (per KV group, this side's block
        size). Returns SUCCESS, or FAILED with a one-line error; never raises for transfer errors.
        When it returns, nothing writes into this rank's blocks any more (safe to free them)."""
        raise NotImplementedError

    def release(self, source_rank0: RankLayout, ctx_request_id: str, timeout_s: float = 5.0) -> Optional[str]:
        """Tell the context server (its rank 0 source) the request's KV is no longer needed.
        None on success, else a one-line error; never raises."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# backend name -> (module, source class, sink class); imported when picked (as models/registry.py). Every
# module but tcp's has `available() -> None | str` (why it cannot be used here; MPI's starts nothing); one
# with `init()` (MPI) has it called by create_transceiver, in the process that will hold the KV.
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "DEFAULT": ("meshserve.disagg.tcp", "TcpKvSource", "TcpKvSink"),
    "NIXL": ("meshserve.disagg.nixl", "NixlKvSource", "NixlKvSink"),
    "UCX": ("meshserve.disagg.ucx", "UcxKvSource", "UcxKvSink"),
    "MPI": ("meshserve.disagg.mpi", "MpiKvSource", "MpiKvSink"),
}
_NEEDS = {  # what each one needs, for error messages
    "DEFAULT": "TCP; works everywhere",
    "NIXL": "the nixl-cu13 wheel",
    "UCX": "the ucxx-cu13 wheel",
    "MPI": "mpi4py and both servers started in one mpirun",
}
_LATER: tuple[str, ...] = ()  # every backend has landed (issue 23)


def _alternatives(name: str) -> str:
    return ", ".join(f"{b} ({_NEEDS[b]})" for b in _BACKENDS if b != name)


def check_backend(backend: str) -> str:
    """The backend's canonical name, or a ValueError of one line: not a backend, or not usable here
    (naming why and the alternatives)."""
    name = str(backend).upper()
    if name not in _BACKENDS:
        raise ValueError(f"cache_transceiver_config.backend={backend!r} is not a KV transfer backend; "
                         f"accepted: {', '.join(_BACKENDS)}")
    if name != "DEFAULT":
        mod = importlib.import_module(_BACKENDS[name][0])
        why = mod.available()
        if why:
            raise ValueError(" ".join(f"cache_transceiver_config.backend={backend!r} cannot be used here: {why}; "
                                      f"alternatives: {_alternatives(name)}".split()))
    return name


def create_transceiver(backend: str) -> tuple[type[KvSource], type[KvSink]]:
    """The (source class, sink class) of `cache_transceiver_config.backend` (case-insensitive); a
    ValueError of one line when it is not a backend or cannot be used here."""
    name = check_backend(backend)
    module, source, sink = _BACKENDS[name]
    mod = importlib.import_module(module)
    if hasattr(mod, "init"):  # MPI: MPI_Init here, where the KV will be; never in check_backend (serve's front)
        mod.init()
    return getattr(mod, source), getattr(mod, sink)

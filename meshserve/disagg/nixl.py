"""The NIXL KV transfer backend: the generation side reads the context side's KV blocks by descriptor.

NIXL (PyPI `nixl-cu13`, module `nixl_cu13`; its UCX plugin) moves registered memory between agents:
on the CPU the KV caches are DRAM and UCX moves them over tcp / cma / shared memory; on a GPU they
are registered as VRAM and read directly (no host staging; not run on a GPU yet).

Control stays on the HMAC-authenticated connection of tcp.py (this module subclasses its classes):

    source -> sink  Hello(nonce, layout)                       as DEFAULT
    sink -> source  NixlOpen(request, block ids, tokens, layers) -> NixlGrant(agent name, agent metadata,
                                                                   regions: address and size of each layer's cache)
                    ... the sink READs over NIXL ...
                    NixlDone(ctx_request_id)                   -> Ok
                    Release(ctx_request_id)                    -> Ok (as DEFAULT)

A `NixlOpen` is checked as a DEFAULT `Read` is (model id, dtype, layers, registered request and its
block ids, blocks in range) and counts as a read in progress until `NixlDone` or the connection's
end, so `unregister` waits for it and a late pull fails. Each source registers its caches with its
own NIXL agent once; each sink registers its caches once (and staging buffers as it needs them),
loads a source agent's metadata the first time it reads from it, and builds transfer descriptors for
the tokens x heads it needs, one layer (and chunk of `max_tokens_in_buffer` tokens) at a time:

- **direct** (into the sink's own blocks) when the read covers all of the source rank's heads and
  all of the sink rank's heads (equal TP, replicated heads, latent caches), whatever the two block
  sizes: one descriptor per run of tokens contiguous on both sides (runs end at either side's block
  boundaries);
- **staged** otherwise: the context TP is larger (the sink's heads come from several context ranks)
  or smaller (the sink needs some of a context rank's heads). The sink reads the source rank's
  whole token rows (all its heads: one descriptor per source block run) into a registered staging
  buffer and kv_io scatters the heads it needs into its blocks. When the context TP is smaller this
  reads (context heads / sink heads) times the bytes it keeps: per-token descriptors of a head
  slice cost ~13 us each here, far more than the extra bytes.

NIXL reads are one-sided: once a sink has a source's metadata, UCX would serve reads of any of the
source's registered cache without asking it. The grant protocol keeps honest sinks within the
registered request's lifetime; the key (MESHSERVE_SECRET or the key file) decides who gets the
metadata at all. The bytes themselves carry no MAC (`verify_payload` has no effect here: a READ lands
before anything could check it); they rely on UCX's transport and the authenticated control channel.

On a machine without InfiniBand devices but with libibverbs installed (OpenMPI pulls it in), UCX's
`ib` module makes processes crash at exit (signal 11): unless `UCX_MODULES` is set, importing this
module sets `UCX_MODULES=^ib` there (never when /sys/class/infiniband lists a device).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from typing import Callable, Optional, Union

import msgspec
import numpy as np
import torch

from meshserve.disagg import kv_io, tcp
from meshserve.disagg.tcp import Error, Ok, TcpKvSink, TcpKvSource, _Fail, _one_line
from meshserve.disagg.transceiver import KvRequest, RankLayout

logger = logging.getLogger(__name__)

_MODULES = ("nixl_cu13", "nixl_cu12", "nixl")  # the wheels' module names, preferred first


def _no_ib_devices() -> bool:
    try:
        return not os.listdir("/sys/class/infiniband")
    except OSError:
        return True


def prepare_ucx_env(env=os.environ) -> None:
    """UCX_MODULES=^ib where there are no InfiniBand devices (see the module doc), unless set."""
    if "UCX_MODULES" not in env and _no_ib_devices():
        env["UCX_MODULES"] = "^ib"


_nixl_api = None
_import_error: Optional[str] = None


def nixl_api():
    """The nixl module (nixl_agent, nixl_agent_config...), or an ImportError naming the wheel."""
    global _nixl_api, _import_error
    if _nixl_api is not None:
        return _nixl_api
    prepare_ucx_env()
    errors = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
            if hasattr(mod, "nixl_agent"):
                _nixl_api = mod
                return mod
            errors.append(f"{name}: no nixl_agent")
        except ImportError as e:
            errors.append(f"{name}: {e}")
    _import_error = "; ".join(errors)
    raise ImportError(f"the NIXL backend needs the nixl-cu13 wheel (pip install --no-deps nixl-cu13): "
                      f"{_import_error}")


def available() -> Optional[str]:
    """None when NIXL can be used here, else why not (one line)."""
    try:
        nixl_api()
    except ImportError as e:
        return _one_line(str(e))
    return None


class NixlOpen(msgspec.Struct, tag=True):
    ctx_request_id: str
    block_ids: list[list[int]]  # per KV cache group, source block size
    num_tokens: int
    layers: list[int]  # the model layers the sink will read from this rank
    model_id: str
    dtype: str


class Region(msgspec.Struct):
    layer: int
    addr: int
    nbytes: int
    device: int  # CUDA device id (0 for DRAM)


class NixlGrant(msgspec.Struct, tag=True):
    agent: str
    metadata: bytes
    mem: str  # "DRAM" or "VRAM"
    regions: list[Region]


class NixlDone(msgspec.Struct, tag=True):
    ctx_request_id: str


_Message = Union[tcp.Hello, tcp.Read, tcp.Release, tcp.Data, Ok, Error, NixlOpen, NixlGrant, NixlDone]
_decoder = msgspec.msgpack.Decoder(_Message)


def _agent(prefix: str):
    api = nixl_api()
    conf = api.nixl_agent_config(backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    name = f"meshserve-{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    agent = api.nixl_agent(name, conf)
    if "UCX" not in agent.backends:
        raise RuntimeError(f"NIXL has no UCX plugin here (plugins: {agent.get_plugin_list()})")
    return agent


def _mem_type(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.get_device()) if t.device.type == "cuda" else ("DRAM", 0)


def _check_contiguous(kv_caches: list, what: str) -> None:
    for i, c in enumerate(kv_caches):
        if not c.is_contiguous():
            raise ValueError(f"{what}: cache tensor {i} {tuple(c.shape)} is not contiguous (NIXL registers "
                             f"whole tensors)")


class NixlKvSource(TcpKvSource):
    decoder = _decoder

    def __init__(self, kv_caches: list, layout: RankLayout, host: str = "127.0.0.1", key: Optional[bytes] = None,
                 on_release: Optional[Callable[[str], None]] = None, require_registered: bool = False):
        tcp._check_caches(kv_caches, tcp.normalized(layout), "KV source")
        _check_contiguous(kv_caches, "KV source")
        self._agent = _agent("kv-src")
        self._reg = self._agent.register_memory(list(kv_caches)) if kv_caches else None
        self._mem = _mem_type(kv_caches[0])[0] if kv_caches else "DRAM"
        self._metadata = self._agent.get_agent_metadata()
        self._regions = [Region(layer, c.data_ptr(), c.numel() * c.element_size(), _mem_type(c)[1])
                         for layer, c in zip(layout.layers, kv_caches)]
        self._grants: dict[int, dict[str, int]] = {}  # id(conn) -> ctx_request_id -> open grants
        super().__init__(kv_caches, layout, host=host, key=key, on_release=on_release,
                         require_registered=require_registered)

    def _check_open(self, msg: NixlOpen) -> Optional[str]:
        """Why the sink may not read this (one line), or None. Called under self._cond."""
        lay = self.layout
        if msg.model_id != lay.model_id or msg.dtype != lay.dtype:
            return (f"the context rank serves model_id={lay.model_id!r} dtype={lay.dtype}; the request names "
                    f"model_id={msg.model_id!r} dtype={msg.dtype}")
        missing = [layer for layer in msg.layers if layer not in lay.layers]
        if missing:
            return f"layer {missing[0]} is not on this context rank (it holds {list(lay.layers)})"
        rid = msg.ctx_request_id
        req = self._registered.get(rid)
        if req is None and self.require_registered:
            return f"ctx request {rid} is not held by this context server (released, or kv_transfer_timeout_ms passed)"
        for layer in msg.layers:
            group = lay.group_of(layer)
            if group >= len(msg.block_ids):
                return f"the request has no block ids for KV cache group {group} of layer {layer}"
            ids = msg.block_ids[group]
            if req is not None and (group >= len(req.block_ids) or list(ids) != list(req.block_ids[group])
                                    or msg.num_tokens != req.num_tokens):
                return f"ctx request {rid}: the block ids or length do not match what the context server holds"
            cache = self.kv_caches[lay.layers.index(layer)]
            _, num_blocks, block_size = kv_io.geometry(cache)
            if msg.num_tokens < 0 or len(ids) * block_size < msg.num_tokens:
                return f"{len(ids)} blocks of {block_size} tokens do not hold {msg.num_tokens} tokens"
            if any(not 0 <= b < num_blocks for b in ids[:-(-msg.num_tokens // block_size) or None]):
                return f"block ids out of range [0, {num_blocks})"
        return None

    def _handle(self, conn, msg) -> bool:
        if isinstance(msg, NixlOpen):
            rid = msg.ctx_request_id
            with self._cond:
                why = self._check_open(msg)
                if why is None:
                    self._inflight[rid] = self._inflight.get(rid, 0) + 1
                    held = self._grants.setdefault(id(conn), {})
                    held[rid] = held.get(rid, 0) + 1
            if why is not None:
                conn.send(Error(_one_line(why)))
                return True
            conn.send(NixlGrant(self._agent.name, self._metadata, self._mem, self._regions))
            return True
        if isinstance(msg, NixlDone):
            self._drop(id(conn), msg.ctx_request_id)
            conn.send(Ok())
            return True
        return super()._handle(conn, msg)

    def _drop(self, conn_id: int, rid: str, all_of_it: bool = False) -> None:
        with self._cond:
            held = self._grants.get(conn_id, {})
            n = held.pop(rid, 0) if all_of_it else min(1, held.get(rid, 0))
            if not all_of_it and n:
                held[rid] -= 1
                if not held[rid]:
                    del held[rid]
            if n:
                self._inflight[rid] -= n
                if self._inflight[rid] <= 0:
                    del self._inflight[rid]
                self._cond.notify_all()

    def _closed_conn(self, conn) -> None:
        with self._cond:
            rids = list(self._grants.get(id(conn), {}))
        for rid in rids:
            self._drop(id(conn), rid, all_of_it=True)
        with self._cond:
            self._grants.pop(id(conn), None)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception:  # noqa: BLE001 - closing: nothing to do about it
                logger.debug("NIXL source: deregister failed", exc_info=True)
            self._reg = None


def _slots(block_ids: list[int], block_size: int, t0: int, t1: int) -> np.ndarray:
    t = np.arange(t0, t1, dtype=np.int64)
    return np.asarray(block_ids, dtype=np.int64)[t // block_size] * block_size + t % block_size


def _runs(src: np.ndarray, dst: np.ndarray, length: int, dev_src: int, dev_dst: int):
    """(local Nx3, remote Nx3) descriptor arrays: element i moves `length` bytes from src[i] to dst[i];
    elements contiguous on both sides merge."""
    if len(src) == 0:
        empty = np.zeros((0, 3), dtype=np.uint64)
        return empty, empty
    brk = np.ones(len(src), dtype=bool)
    brk[1:] = (src[1:] != src[:-1] + length) | (dst[1:] != dst[:-1] + length)
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, len(src)))
    local = np.stack([dst[starts], counts * length, np.full(len(starts), dev_dst)], axis=1).astype(np.uint64)
    remote = np.stack([src[starts], counts * length, np.full(len(starts), dev_src)], axis=1).astype(np.uint64)
    return local, remote


class NixlKvSink(TcpKvSink):
    decoder = _decoder
    POLL_S = 0.0002

    def __init__(self, kv_caches: list, layout: RankLayout, max_tokens_in_buffer: Optional[int] = None,
                 key: Optional[bytes] = None, verify_payload: bool = True):
        # verify_payload has no effect here: NIXL READs land in the blocks (or staging) one-sided, with
        # no MAC to check; the control connection (grants) is authenticated (docs/kv_backends.md)
        super().__init__(kv_caches, layout, max_tokens_in_buffer, key, verify_payload)
        _check_contiguous(kv_caches, "KV sink")
        self._agent = _agent("kv-sink")
        self._reg = self._agent.register_memory(list(kv_caches)) if kv_caches else None
        self._lock = threading.Lock()
        self._remotes: set[str] = set()
        self._staging: list[tuple[torch.Tensor, object]] = []  # free registered buffers (tensor, reg)
        self._all_staging: list[tuple[torch.Tensor, object]] = []
        self.staged_reads = 0  # layers x chunks read through a staging buffer (tests, diagnostics)
        self.direct_reads = 0

    # -- staging buffers ---------------------------------------------------------------------------

    def _take_staging(self, nbytes: int, device: torch.device):
        with self._lock:
            for i, (buf, reg) in enumerate(self._staging):
                if buf.numel() >= nbytes and buf.device == device:
                    return self._staging.pop(i)
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        item = (buf, self._agent.register_memory(buf))
        with self._lock:
            self._all_staging.append(item)
        return item

    def _give_staging(self, item) -> None:
        with self._lock:
            self._staging.append(item)

    def _remote(self, grant: NixlGrant) -> str:
        with self._lock:
            if grant.agent not in self._remotes:
                name = self._agent.add_remote_agent(grant.metadata)
                name = name.decode() if isinstance(name, bytes) else name
                if name != grant.agent:
                    raise _Fail(f"the context rank's NIXL metadata names agent {name!r}, its grant {grant.agent!r}")
                self._remotes.add(grant.agent)
            return grant.agent

    def _forget(self, agent: str) -> None:
        with self._lock:
            if agent in self._remotes:
                self._remotes.discard(agent)
                try:
                    self._agent.remove_remote_agent(agent)
                except Exception:  # noqa: BLE001
                    logger.debug("NIXL sink: remove_remote_agent failed", exc_info=True)

    # -- pulling -------------------------------------------------------------------------------

    def _pull_from(self, source: RankLayout, items, src: KvRequest, dst_block_ids, deadline: float,
                   abort: threading.Event) -> int:
        """Read `items` [(layer, model heads)] from one context rank over NIXL; the bytes moved."""
        ep = source.endpoint
        try:
            conn = self._connect(source, deadline, source)
        except (TimeoutError, OSError) as e:
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise _Fail(f"timed out waiting for context rank {ep} to answer") from None
            raise _Fail(f"connection to context rank {ep} failed ({type(e).__name__}: {e})") from None
        progress = {"layer": -1, "bytes": 0}
        agent = None
        try:
            layers = sorted({layer for layer, _ in items})
            grant = self._exchange(conn, NixlOpen(src.ctx_request_id, [list(g) for g in src.block_ids],
                                                  src.num_tokens, layers, self.layout.model_id,
                                                  self.layout.dtype), ep)
            if not isinstance(grant, NixlGrant):
                raise _Fail(f"context rank {ep} answered {type(grant).__name__} instead of NixlGrant")
            agent = self._remote(grant)
            regions = {r.layer: r for r in grant.regions}
            stream = tcp._cuda_stream(self.kv_caches)
            try:
                for layer, heads in items:
                    if abort.is_set():
                        break
                    progress["layer"] = layer
                    self._read_layer(source, grant, agent, regions, layer, heads, src, dst_block_ids, deadline,
                                     abort, progress, stream)
            finally:
                if stream is not None:
                    stream.synchronize()
            self._count_path("nixl_gpu" if stream is not None else "nixl")
            try:
                self._exchange(conn, NixlDone(src.ctx_request_id), ep)
            except (TimeoutError, OSError, _Fail):
                pass  # the source frees the grant when the connection closes
        except (TimeoutError, OSError) as e:
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise _Fail(f"timed out reading layer {progress['layer']} from context rank {ep} after "
                            f"{progress['bytes']} bytes") from None
            raise _Fail(f"connection to context rank {ep} failed reading layer {progress['layer']} "
                        f"({type(e).__name__}: {e})") from None
        except ValueError as e:
            raise _Fail(f"layer {progress['layer']} from context rank {ep}: {e}") from None
        finally:
            conn.sock.close()
        return progress["bytes"]

    def _read_layer(self, source: RankLayout, grant: NixlGrant, agent: str, regions: dict, layer: int,
                    heads: tuple[int, int], src: KvRequest, dst_block_ids, deadline: float, abort: threading.Event,
                    progress: dict, stream) -> None:
        lay = self.layout
        ep = source.endpoint
        region = regions.get(layer)
        if region is None:
            raise _Fail(f"context rank {ep} granted no region for layer {layer}")
        cache = self.kv_caches[lay.layers.index(layer)]
        es = cache.element_size()
        src_ids = list(src.block_ids[source.group_of(layer)])
        dst_ids = list(dst_block_ids[lay.group_of(layer)])
        n = src.num_tokens
        sbs, dbs = source.block_size, lay.block_size
        mem, dev = _mem_type(cache)
        if lay.kind == "latent":
            row_s = row_d = cache.shape[2] * es  # a token's bytes on either side
            planes = 1
            s_blocks = region.nbytes // (sbs * row_s)
            direct, h_src, local = True, None, None
        else:
            d = lay.head_dim * es
            hs = source.kv_heads[1] - source.kv_heads[0]
            hd = lay.kv_heads[1] - lay.kv_heads[0]
            nh = heads[1] - heads[0]
            row_s, row_d = hs * d, hd * d
            planes = 2
            s_blocks = region.nbytes // (2 * sbs * row_s)
            direct = nh == hs and nh == hd
            h_src = (heads[0] - source.kv_heads[0], heads[1] - source.kv_heads[0])  # within the staged rows
            local = (heads[0] - lay.kv_heads[0], heads[1] - lay.kv_heads[0])
        if region.nbytes != planes * s_blocks * sbs * row_s:
            raise _Fail(f"context rank {ep}'s region for layer {layer} ({region.nbytes} bytes) does not fit its layout")
        num_blocks_d = kv_io.geometry(cache)[1]
        chunk = self.max_tokens_in_buffer or n
        for t0 in range(0, n, chunk):
            if abort.is_set():
                return
            t1 = min(n, t0 + chunk)
            m = t1 - t0
            s_slot = _slots(src_ids, sbs, t0, t1)
            if s_slot.size and (s_slot.min() < 0 or s_slot.max() >= s_blocks * sbs):
                raise _Fail(f"block ids out of range of context rank {ep}'s {s_blocks} blocks")
            src_addr = np.concatenate([region.addr + (p * s_blocks * sbs + s_slot) * row_s for p in range(planes)])
            staging = None
            if direct:
                d_slot = _slots(dst_ids, dbs, t0, t1)
                if d_slot.size and (d_slot.min() < 0 or d_slot.max() >= num_blocks_d * dbs):
                    raise ValueError(f"block ids out of range [0, {num_blocks_d})")
                base = cache.data_ptr()
                dst_addr = np.concatenate([base + (p * num_blocks_d * dbs + d_slot) * row_d for p in range(planes)])
                length = row_s
            else:
                staging = self._take_staging(planes * m * row_s, cache.device)
                base = staging[0].data_ptr()
                dst_addr = base + np.arange(planes * m, dtype=np.int64) * row_s  # [2, m, hs, dim] token-major
                length = row_s
            try:
                local_descs, remote_descs = _runs(src_addr, dst_addr, length, region.device, dev)
                self._transfer(agent, local_descs, remote_descs, mem, grant.mem, deadline, abort, ep, layer, t0, t1)
                if staging is not None:
                    full = staging[0][:planes * m * row_s].view(cache.dtype).view(2, m, row_s // (lay.head_dim * es),
                                                                                    lay.head_dim)
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            kv_io.scatter(cache, full[:, :, h_src[0]:h_src[1]], dst_ids, dbs, t0, local)
                        stream.synchronize()
                    else:
                        kv_io.scatter(cache, full[:, :, h_src[0]:h_src[1]], dst_ids, dbs, t0, local)
                    self.staged_reads += 1
                else:
                    self.direct_reads += 1
            finally:
                if staging is not None:
                    self._give_staging(staging)
            progress["bytes"] += int(local_descs[:, 1].sum()) if len(local_descs) else 0

    def _transfer(self, agent: str, local, remote, mem_local: str, mem_remote: str, deadline: float,
                  abort: threading.Event, ep: str, layer: int, t0: int, t1: int) -> None:
        if not len(local):
            return
        a = self._agent
        try:
            handle = a.initialize_xfer("READ", a.get_xfer_descs(local, mem_local), a.get_xfer_descs(remote, mem_remote),
                                       agent)
        except Exception as e:  # noqa: BLE001 - nixl raises its own error types
            raise _Fail(f"NIXL could not set up the read of layer {layer} from context rank {ep}: "
                        f"{type(e).__name__}: {e}") from None
        state = "ERR"
        try:
            state = a.transfer(handle)
            delay = self.POLL_S
            while state == "PROC":
                if abort.is_set():
                    return
                if time.monotonic() > deadline:
                    raise _Fail(f"timed out reading layer {layer} tokens [{t0}, {t1}) over NIXL from context "
                                f"rank {ep}")
                time.sleep(delay)
                delay = min(delay * 2, 0.005)
                state = a.check_xfer_state(handle)
            if state != "DONE":
                self._forget(agent)  # the source agent may be gone: load its metadata anew next time
                raise _Fail(f"NIXL read of layer {layer} tokens [{t0}, {t1}) from context rank {ep} failed ({state})")
        finally:
            try:
                handle.release()  # cancels one still in progress
            except Exception:  # noqa: BLE001 - could not cancel: disconnect from the source
                self._forget(agent)
                try:
                    handle.release()
                except Exception:  # noqa: BLE001
                    logger.warning("NIXL sink: a read from %s could not be cancelled", ep)

    def close(self) -> None:
        with self._lock:
            remotes, self._remotes = list(self._remotes), set()
            staging, self._all_staging, self._staging = self._all_staging, [], []
        for name in remotes:
            try:
                self._agent.remove_remote_agent(name)
            except Exception:  # noqa: BLE001
                pass
        for _, reg in staging:
            try:
                self._agent.deregister_memory(reg)
            except Exception:  # noqa: BLE001
                pass
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception:  # noqa: BLE001
                pass
            self._reg = None

"""The DEFAULT backend's same-host GPU path (tcp.py's TcpKvSource / TcpKvSink take it through the
mixins here; its messages are in wire.py).

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
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch

from meshserve.disagg import kv_io
from meshserve.disagg.transceiver import KvRequest, RankLayout
from meshserve.disagg.wire import (Error, IpcCache, IpcDone, IpcGrant, IpcHandles, IpcOpen, IpcPull, Ok, _check_caches,
                                   _Conn, _Fail, _one_line)

logger = logging.getLogger("meshserve.disagg.tcp")  # the DEFAULT backend's logger: its records keep their name


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


def _ipc_local_why(kv_caches: list) -> Optional[str]:
    """Why this process's caches cannot take the cuda_ipc path, or None."""
    if not kv_caches or any(c.device.type != "cuda" for c in kv_caches):
        return "the KV caches are not CUDA tensors"
    return cuda_ipc_unsupported()


class IpcSourceMixin:
    """TcpKvSource's side of the cuda_ipc path (its IpcOpen and IpcPull handling)."""

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


class IpcSinkMixin:
    """TcpKvSink's side of the cuda_ipc path (_pull_ipc: used by _pull_from when it can be)."""

    IPC_CHUNK_BYTES = 64 << 20  # the most one cuda_ipc gather holds on the GPU at once (per layer and chunk)

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
                if key not in slots:  # with cp (RING) this rank keeps only its sub-blocks' tokens
                    rows, dst_idx = kv_io.dest_slots(dst_block_ids[dst_group], lay.block_size, t0, t1,
                                                     kv_io.geometry(cache)[1], lay.cp)
                    src_idx = kv_io.token_slots(grant.block_ids[src_group], source.block_size, t0, t1,
                                                kv_io.geometry(src_cache)[1])
                    slots[key] = ((src_idx if rows is None else src_idx[rows]).to(cache.device),
                                  dst_idx.to(cache.device))
                src_idx, dst_idx = slots[key]
                progress["bytes"] += kv_io.copy_slots(src_cache, src_idx, src_heads, cache, dst_idx, dst_heads)
        if stream is not None:
            stream.synchronize()  # the copies are done (visible to every later launch) before the source hears
        if not abort.is_set():
            reply = self._exchange(conn, IpcDone(src.ctx_request_id), ep)
            if not isinstance(reply, Ok):
                raise _Fail(f"context rank {ep} answered {type(reply).__name__} to IpcDone")

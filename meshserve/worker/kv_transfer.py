"""One rank's side of disaggregated serving: its KV source and sink (disagg/transceiver.py) over
its own KV cache, and the SchedulerOutput fields that drive them.

Every rank of a server with `cache_transceiver_config` builds a `RankTransfer` once its KV cache is
allocated: a source that serves reads of its blocks (a context server's role) and a sink that pulls
a request's KV into its blocks (a generation server's role); a server may play either. Each step,
before its forward, a rank unregisters the pinned requests whose blocks were freed (waiting for a
read in progress, so no later step overwrites blocks being read), registers the context requests
whose prompt this step completes, and starts the step's pulls on a thread pool. Rank 0 reads the
results itself (`take_results`); other ranks send them over the control channel (worker.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import msgspec

from meshserve.disagg.transceiver import RankLayout, TransferState, create_transceiver
from meshserve.engine.messages import KvPull, SchedulerOutput

logger = logging.getLogger(__name__)

MAX_CONCURRENT_PULLS = 4


SAMPLED_TENSORS = 4  # checkpoint tensors whose leading bytes identify the weights
SAMPLED_BYTES = 64 * 1024  # of each


def weights_digest(model_path: str, load_format: str = "auto", seed: int = 0) -> str:
    """What tells this checkpoint's weights from another's of the same config.json (a base model and
    its fine-tune): the names, dtypes, shapes and first SAMPLED_BYTES of SAMPLED_TENSORS tensors spread
    over the sorted names, so the way the checkpoint is sharded does not matter; random weights
    (load_format dummy) are their seed. "" where there are no safetensors to read."""
    if load_format == "dummy":
        return f"dummy-seed{seed}"
    import torch
    from safetensors import safe_open

    from meshserve.models.loader import tensor_files

    try:
        where = tensor_files(model_path)
    except (OSError, ValueError):  # FileNotFoundError included: no safetensors here
        return ""
    names = sorted(where)
    picks = sorted({names[i * (len(names) - 1) // max(1, SAMPLED_TENSORS - 1)] for i in range(SAMPLED_TENSORS)}) \
        if names else []
    h = hashlib.sha256()
    for name in picks:
        with safe_open(where[name], framework="pt") as f:
            part = f.get_slice(name)
            shape, dtype = part.get_shape(), part.get_dtype()
            if shape:
                rows = max(1, min(shape[0], SAMPLED_BYTES // max(1, math.prod(shape[1:]) * 2)))
                head = part[:rows]
            else:
                head = f.get_tensor(name)
        h.update(f"{name}|{dtype}|{list(shape)}|".encode())
        h.update(head.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_id(model_path: str, model_config, load_format: str = "auto", seed: int = 0) -> str:
    """The model's identity both sides of a handover must share: its architecture, the sha256 of its
    config.json (of the parsed config where there is no config.json, e.g. a GGUF file) and its
    weights' digest (weights_digest), so a fine-tune is not taken for its base model."""
    path = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else None
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    else:
        fields = getattr(model_config, "__dict__", {})
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    weights = weights_digest(model_path, load_format, seed) if os.path.isdir(model_path) else ""
    return f"{model_config.architecture}-{digest[:16]}" + (f"-{weights}" if weights else "")


def rank_layout(runner, model_id_: str) -> RankLayout:
    """What this rank holds of the KV cache (its endpoint is filled in by the source)."""
    cfg = runner.model_config
    layers = tuple(runner.layer_ids)
    groups = tuple(g for g, _ in runner.kv_slots)
    dtype = str(runner.kv_dtype).removeprefix("torch.")  # the cache's (float8_e4m3fn with kv_cache_config.dtype fp8)
    a = runner.attn_layers[0] if runner.attn_layers else None
    split = runner.cp_split  # context parallelism RING: this rank holds its sub-block of every block
    cp = (split.rank, split.size) if split is not None and split.ring else (0, 1)
    dp = runner.dp_rank  # attention DP: the DP rank whose requests' KV this rank holds (0 without)
    if a is not None and getattr(a, "latent", False):
        dim = a.kv_lora_rank + a.qk_rope_head_dim
        return RankLayout("", model_id_, dtype, runner.cfg.block_size, layers, 1, (0, 1), dim, kind="latent",
                          latent_dim=dim, groups=groups, cp=cp, dp=dp)
    total = cfg.num_key_value_heads
    tp, r = runner.tp_group.size, runner.tp_group.rank_in_group
    if total >= tp:
        local = total // tp
        heads = (r * local, (r + 1) * local)
    else:  # each kv head replicated on tp / total consecutive ranks
        h = r // (tp // total)
        heads = (h, h + 1)
    return RankLayout("", model_id_, dtype, runner.cfg.block_size, layers, total, heads, cfg.head_dim,
                      groups=groups, cp=cp, dp=dp)


class RankTransfer:
    def __init__(self, kv_caches: list, layout: RankLayout, backend: str = "DEFAULT", host: str = "127.0.0.1",
                 max_tokens_in_buffer: Optional[int] = None, key: Optional[bytes] = None,
                 verify_payload="auto", cuda_ipc="auto"):
        from meshserve.disagg import params
        key = params.secret_key() if key is None else key
        source_cls, sink_cls = create_transceiver(backend)
        # cache_transceiver_config.cuda_ipc: the DEFAULT backend's same-host GPU path (disagg/cuda_ipc.py)
        ipc = {"cuda_ipc": cuda_ipc} if backend.upper() == "DEFAULT" else {}
        self._releases: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self.source = source_cls(kv_caches, layout, host=host, key=key, on_release=self._releases.put,
                                 require_registered=True, **ipc)
        self.layout = msgspec.structs.replace(layout, endpoint=self.source.endpoint)
        self.sink = sink_cls(kv_caches, layout, max_tokens_in_buffer, key, verify_payload=verify_payload, **ipc)
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_PULLS, thread_name_prefix="meshserve-kv-pull")
        self._release_pool = ThreadPoolExecutor(1, thread_name_prefix="meshserve-kv-release")
        self._lock = threading.Lock()
        self.num_pulling = 0
        self._closed = False

    @property
    def busy(self) -> bool:
        """Pulls are running (their results are still to be reported)."""
        return self.num_pulling > 0

    def on_step(self, so: SchedulerOutput) -> None:
        for rid in so.kv_unregister:
            self.source.unregister(rid)
        for req in so.kv_register:
            self.source.register(req)
        for pull in so.kv_pulls:
            with self._lock:
                self.num_pulling += 1
            self._pool.submit(self._pull, pull)

    def _pull(self, pull: KvPull) -> None:
        try:
            res = self.sink.pull(pull.sources, pull.src, pull.dst_block_ids, pull.timeout_s)
            ok, error = res.state == TransferState.SUCCESS, res.error
            if ok:
                logger.debug("request %s: pulled %d bytes in %.3f s (%s)", pull.req_id, res.bytes, res.seconds,
                             res.path or "-")
        except Exception as e:  # noqa: BLE001 - a sink must not raise, but if it does the request fails alone
            logger.exception("request %s: the KV pull raised", pull.req_id)
            ok, error = False, f"{type(e).__name__}: {e}"
        with self._lock:
            self.num_pulling -= 1
        self._results.put((pull.req_id, ok, None if ok else (error or "the KV transfer failed")))

    def take_results(self) -> list[tuple[str, bool, Optional[str]]]:
        """(request id, ok, error) of this rank's pulls finished since the last call."""
        return _drain(self._results)

    def take_releases(self) -> list[str]:
        """Context requests a generation server released (this rank's source heard it)."""
        return _drain(self._releases)

    def release_remote(self, source_rank0: RankLayout, ctx_request_id: str) -> None:
        """Tell a context server its request's KV may be freed, in the background (logged if it fails)."""
        def send():
            err = self.sink.release(source_rank0, ctx_request_id)
            if err is not None:
                logger.warning("could not release %s on %s (it frees it after its timeout): %s", ctx_request_id,
                               source_rank0.endpoint, err)
        if not self._closed:
            self._release_pool.submit(send)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._release_pool.shutdown(wait=True)
        for part in (self.sink, self.source):
            try:
                part.close()
            except Exception:  # noqa: BLE001 - shutting down
                logger.debug("closing %s failed", type(part).__name__, exc_info=True)


def _drain(q: queue.SimpleQueue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out

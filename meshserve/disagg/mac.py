"""The KV payload MAC, hashed on several cores.

HMAC-SHA256 runs at ~2 GB/s on one core (docs/kv_backends.md), slower than a 25-100 Gbit/s link,
and a single HMAC over a chunk is one sequential stream of work. The payload MAC is therefore
defined over segments: the payload is cut into SEGMENT-byte pieces (the last one shorter), each
piece's SHA-256 is computed on a thread pool (hashlib releases the GIL for large updates), and

    MAC = HMAC-SHA256(payload_key, nonce || seq || u64 length || SHA-256(piece 0) || ... || SHA-256(piece n-1))

(a hash-then-MAC tree: forging it needs a SHA-256 collision). `SegmentedMac` takes the payload as the
socket delivers it (`update` with consecutive memoryviews, which must stay unchanged until `digest`)
and hands each full piece to the pool as soon as it is complete, so hashing keeps pace with the
socket on as many cores as the pool has (`MESHSERVE_KV_MAC_THREADS`, default min(8, CPUs)).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Union

SEGMENT = 2 << 20  # bytes hashed by one task: ~1 ms of SHA-256, far above a task's overhead
THREADS_ENV = "MESHSERVE_KV_MAC_THREADS"
_U64 = struct.Struct(">Q")
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def mac_threads() -> int:
    """Threads hashing payload pieces: MESHSERVE_KV_MAC_THREADS, else min(8, CPUs); 1 hashes inline."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={raw!r} is not an integer (threads that hash KV payloads, >= 1)") from None
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={n} must be >= 1")
        return n
    return max(1, min(8, os.cpu_count() or 1))


def _forget_pool() -> None:
    """In a forked child: the parent's pool has no threads here (a task would wait forever)."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> Optional[ThreadPoolExecutor]:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                n = mac_threads()
                if n == 1:
                    return None
                _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="meshserve-kv-mac")
    return _pool


def _sha(pieces: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.digest()


class SegmentedMac:
    """The payload MAC of one chunk, fed as it arrives or leaves (hmac-like: update / digest)."""

    def __init__(self, key: bytes, prefix: bytes, segment: Optional[int] = None):
        self._key, self._prefix, self._segment = key, prefix, segment or SEGMENT
        self._pool = _executor()
        self._done: list[Union[Future, bytes]] = []  # per piece: its digest, or the task computing it
        self._pending: list[memoryview] = []  # the current piece's parts so far
        self._filled = 0  # bytes in the current piece
        self._length = 0

    def _flush(self) -> None:
        parts, self._pending, self._filled = self._pending, [], 0
        if self._pool is not None:
            try:
                self._done.append(self._pool.submit(_sha, parts))
                return
            except RuntimeError:  # the pool is shut down (interpreter exit): hash here
                self._pool = None
        self._done.append(_sha(parts))

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self._length += len(view)
        while len(view):
            take = min(len(view), self._segment - self._filled)
            self._pending.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._segment:
                self._flush()

    def digest(self) -> bytes:
        if self._filled or not self._done:
            self._flush()
        digests = b"".join(d.result() if isinstance(d, Future) else d for d in self._done)
        return hmac.new(self._key, self._prefix + _U64.pack(self._length) + digests, hashlib.sha256).digest()

